package agent

import (
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"reflect"
	"sync"
	"time"

	"github.com/kardianos/service"
	"github.com/mmtls/mmtls/agent/balance"
	"github.com/mmtls/mmtls/agent/clock"
	"github.com/mmtls/mmtls/agent/clusterdb"
	"github.com/mmtls/mmtls/agent/issuer"
	"github.com/mmtls/mmtls/agent/push"
	"github.com/mmtls/mmtls/certs"
)

// DefaultStopTimeout bounds how long stopping the agent may take: a push
// in flight finishes or rolls back first (restart, verify, and the same
// again for a rollback). The systemd unit's TimeoutStopSec is above it.
const DefaultStopTimeout = 11 * time.Minute

// Program adapts a run function to kardianos/service: Start launches it
// with a cancellable context and returns at once; Stop cancels it and waits
// for it to return, up to StopTimeout.
type Program struct {
	Run         func(ctx context.Context) error
	StopTimeout time.Duration // 0 means DefaultStopTimeout

	mu     sync.Mutex
	cancel context.CancelFunc
	done   chan struct{}
	err    error // Run's result; read after done is closed
}

var _ service.Interface = (*Program)(nil)

// Start runs p.Run in a goroutine.
func (p *Program) Start(service.Service) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel, p.done = cancel, make(chan struct{})
	go p.run(ctx)
	return nil
}

func (p *Program) run(ctx context.Context) {
	defer close(p.done)
	p.err = p.Run(ctx)
}

// Done is closed when Run has returned, by itself or after Stop.
func (p *Program) Done() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.done
}

// Stop cancels Run and waits for it; Run's error is returned.
func (p *Program) Stop(service.Service) error {
	p.mu.Lock()
	cancel, done := p.cancel, p.done
	p.mu.Unlock()
	if cancel == nil {
		return nil
	}
	cancel()
	timeout := p.StopTimeout
	if timeout <= 0 {
		timeout = DefaultStopTimeout
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-done:
		return p.err
	case <-t.C:
		return fmt.Errorf("stop: the agent did not stop within %s", timeout)
	}
}

// Settings are everything an Agent runs with, as its loader builds them
// from the config file and the flags.
type Settings struct {
	// Watch is the watch loop's options; ignored when NoWatch.
	Watch WatchOptions
	// NoWatch runs the balancer alone: a config file without [source].
	NoWatch bool
	// FromCluster follows the cluster's published bundles instead of
	// watching files ([source] from = "cluster").
	FromCluster bool
	// Cluster chooses how restarts are coordinated. Read at start only.
	Cluster ClusterConfig
	// MetricsListen, if set, serves Prometheus metrics there. Read at
	// start only.
	MetricsListen string
	// Balance, if not nil, runs the balancer beside the watch loop (a
	// [balance] section in the config file).
	Balance *balance.Options
	// ACME, if not nil, obtains and renews the certificate, answering
	// HTTP-01 on the balancer's redirect_http, and publishes each one to
	// the cluster ([cluster] publish) or pushes it here. Read at start.
	ACME *issuer.Options
}

// Agent is what `mmtls run` and `mmtls watch` run: the watch loop, the
// cluster restart lock, the balancer and the metrics endpoint, configured
// by one loader that Run and Reload both call.
type Agent struct {
	load     func() (Settings, error)
	log      *slog.Logger
	unitDirs []string
	clock    clock.Clock
	metrics  *Metrics // lives as long as the Agent, across reloads
	ready    func()   // or nil
	version  string

	mu       sync.Mutex
	settings Settings         // in force; guarded by mu
	watcher  *Watcher         // set by Run; guarded by mu
	balancer *balance.Service // set by Run; guarded by mu
}

