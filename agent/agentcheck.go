package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/mmtls/mmtls/agent/clock"
	"github.com/mmtls/mmtls/agent/passthrough"
)

// Defaults of the agent check ([cluster] agent_check...).
const (
	// DefaultDrainWait bounds the wait for every balancer to see "drain":
	// five polls at HAProxy's and mmtls balance's default interval.
	DefaultDrainWait = 10 * time.Second
	// DefaultDrainGrace lets requests in flight on the node finish once
	// the balancers send it no new connections.
	DefaultDrainGrace = 2 * time.Second
	// DefaultRejoinWait is how long a node that is back keeps the cluster's
	// restart lock once the balancers have seen it ready: their health
	// checks must pass again (HAProxy's default rise 2 x inter 2s, and a
	// second) before the next node drains, or a balancer could find every
	// node out.
	DefaultRejoinWait = 5 * time.Second
	// pollerWindow: a peer that polled within this many of its own poll
	// intervals is a balancer to wait for.
	pollerWindow = 3
	// maxReason bounds the description of a "down" reply.
	maxReason = 200
)

// DefaultAgentCheckAllow is who may poll the agent check: loopback only,
// until the balancers' addresses are listed.
var DefaultAgentCheckAllow = []string{"127.0.0.0/8", "::1/128"}

// AgentCheck answers HAProxy's agent-check protocol for this node, which
// `mmtls balance --agent-check-port` and HAProxy's agent-check read: "up
// ready" while Mattermost serves what it should, "drain" from the moment
// the node is about to restart it until it is verified, and "down
// #reason" when it does not serve. One line per connection, then close.
// It implements push.Drainer.
type AgentCheck struct {
	allow               []netip.Prefix
	wait, grace, rejoin time.Duration
	log                 *slog.Logger
	clock               clock.Clock

	mu     sync.Mutex
	state  string
	peers  map[netip.Addr]*poller
	polls  uint64        // polls answered
	polled chan struct{} // closed at each poll, then replaced
}

// poller is one balancer polling the agent check, by address.
type poller struct {
	last, prev time.Time
	seq        uint64 // polls answered before its last one
}

// interval is the poller's own interval, as last seen (the protocol's
// default before a second poll).
func (p *poller) interval() time.Duration {
	if d := p.last.Sub(p.prev); !p.prev.IsZero() && d > 0 {
		return d
	}
	return passthrough.DefaultAgentInterval
}

// NewAgentCheck returns the agent check of c (its AgentCheckAllow, DrainWait
// and DrainGrace), answering "up ready".
func NewAgentCheck(c ClusterConfig, log *slog.Logger, clk clock.Clock) (*AgentCheck, error) {
	c = c.WithDefaults()
	a := &AgentCheck{wait: c.DrainWait, grace: c.DrainGrace, rejoin: c.RejoinWait, log: logger(log), clock: clock.Or(clk),
		state: "up ready", peers: map[netip.Addr]*poller{}, polled: make(chan struct{})}
	for _, s := range c.AgentCheckAllow {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			addr, aerr := netip.ParseAddr(s)
			if aerr != nil {
				return nil, fmt.Errorf("[cluster] agent_check_allow %q: want a CIDR (10.0.0.0/24) or an address: %w", s, err)
			}
			p = netip.PrefixFrom(addr, addr.BitLen())
		}
		a.allow = append(a.allow, p.Masked())
	}
	return a, nil
}

// Listen opens the agent check's listener on addr ([cluster] agent_check).
func (a *AgentCheck) Listen(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("[cluster] agent_check %q: %w", addr, err)
	}
	a.log.Info("answering agent checks", "listen", ln.Addr().String(), "allow", a.allow)
	return ln, nil
}

// Serve answers agent checks on ln until ctx ends.
func (a *AgentCheck) Serve(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			a.log.Warn("agent check: accept failed", "err", err)
			t := a.clock.NewTimer(100 * time.Millisecond)
			select {
			case <-t.C():
			case <-ctx.Done():
				t.Stop()
				return nil
			}
			continue
		}
		a.answer(c)
	}
}

