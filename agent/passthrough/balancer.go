package passthrough

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// ErrNoLiveUpstreams is returned for a connection no upstream could take.
var ErrNoLiveUpstreams = errors.New("no live upstreams")

// ErrClosed is returned by Serve after Shutdown.
var ErrClosed = errors.New("passthrough: balancer closed")

// upstream is one upstream's live state. All fields but the embedded
// Upstream are guarded by Balancer.mu.
type upstream struct {
	Upstream
	fails        int       // passive: connect failures since the last success
	checked      time.Time // passive: when the failures started counting (nginx's checked)
	healthy      bool      // active: up (always true without active checks)
	rises, falls int       // active: consecutive results
	draining     bool
	drainTimer   *time.Timer // closes what is left at the drain deadline; nil without one
	// What the node's agent last said (agent checks): ready, drain or
	// maint; down; a weight in percent (100 until it says otherwise); its
	// description; and the last poll's error.
	agentAdmin  string
	agentDown   bool
	agentWeight int
	agentDesc   string
	agentErr    string
	curWeight   int // smooth weighted round-robin
	conns       map[*conn]struct{}
	total       int // connections made

	// Bytes forwarded, updated by the copy loops without the lock.
	toUpstream, toClient atomic.Int64
}

// weight is the configured weight scaled by the agent's percentage (at
// least 1: a 0% node takes no connections at all, see agentOut).
func (u *upstream) weight() int {
	w := max(u.Weight, 1)
	if u.agentWeight != 100 && u.agentWeight > 0 {
		w = max(w*u.agentWeight/100, 1)
	}
	return w
}

// Balancer forwards connections to upstreams. Create it with New; it is
// safe for concurrent use. Serve may be called for several listeners.
type Balancer struct {
	log *slog.Logger

	mu       sync.Mutex // guards everything below
	cfg      Config
	ups      []*upstream
	ring     *Ring
	rrNext   int
	conns    map[*conn]struct{}
	lns      map[net.Listener]struct{}
	closed   bool
	health   context.CancelFunc
	healthWG sync.WaitGroup
	handlers sync.WaitGroup // one per accepted connection
	slots    chan struct{}  // MaxConns semaphore; nil without a cap
	// onlyDrained is set while connections go to draining nodes because
	// no other is live (logged when it starts and ends).
	onlyDrained bool
	// byName is set when an upstream is a host name, not an address.
	byName bool
}

// New checks cfg and returns a Balancer; active health checks, if any,
// start at once.
func New(cfg Config) (*Balancer, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("passthrough: %w", err)
	}
	b := &Balancer{conns: map[*conn]struct{}{}, lns: map[net.Listener]struct{}{}}
	b.log = cfg.Logger
	if b.log == nil {
		b.log = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxConns > 0 {
		b.slots = make(chan struct{}, cfg.MaxConns)
	}
	b.mu.Lock()
	b.apply(cfg)
	b.mu.Unlock()
	return b, nil
}

// Update applies a new configuration (a reload): upstreams that stay keep
// their state and connections; removed ones get no new connections and
// keep the ones they have. Listeners are not touched. MaxConns is fixed at
// New.
func (b *Balancer) Update(cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("passthrough: %w", err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return ErrClosed
	}
	b.apply(cfg)
	b.log.Info("balancer configuration updated", "upstreams", len(cfg.Upstreams))
	return nil
}

