package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/mmtls/mmtls/agent/clock"
	"github.com/mmtls/mmtls/agent/push"
	"github.com/mmtls/mmtls/certs"
)

// Defaults of WatchOptions.
const (
	// DefaultQuiet outlasts certbot's renewal, which replaces the live/
	// links one at a time within milliseconds, and an editor's
	// write-then-rename, so a renewal is pushed once, complete.
	DefaultQuiet = 5 * time.Second
	// DefaultMaxWait bounds the quiet wait while changes keep coming (a
	// script rewriting the pair in a loop still gets it pushed).
	DefaultMaxWait = time.Minute
	// DefaultReconcile catches what notifications miss (NFS, an inotify
	// overflow, a Mattermost restarted with other files) within minutes.
	DefaultReconcile = 10 * time.Minute
	// DefaultReportMismatchAfter is longer than any renewal takes: a pair
	// that stays inconsistent longer is broken, not mid-renewal.
	DefaultReportMismatchAfter = 10 * time.Minute
	// DefaultBackoffMin and DefaultBackoffMax bound the retries after a
	// failed push: each restarts Mattermost, so they must not come fast,
	// and a cause fixed at night is picked up within half an hour.
	DefaultBackoffMin = 30 * time.Second
	DefaultBackoffMax = 30 * time.Minute
	// DefaultMaxRestartsPerHour caps restarts caused by pushes: a renewal
	// takes one; more than four an hour is a loop, not renewals.
	DefaultMaxRestartsPerHour = 4
	// DefaultExpiryWarning matches the warning push gives.
	DefaultExpiryWarning = certs.DefaultExpiryWarning
	// expiryCheckEvery is how often the expiry warning is repeated.
	expiryCheckEvery = 24 * time.Hour
)

// WatchOptions configures the watch loop; its fields, but Push, are the
// keys of the config file's [watch] section. Zero values mean the defaults
// above; a negative Reconcile disables the periodic reconcile and a
// negative MaxRestartsPerHour the restart cap.
type WatchOptions struct {
	// Push is what each push does; its CertFile and KeyFile are the source
	// pair that is watched. The config file sets it in [source] and [push].
	Push push.Options `toml:"-"`
	// Quiet is how long the source must stay unchanged before it is read;
	// MaxWait bounds that wait while changes keep coming.
	Quiet   time.Duration `toml:"quiet"`
	MaxWait time.Duration `toml:"max_wait"`
	// Reconcile is how often the installed pair is compared with the source
	// even without events (NFS, inotify overflow).
	Reconcile time.Duration `toml:"reconcile"`
	// ReportMismatchAfter is how long an inconsistent source pair (a key
	// that does not match, a half-written file) is retried quietly before
	// it is reported.
	ReportMismatchAfter time.Duration `toml:"report_mismatch_after"`
	// BackoffMin and BackoffMax bound the exponential backoff after a
	// failed push.
	BackoffMin time.Duration `toml:"backoff_min"`
	BackoffMax time.Duration `toml:"backoff_max"`
	// MaxRestartsPerHour caps Mattermost restarts.
	MaxRestartsPerHour int `toml:"max_restarts_per_hour"`
	// ExpiryWarning: a warning is logged once a day while the installed
	// certificate expires within this.
	ExpiryWarning time.Duration `toml:"expiry_warning"`
}

// WithDefaults returns o with zero fields set to their defaults.
func (o WatchOptions) WithDefaults() WatchOptions {
	o.Push = o.Push.WithDefaults()
	set := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	set(&o.Quiet, DefaultQuiet)
	set(&o.MaxWait, DefaultMaxWait)
	set(&o.Reconcile, DefaultReconcile)
	set(&o.ReportMismatchAfter, DefaultReportMismatchAfter)
	set(&o.BackoffMin, DefaultBackoffMin)
	set(&o.BackoffMax, DefaultBackoffMax)
	set(&o.ExpiryWarning, DefaultExpiryWarning)
	if o.MaxRestartsPerHour == 0 {
		o.MaxRestartsPerHour = DefaultMaxRestartsPerHour
	}
	if o.MaxWait < o.Quiet {
		o.MaxWait = o.Quiet
	}
	return o
}

// Pusher runs one push; *push.Pusher is the real one.
type Pusher interface {
	Push(ctx context.Context, o push.Options) (*push.Result, error)
}

