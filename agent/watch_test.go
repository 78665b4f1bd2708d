package agent

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/mmtls/mmtls/agent/clock"
	"github.com/mmtls/mmtls/agent/push"
	"github.com/mmtls/mmtls/test/fixture"
)

var epoch = time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)

// fakePusher records pushes and answers with next (nil: changed, restarted).
type fakePusher struct {
	mu    sync.Mutex
	calls []push.Options
	next  func(n int) (*push.Result, error)
	done  chan struct{} // receives after each push, if not nil
}

func (p *fakePusher) Push(_ context.Context, o push.Options) (*push.Result, error) {
	p.mu.Lock()
	p.calls = append(p.calls, o)
	n := len(p.calls)
	next := p.next
	p.mu.Unlock()
	defer func() {
		if p.done != nil {
			p.done <- struct{}{}
		}
	}()
	if next != nil {
		return next(n)
	}
	return &push.Result{Status: push.StatusChanged, Restarted: true}, nil
}

func (p *fakePusher) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.calls)
}

// loopFixture is a watch loop driven by hand: events and timer firings are
// delivered by the test, on a fake clock.
type loopFixture struct {
	t    *testing.T
	clk  *clock.Fake
	p    *fakePusher
	l    *watchLoop
	logs *bytes.Buffer
	pair *fixture.Pair
}

func newLoopFixture(t *testing.T, o WatchOptions) *loopFixture {
	t.Helper()
	pair, err := fixture.WritePair(t.TempDir(), epoch)
	if err != nil {
		t.Fatal(err)
	}
	o.Push.CertFile, o.Push.KeyFile = pair.CertFile, pair.KeyFile
	fsw, err := fsnotify.NewWatcher()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fsw.Close() })
	f := &loopFixture{t: t, clk: clock.NewFake(epoch), p: &fakePusher{}, logs: &bytes.Buffer{}, pair: pair}
	w := &Watcher{Pusher: f.p, Logger: slog.New(slog.NewTextHandler(f.logs, &slog.HandlerOptions{Level: slog.LevelDebug})), Clock: f.clk}
	f.l = newWatchLoop(w, o.WithDefaults(), fsw)
	f.l.timer = f.clk.NewTimer(time.Hour)
	f.l.timer.Stop()
	f.l.rearm()
	return f
}

// scheduled returns when the loop will next look at the source, or fails
// the test if nothing is scheduled.
func (f *loopFixture) scheduled() time.Duration {
	f.t.Helper()
	d, ok := f.clk.Next()
	if !ok {
		f.t.Fatal("nothing scheduled")
	}
	return d
}

// fire advances the clock to the scheduled time and runs the loop's
// handler for it, as Run's select would.
func (f *loopFixture) fire() {
	f.t.Helper()
	f.clk.Advance(f.scheduled())
	select {
	case <-f.l.timer.C():
	default:
		f.t.Fatal("the timer did not fire")
	}
	f.l.process(context.Background(), false)
}

func (f *loopFixture) event() {
	f.l.event(fsnotify.Event{Name: f.l.o.Push.CertFile, Op: fsnotify.Write})
}

func TestWatchDebounceAndMaxWait(t *testing.T) {
	f := newLoopFixture(t, WatchOptions{Quiet: 5 * time.Second, MaxWait: 12 * time.Second})
	f.event()
	if d := f.scheduled(); d != 5*time.Second {
		t.Fatalf("after one event: scheduled in %s, want the quiet period", d)
	}
	// Events every 4 s keep restarting the quiet period ...
	for range 2 {
		f.clk.Advance(4 * time.Second)
		f.event()
	}
	if d := f.scheduled(); d != 4*time.Second {
		// ... but 8 s into the burst, MaxWait (12 s) leaves 4 s.
		t.Fatalf("8s into the burst: scheduled in %s, want 4s (max wait)", d)
	}
	if f.p.count() != 0 {
		t.Fatal("pushed during the burst")
	}
	f.fire()
	if f.p.count() != 1 {
		t.Fatalf("%d pushes after the burst, want 1", f.p.count())
	}
	// The next burst measures its max wait from its own first event.
	f.clk.Advance(time.Minute)
	f.event()
	if d := f.scheduled(); d != 5*time.Second {
		t.Errorf("a new burst: scheduled in %s, want the quiet period", d)
	}
}