// apply installs cfg. b.mu must be held.
func (b *Balancer) apply(cfg Config) {
	old := map[string]*upstream{}
	for _, u := range b.ups {
		old[u.Addr] = u
	}
	var ups []*upstream
	var names []string
	var weights []int
	for _, cu := range cfg.Upstreams {
		u := old[cu.Addr]
		if u == nil {
			u = &upstream{conns: map[*conn]struct{}{}, healthy: true, agentWeight: 100}
			// Until the first check says otherwise, an upstream is up,
			// as in HAProxy.
		}
		u.Upstream = cu
		ups = append(ups, u)
		names = append(names, cu.Addr)
		weights = append(weights, cu.Weight)
	}
	b.cfg, b.ups, b.ring = cfg, ups, NewRing(names, weights)
	b.byName = false
	for _, u := range ups {
		if _, err := netip.ParseAddrPort(u.Addr); err != nil {
			b.byName = true
		}
	}
	if b.health != nil {
		b.health()
		b.health = nil
	}
	active := cfg.Health.Mode != HealthNone && cfg.Health.Mode != ""
	if !active {
		for _, u := range ups {
			u.healthy = true
		}
	}
	if cfg.Agent.Port == 0 {
		for _, u := range ups {
			u.agentAdmin, u.agentDown, u.agentWeight, u.agentDesc, u.agentErr = "", false, 100, "", ""
		}
	}
	if !active && cfg.Agent.Port == 0 {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	b.health = cancel
	for _, u := range ups {
		if active {
			b.healthWG.Add(1)
			go b.checkLoop(ctx, u, cfg.Health)
		}
		if cfg.Agent.Port != 0 {
			b.healthWG.Add(1)
			go b.agentLoop(ctx, u, cfg.Agent)
		}
	}
}

// available reports whether u may get a new connection; with drained,
// a node that is only draining (by the control socket, or its agent's
// drain or 0%) counts as available. b.mu must be held.
func (b *Balancer) available(u *upstream, now time.Time, drained bool) bool {
	if !u.healthy || u.agentDown || u.agentAdmin == "maint" {
		return false
	}
	if !drained && (u.draining || u.agentOut()) {
		return false
	}
	if len(b.ups) == 1 {
		return true // as nginx: a single server is always tried
	}
	mf := b.cfg.maxFails()
	return mf < 0 || u.fails < mf || now.Sub(u.checked) > b.cfg.failTimeout()
}

// picker chooses upstreams for one client connection, in nginx's order.
type picker struct {
	b     *Balancer
	key   string
	pos   int         // position on the ring, for MethodHash
	tries int         // ring steps taken
	tried []*upstream // a handful at most: a scan costs less than a map
	// budget is the upstreams still to try (the loops' count; connect
	// keeps its own).
	budget int
}

func (b *Balancer) newPicker(key string) *picker {
	b.mu.Lock()
	defer b.mu.Unlock()
	return &picker{b: b, key: key, pos: b.ring.Start(key)}
}

// hashTries is how many ring points the hash method walks past
// unavailable upstreams before falling back to the next one in order:
// nginx's ngx_stream_upstream_get_chash_peer gives up after 20 too, and
// matching it keeps the mapping identical when nodes are down.
const hashTries = 20

// next returns the next upstream to try, or nil. When no upstream at all
// is live, the passive failure counts are reset, so the next connection
// tries them again (nginx's "no live upstreams" recovery).
func (p *picker) next(now time.Time) *upstream {
	b := p.b
	b.mu.Lock()
	defer b.mu.Unlock()
	ok := func(u *upstream) bool { return !slices.Contains(p.tried, u) && b.available(u, now, false) }
	var u *upstream
	if b.cfg.method() == MethodHash && len(b.ups) > 1 {
		for p.tries <= hashTries {
			cand := b.ups[b.ring.Server(p.pos)]
			if ok(cand) {
				u = cand
				break
			}
			p.pos++
			p.tries++
		}
	}
	if u == nil && b.cfg.method() == MethodLeastConn {
		for _, c := range b.ups {
			if ok(c) && (u == nil || len(c.conns)*u.weight() < len(u.conns)*c.weight()) {
				u = c
			}
		}
	}
	if u == nil {
		u = b.smoothRR(ok)
	}
	if u == nil {
		// Every live node is draining: better served by one of them than
		// refused.
		u = b.smoothRR(func(u *upstream) bool { return !slices.Contains(p.tried, u) && b.available(u, now, true) })
		if u != nil && !b.onlyDrained {
			b.onlyDrained = true
			b.log.Warn("every live node is draining; sending new connections to draining nodes rather than refusing them", "upstream", u.Addr)
		}
	} else if b.onlyDrained {
		b.onlyDrained = false
		b.log.Info("a node that is not draining is live again; draining nodes get no new connections", "upstream", u.Addr)
	}
	if u == nil {
		if !b.anyLive(now) {
			for _, c := range b.ups {
				c.fails = 0
			}
		}
		return nil
	}
	p.tried = append(p.tried, u)
	return u
}

// smoothRR is nginx's smooth weighted round-robin. b.mu must be held.
func (b *Balancer) smoothRR(ok func(*upstream) bool) *upstream {
	var best *upstream
	total := 0
	for _, u := range b.ups {
		if !ok(u) {
			continue
		}
		u.curWeight += u.weight()
		total += u.weight()
		if best == nil || u.curWeight > best.curWeight {
			best = u
		}
	}
	if best != nil {
		best.curWeight -= total
	}
	return best
}

func (b *Balancer) anyLive(now time.Time) bool {
	for _, u := range b.ups {
		if b.available(u, now, true) {
			return true
		}
	}
	return false
}

// failed records a connect failure to u (passive health).
func (b *Balancer) failed(u *upstream, now time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if now.Sub(u.checked) > b.cfg.failTimeout() {
		u.fails, u.checked = 0, now
	}
	u.fails++
	if mf := b.cfg.maxFails(); mf > 0 && u.fails == mf {
		out := b.cfg.failTimeout().String()
		if b.cfg.Health.active() {
			// The active check decides when it is back: rise passes
			// from now on (HAProxy's behaviour), or fail_timeout.
			u.rises = 0
			out = fmt.Sprintf("until %d health checks pass, at most %s", b.cfg.Health.rise(), out)
		}
		b.log.Warn("upstream failed; taking it out", "upstream", u.Addr, "fails", u.fails, "for", out)
	}
}

// succeeded records a connection established to u.
func (b *Balancer) succeeded(u *upstream, c *conn) {
	b.mu.Lock()
	defer b.mu.Unlock()
	u.fails = 0
	u.total++
	u.conns[c] = struct{}{}
}

func (b *Balancer) released(u *upstream, c *conn) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(u.conns, c)
}