// AgentConfig are an Agent's dependencies.
type AgentConfig struct {
	// Load reads the settings: at Run, and again at each Reload.
	Load func() (Settings, error)
	// Logger receives everything the agent logs. Nil discards.
	Logger *slog.Logger
	// UnitDirs: see push.Pusher. Nil means systemd's own.
	UnitDirs []string
	// Clock drives the watch loop and the cluster lock. Nil means the
	// system clock.
	Clock clock.Clock
	// Ready, if not nil, is called once the settings are loaded and the
	// agent's parts are set up (NotifyReady under systemd).
	Ready func()
	// Version is reported to the cluster database.
	Version string
}

// NewAgent returns an agent that loads its settings with c.Load.
func NewAgent(c AgentConfig) *Agent {
	return &Agent{load: c.Load, log: logger(c.Logger), unitDirs: c.UnitDirs, clock: clock.Or(c.Clock), metrics: NewMetrics(), ready: c.Ready, version: c.Version}
}

// Metrics returns the agent's metrics, shared with its balancer.
func (a *Agent) Metrics() *Metrics { return a.metrics }

// Run loads the settings and runs the agent until ctx is cancelled, then
// returns after everything it started has stopped. Call it once.
func (a *Agent) Run(ctx context.Context) error {
	s, err := a.load()
	if err != nil {
		return err
	}
	if s.NoWatch && s.Balance == nil {
		return fmt.Errorf("nothing to run: the config has neither [source] nor [balance]: %w", push.ErrUsage)
	}
	var w *Watcher
	var runs []func(context.Context) error
	if !s.NoWatch {
		var err error
		if w, runs, err = a.source(s); err != nil {
			return err
		}
	}
	var b *balance.Service
	if s.Balance != nil {
		b = &balance.Service{Options: *s.Balance, Logger: a.log, Started: a.metrics.WatchBalancer}
	}
	if s.ACME != nil {
		run, err := a.acme(s, b)
		if err != nil {
			return err
		}
		runs = append(runs, run)
	}
	a.mu.Lock()
	a.settings, a.watcher, a.balancer = s, w, b
	a.mu.Unlock()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if s.MetricsListen != "" {
		wait, err := StartMetrics(ctx, s.MetricsListen, a.metrics, a.log)
		if err != nil {
			return err
		}
		defer wait()
		defer cancel() // runs first: stops the server, then waits for it
	}
	if w != nil {
		runs = append(runs, func(ctx context.Context) error { return w.Run(ctx, s.Watch) })
	}
	if b != nil {
		runs = append(runs, b.Run)
	}
	errc := make(chan error, len(runs))
	for _, run := range runs {
		go func() { errc <- run(ctx) }()
	}
	if a.ready != nil {
		a.ready()
	}
	var first error
	for range runs {
		if err := <-errc; err != nil && first == nil {
			first = err
			cancel() // one failed: stop the others
		}
	}
	return first
}

// source sets up where pairs come from and where they go: the watch loop
// pushing files here, the watch loop publishing them to the cluster, or the
// follower taking the cluster's bundles.
func (a *Agent) source(s Settings) (*Watcher, []func(context.Context) error, error) {
	if s.Cluster.Publish || s.FromCluster {
		store, key, err := OpenCluster(s.Cluster, s.Watch.Push, a.unitDirs, a.log)
		if err != nil {
			return nil, nil, err
		}
		if s.Cluster.Publish {
			pub := &Publisher{Store: store, Key: key, By: hostname(), SiteURL: s.Watch.Push.SiteURL, CAFile: s.Watch.Push.CAFile, Logger: a.log, Clock: a.clock}
			w := NewWatcher(pub, a.log, a.metrics)
			w.Clock = a.clock
			return w, nil, nil
		}
		lock, err := NewRestartLock(s.Cluster, s.Watch.Push, a.unitDirs, a.log, a.metrics)
		if err != nil {
			return nil, nil, err
		}
		drainer, runs, err := a.agentCheck(s.Cluster)
		if err != nil {
			return nil, nil, err
		}
		c := s.Cluster.WithDefaults()
		f := &Follower{Store: store, Key: key, Pusher: &push.Pusher{Logger: a.log, UnitDirs: a.unitDirs, Cluster: lock, Drainer: drainer, Clock: a.clock},
			Push: s.Watch.Push, Node: c.Node, Address: advertise(c.Advertise, s.Watch.Push), Reconcile: s.Watch.Reconcile,
			Version: a.version, Logger: a.log, Metrics: a.metrics, Clock: a.clock}
		if f.Node == "" {
			f.Node = hostname()
		}
		return nil, append(runs, f.Run), nil
	}
	lock, err := NewRestartLock(s.Cluster, s.Watch.Push, a.unitDirs, a.log, a.metrics)
	if err != nil {
		return nil, nil, err
	}
	if lock != nil {
		a.log.Info("restarts are coordinated across the cluster", "with", lock.String())
	}
	drainer, runs, err := a.agentCheck(s.Cluster)
	if err != nil {
		return nil, nil, err
	}
	p := &push.Pusher{Logger: a.log, UnitDirs: a.unitDirs, Cluster: lock, Drainer: drainer, Clock: a.clock}
	w := NewWatcher(p, a.log, a.metrics)
	w.Clock = a.clock
	return w, runs, nil
}

