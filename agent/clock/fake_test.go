package clock

import (
	"testing"
	"time"
)

var epoch = time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)

func fired(c <-chan time.Time) (time.Time, bool) {
	select {
	case t := <-c:
		return t, true
	default:
		return time.Time{}, false
	}
}

func TestFakeTimer(t *testing.T) {
	f := NewFake(epoch)
	tm := f.NewTimer(5 * time.Second)
	f.Advance(4 * time.Second)
	if _, ok := fired(tm.C()); ok {
		t.Fatal("fired early")
	}
	f.Advance(time.Second)
	if at, ok := fired(tm.C()); !ok || !at.Equal(epoch.Add(5*time.Second)) {
		t.Fatalf("fired %v at %v", ok, at)
	}
	if f.Armed() != 0 {
		t.Errorf("a fired timer is still armed")
	}
	// Reset drops a value not received, as Go 1.23 does.
	tm.Reset(time.Second)
	f.Advance(time.Second)
	tm.Reset(time.Minute)
	if _, ok := fired(tm.C()); ok {
		t.Error("Reset left a stale value")
	}
	if d, ok := f.Next(); !ok || d != time.Minute {
		t.Errorf("Next = %v %v", d, ok)
	}
	if !tm.Stop() || tm.Stop() {
		t.Error("Stop reports wrongly whether the timer was armed")
	}
}

func TestFakeTickerOrderAndDrops(t *testing.T) {
	f := NewFake(epoch)
	tk := f.NewTicker(time.Second)
	tm := f.NewTimer(1500 * time.Millisecond)
	f.Advance(3 * time.Second)
	// Ticks at 1s, 2s and 3s: the reader was behind, so one is kept.
	if at, ok := fired(tk.C()); !ok || !at.Equal(epoch.Add(time.Second)) {
		t.Errorf("ticker: %v %v", ok, at)
	}
	if _, ok := fired(tm.C()); !ok {
		t.Error("timer due in the middle did not fire")
	}
	if !f.Now().Equal(epoch.Add(3 * time.Second)) {
		t.Errorf("Now = %v", f.Now())
	}
	tk.Stop()
	if f.Armed() != 0 {
		t.Errorf("armed after Stop: %d", f.Armed())
	}
}

func TestArmedChanged(t *testing.T) {
	f := NewFake(epoch)
	ch := f.ArmedChanged()
	select {
	case <-ch:
		t.Fatal("closed before anything was armed")
	default:
	}
	f.NewTimer(time.Second)
	select {
	case <-ch:
	default:
		t.Fatal("not closed when a timer was armed")
	}
}