// Drain stops new connections to the upstream addr; its live connections
// continue until they end or, with a DrainTimeout, until it passes.
func (b *Balancer) Drain(addr string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	u := b.find(addr)
	if u == nil {
		return fmt.Errorf("drain: no upstream %q", addr)
	}
	if u.draining {
		return nil
	}
	u.draining = true
	if d := b.cfg.DrainTimeout; d > 0 {
		u.drainTimer = time.AfterFunc(d, func() { b.cutDrained(u) })
	}
	b.log.Info("draining upstream", "upstream", addr, "connections", len(u.conns), "deadline", b.cfg.DrainTimeout)
	return nil
}

// Undrain lets the upstream addr take new connections again.
func (b *Balancer) Undrain(addr string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	u := b.find(addr)
	if u == nil {
		return fmt.Errorf("undrain: no upstream %q", addr)
	}
	u.draining = false
	if u.drainTimer != nil {
		u.drainTimer.Stop()
		u.drainTimer = nil
	}
	b.log.Info("upstream back in service", "upstream", addr)
	return nil
}

func (b *Balancer) cutDrained(u *upstream) {
	b.mu.Lock()
	if !u.draining {
		b.mu.Unlock()
		return
	}
	cs := make([]*conn, 0, len(u.conns))
	for c := range u.conns {
		cs = append(cs, c)
	}
	b.mu.Unlock()
	b.log.Info("drain deadline passed; closing the upstream's connections", "upstream", u.Addr, "connections", len(cs))
	for _, c := range cs {
		c.close("drain deadline")
	}
}

func (b *Balancer) find(addr string) *upstream {
	for _, u := range b.ups {
		if u.Addr == addr {
			return u
		}
	}
	return nil
}

// UpstreamStatus is one upstream's state, for `mmtls balance status`.
type UpstreamStatus struct {
	Addr        string `json:"addr"`
	Weight      int    `json:"weight"`
	Healthy     bool   `json:"healthy"`
	PassiveDown bool   `json:"passive_down"`
	Draining    bool   `json:"draining"`
	// Agent is what the node's agent last said ("up ready", "up drain",
	// "down #reason"...), empty without agent checks or before its first
	// answer; AgentError is the last poll's failure, if it failed.
	Agent      string `json:"agent,omitempty"`
	AgentError string `json:"agent_error,omitempty"`
	Active     int    `json:"active"`
	// Total connections made, and bytes forwarded each way.
	Total           int   `json:"total"`
	BytesToUpstream int64 `json:"bytes_to_upstream"`
	BytesToClient   int64 `json:"bytes_to_client"`
}

// Status reports every upstream.
func (b *Balancer) Status() []UpstreamStatus {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	out := make([]UpstreamStatus, 0, len(b.ups))
	for _, u := range b.ups {
		mf := b.cfg.maxFails()
		out = append(out, UpstreamStatus{
			Addr: u.Addr, Weight: u.weight(), Healthy: u.healthy, Draining: u.draining, Active: len(u.conns),
			Agent: u.agentState(), AgentError: u.agentErr,
			Total: u.total, BytesToUpstream: u.toUpstream.Load(), BytesToClient: u.toClient.Load(),
			PassiveDown: mf > 0 && u.fails >= mf && now.Sub(u.checked) <= b.cfg.failTimeout(),
		})
	}
	return out
}

// ActiveConns is the number of client connections being handled.
func (b *Balancer) ActiveConns() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.conns)
}