// agentCheck sets up [cluster] agent_check, if set: the drainer of this
// node's pushes, listening already (a port in use fails the start), and
// the loop that answers.
func (a *Agent) agentCheck(c ClusterConfig) (push.Drainer, []func(context.Context) error, error) {
	if c.AgentCheck == "" {
		return nil, nil, nil
	}
	ac, err := NewAgentCheck(c, a.log, a.clock)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", push.ErrUsage, err)
	}
	ln, err := ac.Listen(c.AgentCheck)
	if err != nil {
		return nil, nil, err
	}
	return ac, []func(context.Context) error{func(ctx context.Context) error { return ac.Serve(ctx, ln) }}, nil
}

// acme sets up [acme]: HTTP-01 answered from memory on the balancer's
// redirect_http, and each new pair published to the cluster ([cluster]
// publish, or a dsn) or pushed here.
func (a *Agent) acme(s Settings, b *balance.Service) (func(context.Context) error, error) {
	o := *s.ACME
	if !s.NoWatch {
		return nil, fmt.Errorf("%w: [acme] obtains the pair itself: remove [source] (its cert, key or from)", push.ErrUsage)
	}
	if b == nil || s.Balance.RedirectHTTP == "" {
		return nil, fmt.Errorf("%w: [acme] answers the CA's http-01 challenge on port 80: it needs [balance] redirect_http (and site_url)", push.ErrUsage)
	}
	if len(o.Names) == 0 {
		if u, err := url.Parse(s.Balance.SiteURL); err == nil && u.Hostname() != "" {
			o.Names = []string{u.Hostname()}
		}
	}
	if err := o.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", push.ErrUsage, err)
	}
	ch := &issuer.Challenges{}
	b.Challenges = ch
	is := &issuer.Issuer{Options: o, Challenges: ch, Logger: a.log}
	var deliver Pusher = &push.Pusher{Logger: a.log, UnitDirs: a.unitDirs, Clock: a.clock}
	base := s.Watch.Push
	if s.Cluster.Publish || s.Cluster.DSN != "" {
		store, key, err := OpenCluster(s.Cluster, s.Watch.Push, a.unitDirs, a.log)
		if err != nil {
			return nil, err
		}
		deliver = &Publisher{Store: store, Key: key, By: hostname(), SiteURL: s.Balance.SiteURL, CAFile: o.CAFile, Logger: a.log, Clock: a.clock}
		// Several balancer hosts: one orders at a time, the others take
		// what it published.
		is.Published = func(ctx context.Context) (*x509.Certificate, error) {
			b, err := store.Current(ctx)
			if err != nil || b == nil {
				return nil, err
			}
			return certs.FirstCertificate(b.ChainPEM)
		}
		lock := &PostgresLock{DSN: store.DSN(), Key: acmeLockKey, Name: "ACME order lock", Logger: a.log, Clock: a.clock}
		is.Lock = lock.Acquire
	} else if base.CAFile == "" {
		base.CAFile = o.CAFile
	}
	obs := issuer.Observer{NextRenewal: a.metrics.acmeNextRenewal, Failed: a.metrics.acmeFailed}
	return func(ctx context.Context) error {
		return is.Run(ctx, a.clock, func(ctx context.Context, cert, key string) error {
			o := base
			o.CertFile, o.KeyFile = cert, key
			res, err := deliver.Push(ctx, o)
			a.metrics.observePush(res, err)
			return err
		}, obs)
	}, nil
}

