package passthrough

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"
)

func TestParseAgentReply(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want agentReply
		bad  bool
	}{
		{in: "up ready\n", want: agentReply{weight: -1, admin: "ready", op: "up"}},
		{in: "drain", want: agentReply{weight: -1, admin: "drain"}},
		{in: "down #restarting for a new certificate\n", want: agentReply{weight: -1, op: "down", desc: "restarting for a new certificate"}},
		{in: "75%,maxconn:30\tup", want: agentReply{weight: 75, op: "up"}},
		{in: "0%", want: agentReply{weight: 0}},
		{in: "MAINT", want: agentReply{weight: -1, admin: "maint"}},
		{in: "up#x", bad: true}, // # must begin a word
		{in: "sleepy", bad: true},
		{in: "300%", bad: true},
	} {
		got, err := parseAgentReply(tt.in)
		if (err != nil) != tt.bad || !tt.bad && got != tt.want {
			t.Errorf("parseAgentReply(%q) = %+v, %v", tt.in, got, err)
		}
	}
}

// fakeAgent answers agent checks with whatever line it is set to.
type fakeAgent struct {
	mu    sync.Mutex
	reply string
	polls int
}

func (f *fakeAgent) set(reply string) {
	f.mu.Lock()
	f.reply = reply
	f.mu.Unlock()
}

func (f *fakeAgent) serve(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		f.mu.Lock()
		f.polls++
		io.WriteString(c, f.reply+"\n")
		f.mu.Unlock()
		c.Close()
	}
}

// agentNodes starts n backends on 127.0.0.2, .3..., each with its fake
// agent on one port shared by all (as the balancer polls HOST:port).
func agentNodes(t *testing.T, n int) ([]*backend, []*fakeAgent, int) {
	t.Helper()
	for attempt := 0; attempt < 20; attempt++ {
		var lns []net.Listener
		port := 0
		ok := true
		for i := range n {
			ln, err := net.Listen("tcp", net.JoinHostPort(fmt.Sprintf("127.0.0.%d", i+2), strconv.Itoa(port)))
			if err != nil {
				ok = false
				break
			}
			port = ln.Addr().(*net.TCPAddr).Port
			lns = append(lns, ln)
		}
		if !ok {
			for _, ln := range lns {
				ln.Close()
			}
			continue
		}
		var bs []*backend
		var as []*fakeAgent
		for i, ln := range lns {
			t.Cleanup(func() { ln.Close() })
			a := &fakeAgent{reply: "up ready"}
			go a.serve(ln)
			as = append(as, a)
			bl, err := net.Listen("tcp", fmt.Sprintf("127.0.0.%d:0", i+2))
			if err != nil {
				t.Fatal(err)
			}
			b := &backend{name: fmt.Sprintf("n%d", i+1), ln: bl}
			b.wg.Add(1)
			go b.serve()
			t.Cleanup(b.stop)
			bs = append(bs, b)
		}
		return bs, as, port
	}
	t.Fatal("no port free on every loopback address")
	return nil, nil, 0
}

