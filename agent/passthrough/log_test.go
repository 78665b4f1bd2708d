package passthrough

import (
	"bufio"
	"context"
	"io"
	"log/slog"
	"testing"
	"time"
)

// records is a slog handler that hands every record to the test.
type records chan slog.Record

func (r records) Enabled(context.Context, slog.Level) bool { return true }
func (r records) Handle(_ context.Context, rec slog.Record) error {
	r <- rec
	return nil
}
func (r records) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r records) WithGroup(string) slog.Handler      { return r }

// next returns the next record with message msg, skipping others.
func (r records) next(t *testing.T, msg string) (slog.Level, map[string]string) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case rec := <-r:
			if rec.Message != msg {
				continue
			}
			attrs := map[string]string{}
			rec.Attrs(func(a slog.Attr) bool { attrs[a.Key] = a.Value.String(); return true })
			return rec.Level, attrs
		case <-timeout:
			t.Fatalf("no %q log line", msg)
			return 0, nil
		}
	}
}

// Each connection that reached a node ends with one info line: client,
// server name, node, bytes each way, duration and why it ended; refusals
// are info lines too.
func TestConnectionLog(t *testing.T) {
	a := newBackend(t, "a")
	logs := make(records, 100)
	cfg := Config{Upstreams: []Upstream{{Addr: a.addr()}}, LogConnections: true, Logger: slog.New(logs), DrainTimeout: 100 * time.Millisecond}
	bal, addr := start(t, cfg)

	// The client ends it, after the ClientHello (replayed: counted) and an
	// echo.
	hello := clientHello(t, "chat.example.test")
	c := dialFrom(t, "127.0.0.1", addr)
	c.Write(hello)
	r := bufio.NewReader(c)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	r.ReadString('\n')
	io.ReadFull(r, make([]byte, len(hello)))
	c.Close()
	level, got := logs.next(t, "connection closed")
	want := map[string]string{"client": c.LocalAddr().String(), "sni": "chat.example.test", "upstream": a.addr(),
		"bytes_up": itoa(len(hello)), "bytes_down": itoa(2 + len(hello)), "reason": "client closed"}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q (line %v)", k, got[k], v, got)
		}
	}
	if level != slog.LevelInfo || got["duration"] == "" {
		t.Errorf("level %s, line %v", level, got)
	}

	// The balancer ends it: the reason is the balancer's.
	c = dialFrom(t, "127.0.0.1", addr)
	defer c.Close()
	c.Write(hello)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	bufio.NewReader(c).ReadString('\n')
	if err := bal.Drain(a.addr()); err != nil {
		t.Fatal(err)
	}
	if _, got = logs.next(t, "connection closed"); got["reason"] != "drain deadline" {
		t.Errorf("drained connection's line: %v", got)
	}
	bal.Undrain(a.addr())

	// Not TLS: refused, at info.
	c = dialFrom(t, "127.0.0.1", addr)
	defer c.Close()
	io.WriteString(c, "GET / HTTP/1.0\r\n\r\n")
	if level, got = logs.next(t, "closing connection: no TLS ClientHello"); level != slog.LevelInfo || got["client"] != c.LocalAddr().String() {
		t.Errorf("refusal: level %s, %v", level, got)
	}
}

// With LogConnections off, a connection leaves no info line.
func TestConnectionLogOff(t *testing.T) {
	a := newBackend(t, "a")
	logs := make(records, 100)
	bal, addr := start(t, Config{Upstreams: []Upstream{{Addr: a.addr()}}, DisableSNIPeek: true, Logger: slog.New(logs)})
	c := dialFrom(t, "127.0.0.1", addr)
	greeting(t, c)
	c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for bal.Status()[0].Active > 0 { // the connection is over: whatever it logs is logged
		if time.Now().After(deadline) {
			t.Fatal("connection never ended")
		}
		time.Sleep(5 * time.Millisecond)
	}
	for len(logs) > 0 {
		if rec := <-logs; rec.Level >= slog.LevelInfo {
			t.Errorf("logged %s %q", rec.Level, rec.Message)
		}
	}
}
