package agent

import (
	"context"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/mmtls/mmtls/agent/clock"
)

// startAgentCheck serves an agent check on a loopback port.
func startAgentCheck(t *testing.T, c ClusterConfig, clk clock.Clock) (*AgentCheck, string) {
	t.Helper()
	ac, err := NewAgentCheck(c, slog.New(slog.DiscardHandler), clk)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := ac.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ac.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return ac, ln.Addr().String()
}

// poll reads the agent check's answer from src.
func poll(t *testing.T, addr, src string) string {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, _ := io.ReadAll(c)
	return string(b)
}

// The states: up ready, drain, down with the reason; only allowed clients
// get an answer.
func TestAgentCheckAnswers(t *testing.T) {
	ac, addr := startAgentCheck(t, ClusterConfig{AgentCheckAllow: []string{"127.0.0.1/32", "127.0.0.3"}}, nil)
	if got := poll(t, addr, "127.0.0.1"); got != "up ready\n" {
		t.Errorf("ready: %q", got)
	}
	if got := poll(t, addr, "127.0.0.2"); got != "" {
		t.Errorf("a client not allowed got %q", got)
	}
	if got := poll(t, addr, "127.0.0.3"); got != "up ready\n" {
		t.Errorf("an allowed address: %q", got)
	}
	ac.Serving(io.ErrUnexpectedEOF)
	if got := poll(t, addr, "127.0.0.1"); got != "down #unexpected EOF\n" {
		t.Errorf("down: %q", got)
	}
	ac.Serving(nil)
	if got := poll(t, addr, "127.0.0.1"); got != "up ready\n" {
		t.Errorf("up again: %q", got)
	}
	if _, err := NewAgentCheck(ClusterConfig{AgentCheckAllow: []string{"10.0.0.0/33"}}, nil, nil); err == nil {
		t.Error("a bad CIDR was accepted")
	}
}

// Drain waits until each balancer that polls has polled again, then the
// grace; without pollers it does not wait; drain_wait bounds the wait for
// a balancer that stopped polling.
func TestAgentCheckDrainWaitsForTheBalancers(t *testing.T) {
	clk := clock.NewFake(time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC))
	ac, addr := startAgentCheck(t, ClusterConfig{AgentCheckAllow: []string{"127.0.0.0/8"}, DrainWait: 10 * time.Second, DrainGrace: 2 * time.Second, RejoinWait: 5 * time.Second}, clk)

	// No poller: at once.
	ac.Drain(context.Background())
	if ac.State() != "drain" {
		t.Errorf("state %q after Drain", ac.State())
	}
	ac.Serving(nil)

	// Two balancers, polling every 2s.
	poll(t, addr, "127.0.0.2")
	poll(t, addr, "127.0.0.3")
	clk.Advance(2 * time.Second)
	poll(t, addr, "127.0.0.2")
	poll(t, addr, "127.0.0.3")
	done := make(chan struct{})
	armed := clk.ArmedChanged()
	go func() { ac.Drain(context.Background()); close(done) }()
	<-armed // waiting, with drain_wait armed
	if got := poll(t, addr, "127.0.0.2"); got != "drain\n" {
		t.Errorf("while draining: %q", got)
	}
	select {
	case <-done:
		t.Fatal("Drain returned before the second balancer saw the drain")
	default:
	}
	armed = clk.ArmedChanged()
	poll(t, addr, "127.0.0.3")
	<-armed // both have seen it: the grace timer
	if d, _ := clk.Next(); d != 2*time.Second {
		t.Errorf("next wait %s, want the 2s grace", d)
	}
	clk.Advance(2 * time.Second)
	<-done

	// Back: "up ready" once both have seen it, then rejoin_wait.
	done = make(chan struct{})
	armed = clk.ArmedChanged()
	go func() { ac.Serving(nil); close(done) }()
	<-armed
	if got := poll(t, addr, "127.0.0.2"); got != "up ready\n" {
		t.Errorf("back: %q", got)
	}
	armed = clk.ArmedChanged()
	poll(t, addr, "127.0.0.3")
	<-armed
	if d, _ := clk.Next(); d != 5*time.Second {
		t.Errorf("next wait %s, want the 5s rejoin_wait", d)
	}
	select {
	case <-done:
		t.Fatal("Serving returned before rejoin_wait")
	default:
	}
	clk.Advance(5 * time.Second)
	<-done

	// A balancer gone quiet: drain_wait, then grace.
	clk.Advance(time.Second)
	poll(t, addr, "127.0.0.2")
	done = make(chan struct{})
	armed = clk.ArmedChanged()
	go func() { ac.Drain(context.Background()); close(done) }()
	<-armed
	armed = clk.ArmedChanged()
	clk.Advance(10 * time.Second)
	<-armed // the grace
	clk.Advance(2 * time.Second)
	<-done
}
