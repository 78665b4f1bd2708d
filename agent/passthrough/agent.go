package passthrough

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// AgentConfig configures agent checks: HAProxy's agent-check protocol, in
// which each node's agent answers a TCP connection with one line saying
// whether the node takes new connections (ready, drain, maint), whether it
// is up (up, down, fail, stopped) and its weight (NN%).
type AgentConfig struct {
	// Port is the agent's port on each upstream's host; 0 disables.
	Port int
	// Interval between polls; 0 means DefaultAgentInterval.
	Interval time.Duration
}

// DefaultAgentInterval is HAProxy's agent-inter default.
const DefaultAgentInterval = 2 * time.Second

// maxAgentReply bounds the agent's line, as HAProxy's check buffer does.
const maxAgentReply = 512

func (a *AgentConfig) interval() time.Duration { return or(a.Interval, DefaultAgentInterval) }

// agentReply is one parsed reply; the zero value changes nothing.
type agentReply struct {
	weight int    // percent; -1 when not given
	admin  string // ready, drain, maint or ""
	op     string // up, down, fail, stopped or ""
	desc   string // after #
}

// parseAgentReply parses a reply as HAProxy 2.6 does: words separated by
// spaces, tabs or commas; a word starting with # begins the description.
// Unknown words are an error (HAProxy ignores the whole reply then).
func parseAgentReply(line string) (agentReply, error) {
	r := agentReply{weight: -1}
	line = strings.TrimRight(line, "\r\n")
	if i := strings.Index(line, "#"); i >= 0 && (i == 0 || strings.ContainsRune(" \t,", rune(line[i-1]))) {
		r.desc = strings.TrimSpace(line[i+1:])
		line = line[:i]
	}
	for _, w := range strings.FieldsFunc(line, func(c rune) bool { return c == ' ' || c == '\t' || c == ',' }) {
		lw := strings.ToLower(w)
		switch {
		case strings.HasSuffix(lw, "%"):
			n, err := strconv.Atoi(strings.TrimSuffix(lw, "%"))
			if err != nil || n < 0 || n > 256 {
				return r, fmt.Errorf("bad weight %q", w)
			}
			r.weight = n
		case strings.HasPrefix(lw, "maxconn:"):
			// HAProxy's per-server connection cap: not the balancer's.
		case lw == "ready" || lw == "drain" || lw == "maint":
			r.admin = lw
		case lw == "up" || lw == "down" || lw == "fail" || lw == "stopped":
			r.op = lw
		default:
			return r, fmt.Errorf("unknown word %q", w)
		}
	}
	return r, nil
}

// agentLoop polls u's agent until ctx ends.
func (b *Balancer) agentLoop(ctx context.Context, u *upstream, a AgentConfig) {
	defer b.healthWG.Done()
	t := time.NewTicker(a.interval())
	defer t.Stop()
	host, _, _ := net.SplitHostPort(u.Addr)
	addr := net.JoinHostPort(host, strconv.Itoa(a.Port))
	for {
		line, err := pollAgent(ctx, addr, a.interval())
		if ctx.Err() != nil {
			return
		}
		var r agentReply
		if err == nil {
			r, err = parseAgentReply(line)
		}
		b.recordAgent(u, r, line, err)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// pollAgent reads the agent's one line at addr.
func pollAgent(ctx context.Context, addr string, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	line, err := bufio.NewReaderSize(io.LimitReader(c, maxAgentReply), maxAgentReply).ReadString('\n')
	if err != nil && !(err == io.EOF && line != "") {
		return "", fmt.Errorf("read the agent's reply: %w", err)
	}
	return line, nil
}

// recordAgent applies a reply (or a failed poll, which changes nothing,
// as in HAProxy: an agent that does not answer neither takes a node out
// nor brings it back).
func (b *Balancer) recordAgent(u *upstream, r agentReply, line string, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err != nil {
		if u.agentErr == "" {
			b.log.Warn("agent check failed; the node's agent state is kept", "upstream", u.Addr, "agent_state", u.agentState(), "err", err)
		}
		u.agentErr = err.Error()
		return
	}
	if u.agentErr != "" {
		b.log.Info("agent check answers again", "upstream", u.Addr, "reply", strings.TrimSpace(line))
	}
	u.agentErr = ""
	before := u.agentState()
	if r.admin != "" {
		u.agentAdmin = r.admin
	}
	switch r.op {
	case "up":
		u.agentDown = false
	case "down", "fail", "stopped":
		u.agentDown = true
	}
	if r.weight >= 0 {
		u.agentWeight = r.weight
	}
	u.agentDesc = r.desc
	if after := u.agentState(); after != before {
		b.log.Info("agent check: node state changed", "upstream", u.Addr, "from", before, "to", after, "reply", strings.TrimSpace(line), "connections", len(u.conns))
	}
}

// agentState describes what u's agent last said ("" before it said
// anything). b.mu must be held.
func (u *upstream) agentState() string {
	if !u.agentSeen() {
		return ""
	}
	s := "up"
	if u.agentDown {
		s = "down"
	}
	admin := u.agentAdmin
	if admin == "" {
		admin = "ready"
	}
	s += " " + admin
	if u.agentWeight != 100 {
		s += fmt.Sprintf(" %d%%", u.agentWeight)
	}
	if u.agentDesc != "" {
		s += " #" + u.agentDesc
	}
	return s
}

func (u *upstream) agentSeen() bool {
	return u.agentAdmin != "" || u.agentDown || u.agentWeight != 100 || u.agentDesc != ""
}

// agentOut reports whether u's agent asks for no new connections: drain,
// maint or a weight of 0%.
func (u *upstream) agentOut() bool {
	return u.agentAdmin == "drain" || u.agentAdmin == "maint" || u.agentWeight == 0
}