// Watcher runs the watch loop: it pushes the source pair whenever a
// consistent new one appears, and at start if it is not in place.
type Watcher struct {
	Pusher Pusher
	// Logger receives the loop's transitions. Nil discards.
	Logger *slog.Logger
	// Metrics, if not nil, is updated as the loop runs.
	Metrics *Metrics
	// Clock drives the quiet period, backoff, restart cap, reconcile and
	// expiry warning. Nil means the system clock.
	Clock clock.Clock

	reload chan WatchOptions
}

// NewWatcher returns a Watcher that pushes with p.
func NewWatcher(p Pusher, log *slog.Logger, m *Metrics) *Watcher {
	return &Watcher{Pusher: p, Logger: log, Metrics: m, reload: make(chan WatchOptions, 1)}
}

// Reload hands the running loop new options (SIGHUP). It does not block;
// a reload not yet picked up is replaced.
func (w *Watcher) Reload(o WatchOptions) {
	select {
	case <-w.reload:
	default:
	}
	w.reload <- o
}

// watchLoop is the loop's state, owned by the goroutine running Run.
type watchLoop struct {
	w   *Watcher
	log *slog.Logger
	o   WatchOptions
	fsw *fsnotify.Watcher

	dirs  map[string]bool // directories watched
	names map[string]bool // base names whose events matter

	clock        clock.Clock
	timer        clock.Timer
	pendingSince time.Time // first event of the current burst; zero when idle

	pushed        string // source identity last pushed successfully
	refused       string // source identity last refused: not retried until it changes
	failures      int    // consecutive failed pushes
	mismatchSince time.Time
	reported      bool
	restarts      []time.Time
	capLogged     bool
	notAfter      time.Time // installed leaf's expiry, from the last push
}

// Run watches until ctx is cancelled. A push in flight when ctx is
// cancelled finishes or rolls back; Run returns after it.
func (w *Watcher) Run(ctx context.Context, o WatchOptions) error {
	if w.reload == nil {
		w.reload = make(chan WatchOptions, 1)
	}
	fsw, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watch: %w", err)
	}
	defer fsw.Close()
	l := newWatchLoop(w, o.WithDefaults(), fsw)
	if err := l.o.Push.Validate(); err != nil {
		return err
	}
	if err := l.sourceExists(ctx); err != nil {
		return err
	}
	l.rearm()
	l.log.Info("watching the source pair", "cert", l.o.Push.CertFile, "key", l.o.Push.KeyFile, "dirs", l.watchedDirs())

	l.timer = l.clock.NewTimer(0) // provision at start
	defer l.timer.Stop()
	reconcile := newTicker(l.clock, l.o.Reconcile)
	defer reconcile.Stop()
	daily := l.clock.NewTicker(expiryCheckEvery)
	defer daily.Stop()

	for {
		select {
		case <-ctx.Done():
			l.log.Info("watch stopped")
			return nil
		case ev, ok := <-fsw.Events:
			if !ok {
				return errors.New("watch: file notification channel closed")
			}
			l.event(ev)
		case err, ok := <-fsw.Errors:
			if !ok {
				return errors.New("watch: file notification channel closed")
			}
			// An overflow loses events: look at the source now.
			l.log.Warn("file notification error; checking the source", "err", err)
			l.rearm()
			l.schedule(l.o.Quiet)
		case <-l.timer.C():
			l.process(ctx, false)
		case <-reconcile.C():
			l.process(ctx, true)
		case <-daily.C():
			l.checkExpiry()
		case no := <-w.reload:
			l.o = no.WithDefaults()
			l.refused = ""
			reconcile.Stop()
			reconcile = newTicker(l.clock, l.o.Reconcile)
			l.rearm()
			l.log.Info("watch options reloaded", "cert", l.o.Push.CertFile, "key", l.o.Push.KeyFile)
			l.schedule(0)
		}
	}
}

func newWatchLoop(w *Watcher, o WatchOptions, fsw *fsnotify.Watcher) *watchLoop {
	return &watchLoop{w: w, log: logger(w.Logger), o: o, fsw: fsw, clock: clock.Or(w.Clock), dirs: map[string]bool{}}
}

