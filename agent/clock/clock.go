// Package clock is the time source of the agent's loops and timeouts: the
// real clock in production, and in tests a fake one that moves only when
// told, so a test of a one-hour backoff takes microseconds and proves what
// did not happen without sleeping.
//
// It does not replace context deadlines: a network call's timeout is real
// time, whatever the clock.
package clock

import "time"

// Clock tells the time and makes timers and tickers. Implementations are
// safe for concurrent use.
type Clock interface {
	Now() time.Time
	// NewTimer is time.NewTimer: C receives once, d after now.
	NewTimer(d time.Duration) Timer
	// NewTicker is time.NewTicker: C receives every d (d > 0), dropping
	// ticks a slow reader misses.
	NewTicker(d time.Duration) Ticker
}

// Timer is a *time.Timer behind an interface. Stop and Reset have Go 1.23
// semantics: after either returns, C delivers no value from before.
type Timer interface {
	C() <-chan time.Time
	Stop() bool
	Reset(d time.Duration) bool
}

// Ticker is a *time.Ticker behind an interface.
type Ticker interface {
	C() <-chan time.Time
	Stop()
	Reset(d time.Duration)
}

// Real is the system clock.
type Real struct{}

// Now returns time.Now().
func (Real) Now() time.Time { return time.Now() }

// NewTimer returns a real timer.
func (Real) NewTimer(d time.Duration) Timer { return realTimer{time.NewTimer(d)} }

// NewTicker returns a real ticker.
func (Real) NewTicker(d time.Duration) Ticker { return realTicker{time.NewTicker(d)} }

type realTimer struct{ *time.Timer }

func (t realTimer) C() <-chan time.Time { return t.Timer.C }

type realTicker struct{ *time.Ticker }

func (t realTicker) C() <-chan time.Time { return t.Ticker.C }

// Or returns c, or Real when c is nil: the zero value of a struct with a
// Clock field uses the system clock.
func Or(c Clock) Clock {
	if c == nil {
		return Real{}
	}
	return c
}

// Since is time.Since on c.
func Since(c Clock, t time.Time) time.Duration { return c.Now().Sub(t) }