// An event that changes nothing (a touch) pushes nothing; a reconcile does.
func TestWatchUnchangedSourceIsNotPushedAgain(t *testing.T) {
	f := newLoopFixture(t, WatchOptions{})
	f.l.process(context.Background(), false)
	f.event()
	f.fire()
	if f.p.count() != 1 {
		t.Errorf("%d pushes, want 1: the second event changed nothing", f.p.count())
	}
	f.l.process(context.Background(), true)
	if f.p.count() != 2 {
		t.Errorf("a reconcile did not push")
	}
}

func TestWatchBackoff(t *testing.T) {
	f := newLoopFixture(t, WatchOptions{BackoffMin: 30 * time.Second, BackoffMax: 3 * time.Minute})
	f.p.next = func(int) (*push.Result, error) { return nil, errors.New("mattermost did not come back") }
	f.l.process(context.Background(), false)
	var got []time.Duration
	for range 5 {
		got = append(got, f.scheduled())
		f.fire()
	}
	want := []time.Duration{30 * time.Second, time.Minute, 2 * time.Minute, 3 * time.Minute, 3 * time.Minute}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("backoff %v, want %v", got, want)
		}
	}
	// A success resets it.
	f.p.next = nil
	f.l.process(context.Background(), true)
	f.p.next = func(int) (*push.Result, error) { return nil, errors.New("again") }
	f.l.process(context.Background(), true)
	if d := f.scheduled(); d != 30*time.Second {
		t.Errorf("after a success, the backoff starts at %s, want 30s", d)
	}
}

func TestWatchRefusedPairIsNotRetried(t *testing.T) {
	f := newLoopFixture(t, WatchOptions{})
	f.p.next = func(int) (*push.Result, error) { return nil, push.ErrRefused }
	f.l.process(context.Background(), false)
	f.l.process(context.Background(), true)
	if f.p.count() != 1 {
		t.Errorf("%d pushes of a refused pair, want 1", f.p.count())
	}
	if _, ok := f.clk.Next(); ok {
		t.Error("a retry is scheduled for a refused pair")
	}
}

