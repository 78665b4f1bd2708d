package test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mmtls/mmtls/test/fixture"
)

// echoBackends greet with their name, then echo; stop closes the listener
// and every connection, as a node that dies.
type echoBackend struct {
	name  string
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func newEchoBackend(t *testing.T, name string) *echoBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &echoBackend{name: name, ln: ln}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.mu.Lock()
			b.conns = append(b.conns, c)
			b.mu.Unlock()
			go func() {
				defer c.Close()
				fmt.Fprintf(c, "%s\n", name)
				io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(b.stop)
	return b
}

func (b *echoBackend) addr() string { return b.ln.Addr().String() }

func (b *echoBackend) stop() {
	b.ln.Close()
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, c := range b.conns {
		c.Close()
	}
}

// balancer is a running `mmtls balance` process.
type balancerProc struct {
	cmd    *exec.Cmd
	addr   string
	socket string
	stderr *fixture.Buffer
	done   chan struct{}
}

func startBalancer(t *testing.T, extra ...string) *balancerProc {
	t.Helper()
	addr, _ := fixture.PickPort()
	p := &balancerProc{addr: addr, socket: filepath.Join(t.TempDir(), "balance.sock"), stderr: &fixture.Buffer{}, done: make(chan struct{})}
	args := append([]string{"balance", "--listen", addr, "--control-socket", p.socket}, extra...)
	p.cmd = exec.Command(mmtlsBin, args...)
	p.cmd.Stderr = p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(40 * time.Second):
			p.cmd.Process.Kill()
		}
		if t.Failed() {
			t.Logf("mmtls balance log:\n%s", p.stderr)
		}
	})
	waitFor(t, 10*time.Second, func() error {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
	return p
}

type session struct {
	c    net.Conn
	r    *bufio.Reader
	node string
}

func openSession(t *testing.T, addr, src string) *session {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &session{c: c, r: bufio.NewReader(c)}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := s.r.ReadString('\n')
	if err != nil {
		t.Fatalf("greeting: %v", err)
	}
	s.node = strings.TrimSpace(line)
	return s
}

func (s *session) echo() error {
	s.c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(s.c, "ping\n"); err != nil {
		return err
	}
	line, err := s.r.ReadString('\n')
	if err != nil || line != "ping\n" {
		return fmt.Errorf("echo: %q %v", line, err)
	}
	return nil
}

// status, drain and undrain through the control socket, as root.
func TestBalanceDrainThroughControlSocket(t *testing.T) {
	a, b := newEchoBackend(t, "a"), newEchoBackend(t, "b")
	p := startBalancer(t, "--upstream", a.addr(), "--upstream", b.addr(), "--sni-peek=false", "--method", "round-robin")
	var onA *session
	for i := 0; i < 4 && onA == nil; i++ {
		s := openSession(t, p.addr, "127.0.0.1")
		if s.node == "a" {
			onA = s
		} else {
			defer s.c.Close()
		}
	}
	if onA == nil {
		t.Fatal("round-robin never chose a")
	}
	defer onA.c.Close()

	if r := runMMTLS(t, "balance", "drain", a.addr(), "--control-socket", p.socket); r.code != 0 {
		t.Fatalf("drain:\n%s", r)
	}
	r := runMMTLS(t, "balance", "status", "--control-socket", p.socket, "--json")
	var st []struct {
		Addr     string `json:"addr"`
		Draining bool   `json:"draining"`
		Active   int    `json:"active"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || len(st) != 2 || !st[0].Draining || st[0].Active != 1 {
		t.Fatalf("status after drain: %v\n%s", err, r)
	}
	for range 4 {
		s := openSession(t, p.addr, "127.0.0.1")
		if s.node != "b" {
			t.Errorf("new connection went to the drained node %s", s.node)
		}
		s.c.Close()
	}
	if err := onA.echo(); err != nil {
		t.Errorf("live connection to the drained node broke: %v", err)
	}
	if r := runMMTLS(t, "balance", "undrain", a.addr(), "--control-socket", p.socket); r.code != 0 {
		t.Fatalf("undrain:\n%s", r)
	}
	if r := runMMTLS(t, "balance", "drain", "nope:1", "--control-socket", p.socket); r.code == 0 || !strings.Contains(r.stderr, `no upstream "nope:1"`) {
		t.Errorf("drain of an unknown node:\n%s", r)
	}
}

// One node killed under load: every new connection succeeds through the
// other, and the clients of the surviving node keep it.
func TestBalanceNodeKilledUnderLoad(t *testing.T) {
	a, b := newEchoBackend(t, "a"), newEchoBackend(t, "b")
	p := startBalancer(t, "--upstream", a.addr(), "--upstream", b.addr(), "--sni-peek=false")
	// Which node each client source maps to, before.
	home := map[string]string{}
	for i := 1; i <= 20; i++ {
		src := fmt.Sprintf("127.0.0.%d", i)
		s := openSession(t, p.addr, src)
		home[src] = s.node
		s.c.Close()
	}
	var ok, failed atomic.Int64
	var moved atomic.Int64
	// Connections a node had accepted when it died fail with it; the
	// promise is about connections started after it is gone.
	var killedAt atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := 1; i <= 20; i++ {
		src := fmt.Sprintf("127.0.0.%d", i)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < 200; n++ {
				select {
				case <-stop:
					return
				default:
				}
				started := time.Now().UnixNano()
				name, err := via(p.addr, src)
				k := killedAt.Load()
				switch {
				case err != nil && k != 0 && started > k:
					failed.Add(1)
				case err != nil:
					// in flight on the dying node
				case home[src] == "b" && name != "b":
					moved.Add(1)
				default:
					ok.Add(1)
				}
			}
		}()
	}
	time.Sleep(200 * time.Millisecond)
	a.stop() // node a dies mid-load
	killedAt.Store(time.Now().UnixNano())
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wg.Wait()
	if failed.Load() > 0 {
		t.Errorf("%d of %d connections failed after a node died", failed.Load(), failed.Load()+ok.Load())
	}
	if moved.Load() > 0 {
		t.Errorf("%d connections of b's clients moved off b", moved.Load())
	}
	if ok.Load() < 100 {
		t.Errorf("only %d connections made", ok.Load())
	}
}

// SIGTERM: the listener closes at once, live connections are waited for.
func TestBalanceGracefulStop(t *testing.T) {
	a := newEchoBackend(t, "a")
	p := startBalancer(t, "--upstream", a.addr(), "--sni-peek=false")
	s := openSession(t, p.addr, "127.0.0.1")
	p.cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, 10*time.Second, func() error {
		c, err := net.DialTimeout("tcp", p.addr, time.Second)
		if err == nil {
			c.Close()
			return fmt.Errorf("still accepting")
		}
		return nil
	})
	if err := s.echo(); err != nil {
		t.Errorf("live connection broken by SIGTERM: %v", err)
	}
	select {
	case <-p.done:
		t.Fatal("exited with a live connection before the deadline")
	default:
	}
	s.c.Close()
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatal("did not exit once the last connection closed")
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("exit code %d", code)
	}
}