// OpenCluster opens the cluster's database and reads the cluster key.
func OpenCluster(c ClusterConfig, o push.Options, unitDirs []string, log *slog.Logger) (*clusterdb.Store, *clusterdb.Key, error) {
	store, err := OpenClusterStore(c, o, unitDirs, log)
	if err != nil {
		return nil, nil, err
	}
	key, err := clusterdb.LoadKey(c.WithDefaults().KeyFile)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", push.ErrUsage, err)
	}
	return store, key, nil
}

// OpenClusterStore opens the cluster's database: c.DSN, or Mattermost's
// own (its SqlSettings, or the environment of its service) where this host
// runs Mattermost.
func OpenClusterStore(c ClusterConfig, o push.Options, unitDirs []string, log *slog.Logger) (*clusterdb.Store, error) {
	dsn := c.DSN
	if dsn == "" {
		driver, mmDSN, err := mattermostDatabase(o.WithDefaults(), unitDirs)
		if err != nil {
			return nil, fmt.Errorf("%w: no cluster database given (--dsn or [cluster] dsn), and Mattermost's config cannot be read: %w", push.ErrUsage, err)
		}
		if driver == "mysql" {
			return nil, fmt.Errorf("%w: %w", push.ErrUsage, clusterdb.ErrMySQL)
		}
		dsn = mmDSN
	}
	if err := checkDSNFiles(dsn); err != nil {
		return nil, fmt.Errorf("%w: %w", push.ErrRefused, err)
	}
	store, err := clusterdb.Open(dsn, log)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", push.ErrUsage, err)
	}
	return store, nil
}

// advertise completes [cluster] advertise: the listen address, with this
// host's name where it has none.
func advertise(addr string, o push.Options) string {
	if addr != "" {
		return addr
	}
	host, port, err := net.SplitHostPort(o.WithDefaults().Listen)
	if err != nil {
		return ""
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = hostname()
	}
	return net.JoinHostPort(host, port)
}

// Reload loads the settings again (SIGHUP) and hands the running parts
// what changed: the watch loop its options, the balancer its upstreams and
// checks. What needs a restart (cluster coordination, the metrics address,
// adding or removing the watch or the balancer) is logged and kept as it
// is. On an error the running settings stay in force. Safe to call from
// any goroutine, after Run has started.
func (a *Agent) Reload() error {
	s, err := a.load()
	if err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	old := a.settings
	var changed []string
	if a.watcher != nil && !s.NoWatch && !reflect.DeepEqual(old.Watch, s.Watch) {
		a.watcher.Reload(s.Watch)
		old.Watch = s.Watch
		changed = append(changed, "watch")
	}
	if a.balancer != nil && s.Balance != nil && !reflect.DeepEqual(*old.Balance, *s.Balance) {
		if err := a.balancer.Reload(*s.Balance); err != nil {
			return err
		}
		old.Balance = s.Balance
		changed = append(changed, "balance")
	}
	if !reflect.DeepEqual(old.Cluster, s.Cluster) || old.MetricsListen != s.MetricsListen || old.NoWatch != s.NoWatch || (old.Balance == nil) != (s.Balance == nil) {
		a.log.Warn("some changed settings take effect at the next start: [cluster], [metrics], or adding or removing [source] or [balance]")
	}
	a.log.Info("configuration reloaded", "changed", changed)
	a.settings = old
	return nil
}