// answer writes the state to an allowed peer and records its poll; others
// are dropped without a word.
func (a *AgentCheck) answer(c net.Conn) {
	defer c.Close()
	ap, err := netip.ParseAddrPort(c.RemoteAddr().String())
	if err != nil {
		return
	}
	ip := ap.Addr().Unmap()
	if !slices.ContainsFunc(a.allow, func(p netip.Prefix) bool { return p.Contains(ip) }) {
		a.log.Debug("agent check: dropped a client not in agent_check_allow", "client", ip.String())
		return
	}
	a.mu.Lock()
	state := a.state
	p := a.peers[ip]
	if p == nil {
		p = &poller{}
		a.peers[ip] = p
		a.log.Info("agent check: a balancer polls this node", "balancer", ip.String())
	}
	p.prev, p.last, p.seq = p.last, a.clock.Now(), a.polls
	a.polls++
	close(a.polled)
	a.polled = make(chan struct{})
	a.mu.Unlock()
	c.SetWriteDeadline(time.Now().Add(2 * time.Second))
	io.WriteString(c, state+"\n")
}

// State is what the agent check answers now.
func (a *AgentCheck) State() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.state
}

// Drain answers "drain" from now on and returns once every balancer that
// polled within its last three intervals has polled again (so it has seen
// the drain), at most DrainWait, and then DrainGrace for requests in
// flight. With no balancer polling, it returns at once.
func (a *AgentCheck) Drain(ctx context.Context) {
	if !a.answerAndWait(ctx, "drain", "draining") {
		return
	}
	a.pause(ctx, a.grace)
}

// answerAndWait answers state from now on and waits until every balancer
// polling the agent has seen it, at most DrainWait. It reports whether any
// balancer polls.
func (a *AgentCheck) answerAndWait(ctx context.Context, state, doing string) bool {
	a.mu.Lock()
	a.state = state
	since, sinceSeq := a.clock.Now(), a.polls
	var waitFor []netip.Addr
	for ip, p := range a.peers {
		if since.Sub(p.last) <= pollerWindow*p.interval() {
			waitFor = append(waitFor, ip)
		}
	}
	a.mu.Unlock()
	if len(waitFor) == 0 {
		a.log.Info(doing+": no balancer polls this node's agent check; not waiting", "answer", state)
		return false
	}
	a.log.Info(doing+": waiting until every balancer has seen it", "answer", state, "balancers", waitFor, "drain_wait", a.wait)
	timer := a.clock.NewTimer(a.wait)
	defer timer.Stop()
	for {
		a.mu.Lock()
		var missing []netip.Addr
		for _, ip := range waitFor {
			if a.peers[ip].seq < sinceSeq {
				missing = append(missing, ip)
			}
		}
		polled := a.polled
		a.mu.Unlock()
		if len(missing) == 0 {
			a.log.Info(doing+": every balancer has seen it", "answer", state, "waited", a.clock.Now().Sub(since).Round(time.Millisecond))
			return true
		}
		select {
		case <-polled:
		case <-timer.C():
			a.log.Warn(doing+": stopped waiting at drain_wait; some balancers have not polled since", "answer", state, "not_seen_by", missing, "drain_wait", a.wait)
			return true
		case <-ctx.Done():
			a.log.Info(doing+": stopped waiting, the agent is stopping", "answer", state)
			return true
		}
	}
}

// pause waits d on the clock, or until ctx ends.
func (a *AgentCheck) pause(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	t := a.clock.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C():
	case <-ctx.Done():
	}
}

// Serving answers "up ready" when err is nil (the node serves a verified
// state), else "down #" and the reason. Coming back from a drain, it
// returns once every polling balancer has seen it ready and RejoinWait
// has passed, so that the next node to restart (which waits for this
// one's lock) does not drain before the balancers have this one back.
func (a *AgentCheck) Serving(err error) {
	state := "up ready"
	if err != nil {
		reason := strings.Join(strings.Fields(err.Error()), " ")
		if len(reason) > maxReason {
			reason = reason[:maxReason]
		}
		state = "down #" + reason
	}
	a.mu.Lock()
	before := a.state
	a.mu.Unlock()
	if before == "drain" && err == nil {
		ctx := context.Background()
		if a.answerAndWait(ctx, state, "back from the drain") {
			a.log.Info("back from the drain: waiting for the balancers' health checks to take the node back", "rejoin_wait", a.rejoin)
			a.pause(ctx, a.rejoin)
		}
		return
	}
	a.mu.Lock()
	a.state = state
	a.mu.Unlock()
	if before != state {
		a.log.Info("agent check answers "+strings.SplitN(state, " #", 2)[0], "was", strings.SplitN(before, " #", 2)[0])
	}
}
