package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/kardianos/service"
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
	t := time.NewTimer(orDefault(p.StopTimeout, DefaultStopTimeout))
	defer t.Stop()
	select {
	case <-done:
		return p.err
	case <-t.C:
		return fmt.Errorf("stop: the agent did not stop within %s", orDefault(p.StopTimeout, DefaultStopTimeout))
	}
}

// Agent is what `mmtls run` and `mmtls watch` run: the watch loop, the
// cluster restart lock and, when asked, the metrics endpoint.
type Agent struct {
	Watch WatchOptions
	// ClusterMode, ClusterDSN, LockWait and Splay: see ClusterConfig.
	ClusterMode, ClusterDSN string
	LockWait, Splay         time.Duration
	// MetricsListen, if set, serves Prometheus metrics there.
	MetricsListen string
	Logger        *slog.Logger
	// UnitDirs: see Pusher.
	UnitDirs []string
	// Balance, if not nil, runs the balancer beside the watch loop
	// (a [balance] section in the config file).
	Balance *BalanceService
	// NoWatch runs the balancer alone: a config file without [source].
	NoWatch bool

	watcher *Watcher
}

// Metrics returns the agent's metrics, shared with its balancer.
func (a *Agent) Metrics() *Metrics { return a.watcher.Metrics }

// NewAgent returns an agent; set its exported fields before Run.
func NewAgent(log *slog.Logger) *Agent {
	return &Agent{Logger: log, watcher: NewWatcher(&Pusher{Logger: log}, log, NewMetrics())}
}

// Run runs the agent until ctx is cancelled, and returns after everything
// it started has stopped. Call it once.
func (a *Agent) Run(ctx context.Context) error {
	log := logger(a.Logger)
	m := a.watcher.Metrics
	if a.NoWatch && a.Balance == nil {
		return usage(errors.New("nothing to run: the config has neither [source] nor [balance]"))
	}
	if !a.NoWatch {
		lock, err := NewRestartLock(a.ClusterMode, a.ClusterDSN, a.LockWait, a.Splay, a.Watch.Push, a.UnitDirs, log, m)
		if err != nil {
			return err
		}
		if lock != nil {
			log.Info("restarts are coordinated across the cluster", "with", lock.String())
		}
		// The loop is not running yet: nothing else reads the Pusher.
		a.watcher.Pusher.UnitDirs, a.watcher.Pusher.Cluster = a.UnitDirs, lock
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if a.MetricsListen != "" {
		wait, err := StartMetrics(ctx, a.MetricsListen, m, log)
		if err != nil {
			return err
		}
		defer wait()
		defer cancel() // runs first: stops the server, then waits for it
	}
	if a.Balance == nil {
		return a.watcher.Run(ctx, a.Watch)
	}
	a.Balance.Metrics = m
	errc := make(chan error, 2)
	running := 1
	go func() { errc <- a.Balance.Run(ctx) }()
	if !a.NoWatch {
		running++
		go func() { errc <- a.watcher.Run(ctx, a.Watch) }()
	}
	var first error
	for range running {
		if err := <-errc; err != nil && first == nil {
			first = err
			cancel() // one failed: stop the other
		}
	}
	return first
}

// Reload hands the watch loop new options (SIGHUP). Safe to call from
// any goroutine, before or during Run.
func (a *Agent) Reload(o WatchOptions) { a.watcher.Reload(o) }
