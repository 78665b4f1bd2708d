package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/mmtls/mmtls/agent/clock"
	"github.com/mmtls/mmtls/agent/clusterdb"
	"github.com/mmtls/mmtls/agent/push"
	"github.com/mmtls/mmtls/certs"
)

// errHalted is the lock's refusal once the bundle halted while this node
// waited for its turn: the push puts back what it installed.
var errHalted = errors.New("the rollout halted while this node waited for its turn")

// Follower is a node of a cluster rollout: it takes the newest bundle the
// publisher stored in the cluster's database, when it is rolling, and
// pushes it through the push pipeline, one node at a time (the restart
// lock); the first node whose push fails halts the rollout, and the others
// keep what they serve. It reports its state and a heartbeat in the
// database. Set the fields, then call Run once.
type Follower struct {
	Store *clusterdb.Store
	Key   *clusterdb.Key
	// Pusher pushes each bundle; its Cluster lock is wrapped so that a
	// node waiting for its turn gives up once the rollout halted.
	Pusher *push.Pusher
	// Push is the push settings; CertFile and KeyFile are set per bundle.
	Push push.Options
	// Node names this node; Address is where its Mattermost serves TLS as
	// the balancer reaches it.
	Node, Address string
	// Reconcile is how often the database is looked at without a
	// notification, and the heartbeat. 0 means DefaultReconcile.
	Reconcile time.Duration
	Version   string
	Logger    *slog.Logger // nil discards
	Metrics   *Metrics     // nil records nothing
	Clock     clock.Clock  // nil: the system clock

	tried  string // bundle id and attempt last tried, not again until it changes; Run's goroutine only
	halted int64  // bundle whose halt was logged; Run's goroutine only

	mu        sync.Mutex     // guards the fields below, which the heartbeat reports
	node      clusterdb.Node // what this node says of itself
	installed int64          // bundle in force here
	served    string         // its leaf, as verified
}

// Run follows the rollout until ctx is cancelled. A push in flight then
// finishes or rolls back first.
func (f *Follower) Run(ctx context.Context) error {
	log, clk := logger(f.Logger), clock.Or(f.Clock)
	every := f.Reconcile
	if every <= 0 {
		every = DefaultReconcile
	}
	o := f.Push.WithDefaults()
	for attempt := 0; ; attempt++ {
		err := f.Store.Migrate(ctx)
		if err == nil {
			break
		}
		if attempt == 0 {
			log.Warn("cannot prepare the cluster database yet; retrying", "db", f.Store.Redacted(), "err", err)
		}
		t := clk.NewTimer(min(time.Duration(attempt+1)*time.Second, time.Minute))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C():
		}
	}
	installed, served := f.installedHere(o)
	f.setInstalled(installed, served)
	f.Pusher.Cluster = &haltAwareLock{inner: f.Pusher.Cluster, f: f}
	notes := make(chan struct{}, 1)
	lctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); f.Store.Listen(lctx, notes) }()
	defer func() { stop(); <-done }()
	tick := clk.NewTicker(every)
	defer tick.Stop()
	log.Info("following the cluster's certificate", "node", f.Node, "address", f.Address, "db", f.Store.Redacted(), "key_id", f.Key.ID())
	f.report(ctx, clusterdb.NodeIdle, "", "")
	// The heartbeat goes on while a push waits for the lock or restarts:
	// a node that stopped beating would be left out of the rollout.
	beat := make(chan struct{})
	go func() {
		defer close(beat)
		t := clk.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-lctx.Done():
				return
			case <-t.C():
				f.beat(lctx)
			}
		}
	}()
	defer func() { stop(); <-beat }()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-notes:
		case <-tick.C():
		}
		f.step(ctx, o)
	}
}

// step looks at the current bundle and applies it when it is for this
// node to take; otherwise it reports a heartbeat.
func (f *Follower) step(ctx context.Context, o push.Options) {
	log := logger(f.Logger)
	b, err := f.Store.Current(ctx)
	if err != nil {
		log.Debug("cannot read the current bundle; the listener reports the database's state", "err", err)
		return
	}
	f.Metrics.bundleSeen(b)
	if nodes, err := f.Store.Nodes(ctx); err == nil && b != nil {
		rows := make([]clusterNode, 0, len(nodes))
		for _, n := range nodes {
			rows = append(rows, clusterNode{name: n.Node, silent: clock.Since(clock.Or(f.Clock), n.Heartbeat) > 3*n.HeartbeatEvery, current: n.InstalledBundle == b.ID})
		}
		f.Metrics.clusterNodes(rows)
	}
	switch {
	case b == nil || b.ID == f.installedID():
		f.report(ctx, clusterdb.NodeIdle, "", "")
		if b != nil && b.State == clusterdb.StateRolling {
			f.Store.Complete(ctx, b.ID)
		}
		return
	case b.State == clusterdb.StateHalted:
		if f.halted != b.ID {
			f.halted = b.ID
			log.Warn("the rollout is halted; keeping the previous certificate", "bundle", b.ID, "halted_by", b.HaltedBy, "reason", b.HaltReason)
		}
		f.report(ctx, clusterdb.NodeIdle, "", "")
		return
	}
	attempt := fmt.Sprintf("%d/%d", b.ID, b.Attempt)
	if f.tried == attempt {
		f.report(ctx, clusterdb.NodeIdle, "", "") // failed here already; waits for a retry
		return
	}
	f.tried = attempt
	f.apply(ctx, o, b)
}