// waitAgent waits until the balancer's status shows state for upstream i.
func waitAgent(t *testing.T, bal *Balancer, i int, state string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for bal.Status()[i].Agent != state {
		if time.Now().After(deadline) {
			t.Fatalf("upstream %d: agent state %q, want %q", i, bal.Status()[i].Agent, state)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Agent checks: drain and down take a node out for new connections while
// its live ones continue; up ready brings it back; 0% is a drain; when
// every live node drains, they still take connections.
func TestAgentChecks(t *testing.T) {
	bs, agents, port := agentNodes(t, 2)
	logs := make(records, 1000)
	cfg := Config{DisableSNIPeek: true, Method: MethodRoundRobin, Agent: AgentConfig{Port: port, Interval: 20 * time.Millisecond}, Logger: slog.New(logs)}
	for _, b := range bs {
		cfg.Upstreams = append(cfg.Upstreams, Upstream{Addr: b.addr()})
	}
	bal, addr := start(t, cfg)
	waitAgent(t, bal, 0, "up ready")
	spread := func(n int) map[string]int {
		got := map[string]int{}
		for range n {
			c := dialFrom(t, "127.0.0.1", addr)
			got[greeting(t, c)]++
			c.Close()
		}
		return got
	}
	if got := spread(4); got["n1"] != 2 || got["n2"] != 2 {
		t.Fatalf("both ready: %v", got)
	}

	live := dialFrom(t, "127.0.0.1", addr)
	defer live.Close()
	liveOn := greeting(t, live)
	i := map[string]int{"n1": 0, "n2": 1}[liveOn]
	for _, reply := range []string{"drain", "down #restarting", "0%", "maint"} {
		agents[i].set(reply)
		want := map[string]string{"drain": "up drain", "down #restarting": "down ready #restarting", "0%": "up ready 0%", "maint": "up maint"}[reply]
		if reply == "0%" {
			agents[i].set("up ready 0%")
		}
		waitAgent(t, bal, i, want)
		if got := spread(4); got[liveOn] != 0 {
			t.Errorf("agent says %q: %s still got new connections: %v", reply, liveOn, got)
		}
		io.WriteString(live, "still here\n")
		live.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, len("still here\n"))
		if _, err := io.ReadFull(live, buf); err != nil {
			t.Fatalf("agent says %q: the live connection broke: %v", reply, err)
		}
		agents[i].set("up ready 100%")
		waitAgent(t, bal, i, "up ready")
	}
	if got := spread(4); got["n1"] != 2 || got["n2"] != 2 {
		t.Errorf("back to ready: %v", got)
	}

	// Every node draining: served rather than refused, and said so.
	agents[0].set("drain")
	agents[1].set("drain")
	waitAgent(t, bal, 0, "up drain")
	waitAgent(t, bal, 1, "up drain")
	if got := spread(2); got["n1"]+got["n2"] != 2 {
		t.Errorf("every node draining: %v", got)
	}
	if _, attrs := logs.next(t, "every live node is draining; sending new connections to draining nodes rather than refusing them"); attrs["upstream"] == "" {
		t.Errorf("fallback line: %v", attrs)
	}
	// A down node is not a fallback.
	agents[0].set("down")
	waitAgent(t, bal, 0, "down drain")
	if got := spread(2); got["n2"] != 2 {
		t.Errorf("one node down, the other draining: %v", got)
	}
}

// An agent that stops answering changes nothing: its node keeps the state
// it had (HAProxy's behaviour), and the status says why.
func TestAgentUnreachable(t *testing.T) {
	bs, _, port := agentNodes(t, 1)
	cfg := Config{DisableSNIPeek: true, Upstreams: []Upstream{{Addr: bs[0].addr()}, {Addr: "127.0.0.9:1"}}, Agent: AgentConfig{Port: port, Interval: 20 * time.Millisecond}}
	bal, _ := start(t, cfg)
	waitAgent(t, bal, 0, "up ready")
	deadline := time.Now().Add(10 * time.Second)
	for bal.Status()[1].AgentError == "" {
		if time.Now().After(deadline) {
			t.Fatal("no agent error for an upstream without an agent")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if st := bal.Status()[1]; st.Agent != "" || !st.Healthy {
		t.Errorf("an agent that never answered: %+v", st)
	}
}

// A node out for connect failures returns as soon as the active check has
// passed rise times, not at fail_timeout.
func TestActiveCheckDecidesRecovery(t *testing.T) {
	a, b := newBackend(t, "a"), newBackend(t, "b")
	addrA := a.addr()
	cfg := raw(a, b)
	cfg.Method = MethodRoundRobin
	cfg.FailTimeout = time.Hour
	cfg.Health = HealthConfig{Mode: HealthTCP, Interval: 20 * time.Millisecond, Rise: 2, Fall: 100}
	bal, addr := start(t, cfg)
	a.stop()
	a.wg.Wait()
	// Connect failures take a out (the active check needs 100 to).
	deadline := time.Now().Add(10 * time.Second)
	for !bal.Status()[0].PassiveDown {
		c := dialFrom(t, "127.0.0.1", addr)
		greeting(t, c)
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("a never taken out")
		}
	}
	ln, err := net.Listen("tcp", addrA)
	if err != nil {
		t.Skipf("port of a taken meanwhile: %v", err)
	}
	back := &backend{name: "a", ln: ln}
	back.wg.Add(1)
	go back.serve()
	t.Cleanup(back.stop)
	deadline = time.Now().Add(10 * time.Second)
	for bal.Status()[0].PassiveDown {
		if time.Now().After(deadline) {
			t.Fatal("a still out 10s after it came back, with fail_timeout 1h: the active check did not decide")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
