package clock

import (
	"sort"
	"sync"
	"time"
)

// Fake is a Clock that stands still until Advance moves it. Timers and
// tickers due by then fire in the order they are due, each with the time it
// was due. Safe for concurrent use; the zero value is not usable (NewFake).
type Fake struct {
	mu      sync.Mutex
	now     time.Time
	waiters []*fakeWaiter // armed timers and tickers; guarded by mu
	armed   chan struct{} // closed and replaced whenever a waiter is armed
}

// NewFake returns a fake clock reading start.
func NewFake(start time.Time) *Fake {
	return &Fake{now: start, armed: make(chan struct{})}
}

type fakeWaiter struct {
	f      *Fake
	c      chan time.Time
	when   time.Time
	period time.Duration // 0 for a timer
}

// Now returns the fake time.
func (f *Fake) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

// NewTimer returns a timer that fires when the fake time reaches now+d.
func (f *Fake) NewTimer(d time.Duration) Timer {
	w := &fakeWaiter{f: f, c: make(chan time.Time, 1)}
	w.reset(d, 0)
	return (*fakeTimer)(w)
}

// NewTicker returns a ticker on the fake time.
func (f *Fake) NewTicker(d time.Duration) Ticker {
	if d <= 0 {
		panic("clock: non-positive interval for NewTicker")
	}
	w := &fakeWaiter{f: f, c: make(chan time.Time, 1)}
	w.reset(d, d)
	return (*fakeTicker)(w)
}

// Advance moves the fake time forward by d, firing what falls due.
func (f *Fake) Advance(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	end := f.now.Add(d)
	for {
		sort.SliceStable(f.waiters, func(i, j int) bool { return f.waiters[i].when.Before(f.waiters[j].when) })
		if len(f.waiters) == 0 || f.waiters[0].when.After(end) {
			break
		}
		w := f.waiters[0]
		f.now = w.when
		select {
		case w.c <- w.when:
		default: // a ticker whose reader is behind drops the tick, as time.Ticker does
		}
		if w.period > 0 {
			w.when = w.when.Add(w.period)
		} else {
			f.waiters = f.waiters[1:]
		}
	}
	f.now = end
}

// Armed returns how many timers and tickers are waiting to fire.
func (f *Fake) Armed() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.waiters)
}

// Next returns how long until the next timer or ticker fires, and false
// when none is armed.
func (f *Fake) Next() (time.Duration, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.waiters) == 0 {
		return 0, false
	}
	next := f.waiters[0].when
	for _, w := range f.waiters[1:] {
		if w.when.Before(next) {
			next = w.when
		}
	}
	return next.Sub(f.now), true
}

// ArmedChanged returns a channel closed the next time a timer or ticker is
// armed (made, reset): a test waits on it for the code under test to
// reach its next wait, instead of sleeping.
func (f *Fake) ArmedChanged() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.armed
}

// reset arms w for d from now (and every period after, for a ticker), and
// drops a value not yet received, as Go 1.23's Reset does. It reports
// whether w was armed.
func (w *fakeWaiter) reset(d, period time.Duration) bool {
	f := w.f
	f.mu.Lock()
	defer f.mu.Unlock()
	was := w.removeLocked()
	w.drain()
	w.when, w.period = f.now.Add(max(d, 0)), period
	f.waiters = append(f.waiters, w)
	close(f.armed)
	f.armed = make(chan struct{})
	return was
}

func (w *fakeWaiter) stop() bool {
	w.f.mu.Lock()
	defer w.f.mu.Unlock()
	was := w.removeLocked()
	w.drain()
	return was
}

func (w *fakeWaiter) removeLocked() bool {
	for i, o := range w.f.waiters {
		if o == w {
			w.f.waiters = append(w.f.waiters[:i], w.f.waiters[i+1:]...)
			return true
		}
	}
	return false
}

func (w *fakeWaiter) drain() {
	select {
	case <-w.c:
	default:
	}
}

type fakeTimer fakeWaiter

func (t *fakeTimer) C() <-chan time.Time        { return t.c }
func (t *fakeTimer) Stop() bool                 { return (*fakeWaiter)(t).stop() }
func (t *fakeTimer) Reset(d time.Duration) bool { return (*fakeWaiter)(t).reset(d, 0) }

type fakeTicker fakeWaiter

func (t *fakeTicker) C() <-chan time.Time { return t.c }
func (t *fakeTicker) Stop()               { (*fakeWaiter)(t).stop() }
func (t *fakeTicker) Reset(d time.Duration) {
	if d <= 0 {
		panic("clock: non-positive interval for Ticker.Reset")
	}
	(*fakeWaiter)(t).reset(d, d)
}