func TestWatchRestartCap(t *testing.T) {
	f := newLoopFixture(t, WatchOptions{MaxRestartsPerHour: 2})
	for range 2 {
		f.l.process(context.Background(), true)
		f.clk.Advance(10 * time.Minute)
	}
	// A renewal arrives 20 minutes after the first restart.
	next, err := fixture.WritePair(t.TempDir(), epoch)
	if err != nil {
		t.Fatal(err)
	}
	for src, dst := range map[string]string{next.CertFile: f.pair.CertFile, next.KeyFile: f.pair.KeyFile} {
		data, _ := os.ReadFile(src)
		if err := os.WriteFile(dst, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	f.l.process(context.Background(), false)
	if f.p.count() != 2 {
		t.Fatalf("%d pushes, want 2: the cap is 2 restarts an hour", f.p.count())
	}
	// 20 minutes after the first restart, it waits 40 more.
	if d := f.scheduled(); d != 40*time.Minute {
		t.Fatalf("capped push scheduled in %s, want 40m", d)
	}
	if n := strings.Count(f.logs.String(), "restart cap reached"); n != 1 {
		t.Errorf("cap logged %d times, want once", n)
	}
	f.fire()
	if f.p.count() != 3 {
		t.Errorf("the push did not run once the hour had passed")
	}
}

func TestWatchMismatchReportedOnlyIfItLasts(t *testing.T) {
	f := newLoopFixture(t, WatchOptions{Quiet: time.Second, ReportMismatchAfter: 10 * time.Minute})
	other, err := fixture.WritePair(t.TempDir(), epoch)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := os.ReadFile(other.KeyFile)
	if err := os.WriteFile(f.pair.KeyFile, key, 0o600); err != nil { // mid-renewal: the key is new, the cert not yet
		t.Fatal(err)
	}
	f.l.process(context.Background(), false)
	for f.clk.Now().Sub(epoch) < 9*time.Minute {
		f.fire()
	}
	if strings.Contains(f.logs.String(), "unusable for a while") {
		t.Fatal("reported before report_mismatch_after")
	}
	for f.clk.Now().Sub(epoch) < 11*time.Minute {
		f.fire()
	}
	if n := strings.Count(f.logs.String(), "unusable for a while"); n != 1 {
		t.Fatalf("reported %d times after 11 minutes, want once", n)
	}
	if f.p.count() != 0 {
		t.Fatal("a mismatched pair was pushed")
	}
	cert, _ := os.ReadFile(other.CertFile)
	if err := os.WriteFile(f.pair.CertFile, cert, 0o600); err != nil {
		t.Fatal(err)
	}
	f.fire()
	if f.p.count() != 1 || !strings.Contains(f.logs.String(), "usable again") {
		t.Errorf("the repaired pair: %d pushes, log:\n%s", f.p.count(), f.logs)
	}
}

func TestWatchExpiryWarning(t *testing.T) {
	f := newLoopFixture(t, WatchOptions{ExpiryWarning: 21 * 24 * time.Hour})
	f.l.process(context.Background(), false)
	if strings.Contains(f.logs.String(), "expires soon") {
		t.Fatal("warned about a fresh certificate")
	}
	// The fixture's leaf is valid for a year: 350 days on, it is within 21.
	f.clk.Advance(350 * 24 * time.Hour)
	f.l.checkExpiry()
	if !strings.Contains(f.logs.String(), "expires soon") {
		t.Errorf("no expiry warning 15 days before expiry:\n%s", f.logs)
	}
}

// Run on the fake clock: provisioning at start, then a reload with another
// source pair, which is pushed at once.
func TestWatchRunReload(t *testing.T) {
	clk := clock.NewFake(epoch)
	p := &fakePusher{done: make(chan struct{}, 4)}
	a, err := fixture.WritePair(t.TempDir(), epoch)
	if err != nil {
		t.Fatal(err)
	}
	b, err := fixture.WritePair(t.TempDir(), epoch)
	if err != nil {
		t.Fatal(err)
	}
	var logs fixture.Buffer
	w := NewWatcher(p, slog.New(slog.NewTextHandler(&logs, nil)), nil)
	w.Clock = clk
	o := WatchOptions{Push: push.Options{CertFile: a.CertFile, KeyFile: a.KeyFile}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	armed := clk.ArmedChanged()
	go func() { done <- w.Run(ctx, o) }()
	<-armed // the loop has made its first timer
	clk.Advance(0)
	<-p.done
	w.Reload(WatchOptions{Push: push.Options{CertFile: b.CertFile, KeyFile: b.KeyFile}})
	// Wait until the loop has taken the reload and scheduled a look at the
	// source for now (its tickers are minutes away).
	for {
		armed := clk.ArmedChanged()
		if d, ok := clk.Next(); ok && d == 0 {
			break
		}
		<-armed
	}
	clk.Advance(0)
	<-p.done
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := p.calls[1].CertFile; got != b.CertFile {
		t.Errorf("after the reload pushed %s, want %s", got, b.CertFile)
	}
	if !strings.Contains(logs.String(), "watch options reloaded") {
		t.Errorf("no reload logged:\n%s", logs.String())
	}
}

// A source that does not exist at start is a usage error after one quiet
// period, not a quiet retry for minutes.
func TestWatchFailsFastOnAMissingSource(t *testing.T) {
	clk := clock.NewFake(epoch)
	w := NewWatcher(&fakePusher{}, nil, nil)
	w.Clock = clk
	dir := t.TempDir()
	o := WatchOptions{Quiet: 5 * time.Second, Push: push.Options{CertFile: filepath.Join(dir, "fullchain.pem"), KeyFile: filepath.Join(dir, "privekey.pem")}}
	done := make(chan error, 1)
	armed := clk.ArmedChanged()
	go func() { done <- w.Run(context.Background(), o) }()
	<-armed
	clk.Advance(5 * time.Second)
	err := <-done
	if !errors.Is(err, push.ErrUsage) || !strings.Contains(err.Error(), `--key (source.key) "`+filepath.Join(dir, "privekey.pem")+`" does not exist`) {
		t.Errorf("Run = %v, want a usage error naming --key", err)
	}
}