// sourceExists fails fast when a source file is missing at start: a typo
// in the config is told at once, not retried quietly for minutes. A pair
// caught mid-renewal (certbot swaps one link at a time) is looked at again
// after the quiet period before it counts as missing.
func (l *watchLoop) sourceExists(ctx context.Context) error {
	missing := func() []string {
		var m []string
		for _, f := range []struct{ flag, path string }{{"--cert (source.cert)", l.o.Push.CertFile}, {"--key (source.key)", l.o.Push.KeyFile}} {
			if _, err := os.Stat(f.path); errors.Is(err, fs.ErrNotExist) {
				m = append(m, fmt.Sprintf("%s %q does not exist", f.flag, f.path))
			}
		}
		return m
	}
	if len(missing()) == 0 {
		return nil
	}
	t := l.clock.NewTimer(l.o.Quiet)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return nil
	case <-t.C():
	}
	if m := missing(); len(m) > 0 {
		return fmt.Errorf("watch: %s; name the files certbot (or your CA's tooling) writes: %w", strings.Join(m, "; "), push.ErrUsage)
	}
	return nil
}

// newTicker returns a ticker for d, or a stopped one that never fires when
// d is negative.
func newTicker(c clock.Clock, d time.Duration) clock.Ticker {
	if d <= 0 {
		t := c.NewTicker(time.Hour)
		t.Stop()
		return t
	}
	return c.NewTicker(d)
}

// event handles one file notification: relevant ones (re)start the quiet
// period, bounded by MaxWait from the first event of the burst.
func (l *watchLoop) event(ev fsnotify.Event) {
	base := filepath.Base(ev.Name)
	if !l.names[base] && !strings.HasPrefix(base, "..") && !l.dirs[ev.Name] {
		return
	}
	l.w.Metrics.watchEvent()
	l.log.Debug("source event", "name", ev.Name, "op", ev.Op.String())
	l.rearm() // links may now point elsewhere; a directory may be back
	now := l.clock.Now()
	if l.pendingSince.IsZero() {
		l.pendingSince = now
	}
	wait := l.o.Quiet
	if left := l.o.MaxWait - now.Sub(l.pendingSince); left < wait {
		wait = max(left, 0)
	}
	l.schedule(wait)
}

// schedule makes the loop process the source d from now, replacing what
// was scheduled (Reset drops a value not yet received).
func (l *watchLoop) schedule(d time.Duration) { l.timer.Reset(d) }

// rearm watches the directories holding the source files and the targets
// of their links, or the nearest existing ancestor of one that is missing
// (so its re-creation is seen).
func (l *watchLoop) rearm() {
	want := map[string]bool{}
	names := map[string]bool{}
	add := func(path string) {
		names[filepath.Base(path)] = true
		for d := filepath.Dir(path); ; d = filepath.Dir(d) {
			if fi, err := os.Stat(d); err == nil && fi.IsDir() {
				want[d] = true
				return
			}
			names[filepath.Base(d)] = true
			if d == filepath.Dir(d) {
				return
			}
		}
	}
	for _, f := range []string{l.o.Push.CertFile, l.o.Push.KeyFile} {
		add(f)
		if r, err := filepath.EvalSymlinks(f); err == nil && r != f {
			add(r)
		}
	}
	for d := range want {
		if !l.dirs[d] {
			if err := l.fsw.Add(d); err != nil {
				l.log.Warn("cannot watch directory; relying on the periodic reconcile", "dir", d, "err", err)
				continue
			}
			l.dirs[d] = true
		}
	}
	for d := range l.dirs {
		if !want[d] {
			l.fsw.Remove(d) // fails harmlessly if the directory is gone
			delete(l.dirs, d)
		}
	}
	l.names = names
}

func (l *watchLoop) watchedDirs() []string {
	var out []string
	for d := range l.dirs {
		out = append(out, d)
	}
	return out
}