// apply unseals b and pushes it.
func (f *Follower) apply(ctx context.Context, o push.Options, b *clusterdb.Bundle) {
	log := logger(f.Logger).With("bundle", b.ID, "fingerprint", b.LeafFingerprint)
	keyPEM, err := f.Key.Open(b.KeySealed, b.KeyID, b.Identity())
	if err != nil {
		// This node's key is wrong, not the bundle: nothing is installed
		// and the rollout goes on elsewhere; status shows this node.
		log.Error("cannot unseal the bundle; nothing installed", "err", err)
		f.report(ctx, clusterdb.NodeFailed, "refused", err.Error())
		return
	}
	cert, key, err := f.writeSource(o.StateDir, b.ChainPEM, keyPEM)
	clear(keyPEM)
	if err != nil {
		log.Error("cannot stage the bundle", "err", err)
		f.report(ctx, clusterdb.NodeFailed, "failed", err.Error())
		return
	}
	o.CertFile, o.KeyFile = cert, key
	log.Info("applying the cluster's bundle")
	res, err := f.Pusher.Push(ctx, o)
	f.Metrics.observePush(res, err)
	switch {
	case err == nil:
		f.setInstalled(b.ID, res.Certificate.Fingerprint)
		f.Metrics.certNotAfter(res.Certificate.NotAfter)
		log.Info("the bundle is in force here", "status", res.Status)
		f.report(ctx, clusterdb.NodeIdle, "ok", string(res.Status))
		f.Store.Complete(ctx, b.ID)
	case errors.Is(err, errHalted):
		log.Info("the rollout halted before this node's turn; the previous certificate stays", "err", err)
		f.tried = "" // take it if it is retried
		f.report(ctx, clusterdb.NodeIdle, "skipped", "rollout halted before this node's turn")
	default:
		state := clusterdb.NodeFailed
		if errors.Is(err, push.ErrRolledBack) {
			state = clusterdb.NodeRolledBack
		}
		log.Error("the bundle failed here; halting the rollout", "err", err)
		if herr := f.Store.Halt(ctx, b.ID, f.Node, err.Error()); herr != nil {
			log.Error("could not record the halt", "err", herr)
		}
		f.report(ctx, state, "failed", err.Error())
	}
}

// writeSource stages the bundle as a source pair in the state directory,
// root's alone, for the push to read.
func (f *Follower) writeSource(stateDir string, chain, key []byte) (string, string, error) {
	dir := filepath.Join(stateDir, "cluster")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", "", err
	}
	d, err := certs.OpenDir(dir)
	if err != nil {
		return "", "", err
	}
	defer d.Close()
	attrs := certs.FileAttrs{UID: os.Geteuid(), GID: os.Getegid(), Mode: 0o600}
	if err := d.WriteFile("fullchain.pem", chain, attrs); err != nil {
		return "", "", err
	}
	if err := d.WriteFile("privkey.pem", key, attrs); err != nil {
		return "", "", err
	}
	return d.Join("fullchain.pem"), d.Join("privkey.pem"), nil
}

// installedHere finds, at start, the bundle in force from the pair staged
// last time (so a restarted agent does not push it again).
func (f *Follower) installedHere(o push.Options) (int64, string) {
	pair, err := certs.LoadPair(filepath.Join(o.StateDir, "cluster", "fullchain.pem"), filepath.Join(o.StateDir, "cluster", "privkey.pem"))
	if err != nil {
		return 0, ""
	}
	b, err := f.Store.Current(context.Background())
	if err != nil || b == nil || b.LeafFingerprint != certs.Fingerprint(pair.Leaf()) {
		return 0, "" // not the current one: let the push decide (it is a no-op if in place)
	}
	return b.ID, b.LeafFingerprint
}

func (f *Follower) setInstalled(id int64, served string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.installed, f.served = id, served
}

func (f *Follower) installedID() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.installed
}

// report records a new state and sends it with a heartbeat.
func (f *Follower) report(ctx context.Context, state, result, msg string) {
	every := f.Reconcile
	if every <= 0 {
		every = DefaultReconcile
	}
	f.mu.Lock()
	f.node = clusterdb.Node{Node: f.Node, Address: f.Address, InstalledBundle: f.installed, Served: f.served,
		State: state, Result: result, Message: msg, Version: f.Version, HeartbeatEvery: every}
	f.mu.Unlock()
	f.beat(ctx)
}

// beat sends the last reported state again, with a fresh heartbeat.
func (f *Follower) beat(ctx context.Context) {
	f.mu.Lock()
	n := f.node
	f.mu.Unlock()
	if err := f.Store.Report(ctx, n); err != nil {
		logger(f.Logger).Debug("cannot report to the cluster database", "err", err)
	}
}

// haltAwareLock is the restart lock of a follower's pushes: once it has
// the lock, it checks that the bundle is still rolling, so a node that
// waited behind a failing one does not restart into a halted bundle.
type haltAwareLock struct {
	inner push.RestartLock // or nil
	f     *Follower
}

func (l *haltAwareLock) String() string {
	if l.inner == nil {
		return "cluster rollout"
	}
	return l.inner.String()
}

func (l *haltAwareLock) Acquire(ctx context.Context) (func(), error) {
	f := l.f
	f.report(ctx, clusterdb.NodeWaiting, "", "")
	release := func() {}
	if l.inner != nil {
		r, err := l.inner.Acquire(ctx)
		if err != nil {
			return nil, err
		}
		release = r
	}
	b, err := f.Store.Current(ctx)
	if err == nil && b != nil && b.State == clusterdb.StateHalted {
		release()
		return nil, fmt.Errorf("%w (at %s: %s)", errHalted, b.HaltedBy, b.HaltReason)
	}
	f.report(ctx, clusterdb.NodeRestarting, "", "")
	return release, nil
}