// process reads the source pair and pushes it if it is consistent and new
// (or, on reconcile, to check that what is installed is in force).
func (l *watchLoop) process(ctx context.Context, reconcile bool) {
	l.pendingSince = time.Time{}
	o := l.o
	pair, err := certs.LoadPair(o.Push.CertFile, o.Push.KeyFile)
	if err != nil {
		// Mid-renewal (certbot swaps the links one at a time) or
		// half-written: try again quietly, report only if it lasts.
		now := l.clock.Now()
		if l.mismatchSince.IsZero() {
			l.mismatchSince = now
		}
		if !l.reported && now.Sub(l.mismatchSince) >= o.ReportMismatchAfter {
			l.reported = true
			l.w.Metrics.sourceInconsistent(true)
			l.log.Error("the source pair has been unusable for a while; nothing is pushed until it is fixed",
				"since", l.mismatchSince, "err", err)
		} else {
			l.log.Debug("source pair not consistent yet; retrying", "err", err)
		}
		l.schedule(o.Quiet)
		return
	}
	if l.reported {
		l.log.Info("the source pair is usable again")
	}
	l.mismatchSince, l.reported = time.Time{}, false
	l.w.Metrics.sourceInconsistent(false)

	id := sourceID(pair)
	if id == l.refused {
		return // refused as it is; wait for it to change
	}
	if id == l.pushed && !reconcile {
		l.log.Debug("source unchanged since the last push") // a touch, a chmod
		return
	}
	if wait := l.restartCapWait(); wait > 0 {
		if !l.capLogged {
			l.capLogged = true
			l.log.Warn("restart cap reached; the push waits", "max_restarts_per_hour", o.MaxRestartsPerHour, "wait", wait.Round(time.Second))
		}
		l.w.Metrics.restartCap(true)
		l.schedule(wait)
		return
	}
	l.capLogged = false
	l.w.Metrics.restartCap(false)

	// Stopping the agent cancels a push that is still waiting (for the
	// lock, say), which then puts back what it installed; once Mattermost
	// is being restarted, the push runs to its end (see Pusher.Push).
	res, err := l.w.Pusher.Push(ctx, o.Push)
	l.w.Metrics.observePush(res, err)
	if res != nil && res.Restarted {
		l.restarts = append(l.restarts, l.clock.Now())
	}
	switch {
	case err == nil:
		l.pushed, l.failures = id, 0
		l.notAfter = pair.Leaf().NotAfter
		if res.Status != push.StatusUnchanged {
			l.log.Info("pushed the source pair", "status", res.Status, "fingerprint", res.Certificate.Fingerprint)
		}
		l.checkExpiry()
	case errors.Is(err, push.ErrRefused):
		l.refused = id
		l.log.Error("the source pair was refused; it is not retried until it changes", "err", err)
	case errors.Is(err, push.ErrUsage):
		l.refused = id
		l.log.Error("push settings are wrong; fix the config and reload", "err", err)
	case ctx.Err() != nil:
		l.log.Info("push stopped: the agent is stopping", "err", err)
	default:
		l.failures++
		backoff := o.BackoffMin << min(l.failures-1, maxBackoffDoublings)
		if backoff > o.BackoffMax || backoff <= 0 {
			backoff = o.BackoffMax
		}
		l.log.Error("push failed; retrying", "err", err, "failures", l.failures, "retry_in", backoff)
		l.schedule(backoff)
	}
}

// maxBackoffDoublings keeps the backoff shift from overflowing; BackoffMax
// caps it long before.
const maxBackoffDoublings = 20

// restartCapWait says how long until another restart is allowed.
func (l *watchLoop) restartCapWait() time.Duration {
	if l.o.MaxRestartsPerHour < 0 {
		return 0
	}
	now := l.clock.Now()
	kept := l.restarts[:0]
	for _, t := range l.restarts {
		if now.Sub(t) < time.Hour {
			kept = append(kept, t)
		}
	}
	l.restarts = kept
	if len(kept) < l.o.MaxRestartsPerHour {
		return 0
	}
	return time.Hour - now.Sub(kept[0])
}

func (l *watchLoop) checkExpiry() {
	if l.notAfter.IsZero() {
		return
	}
	l.w.Metrics.certNotAfter(l.notAfter)
	if left := l.notAfter.Sub(l.clock.Now()); left < l.o.ExpiryWarning {
		l.log.Warn("the installed certificate expires soon; is renewal working?", "not_after", l.notAfter, "days_left", int(left.Hours()/24))
	}
}

// sourceID identifies a pair by its content.
func sourceID(p *certs.Pair) string {
	kfp, _ := certs.PublicKeyFingerprint(p.Key.Public())
	return certs.Fingerprint(p.Leaf()) + "/" + kfp + "/" + certs.SHA256Hex(p.CertPEM)
}
