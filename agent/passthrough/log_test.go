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

// A connection with no byte either way for IdleTimeout is closed, with
// that reason; one that keeps moving, even one way, is not.
func TestIdleTimeout(t *testing.T) {
	a := newBackend(t, "a")
	logs := make(records, 100)
	cfg := raw(a)
	cfg.IdleTimeout, cfg.LogConnections, cfg.Logger = 300*time.Millisecond, true, slog.New(logs)
	_, addr := start(t, cfg)

	busy := dialFrom(t, "127.0.0.1", addr)
	defer busy.Close()
	greeting(t, busy)
	for range 8 { // 800 ms of a byte every 100 ms, the echo read back
		busy.Write([]byte{'x'})
		if _, err := io.ReadFull(busy, make([]byte, 1)); err != nil {
			t.Fatalf("a connection in use was cut: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	quiet := dialFrom(t, "127.0.0.2", addr)
	defer quiet.Close()
	greeting(t, quiet)
	start := time.Now()
	quiet.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := quiet.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read on a quiet connection: %v, want its close", err)
	}
	if d := time.Since(start); d < 250*time.Millisecond {
		t.Errorf("closed after %s, before the idle timeout", d)
	}
	// The busy one, quiet since, goes the same way; each says why.
	for range 2 {
		if _, got := logs.next(t, "connection closed"); got["reason"] != "idle timeout" {
			t.Errorf("line %v, want an idle timeout", got)
		}
	}
}

// With SNIAllow, a ClientHello for another name is refused before any
// node is dialled; an allowed one is forwarded.
func TestSNIAllow(t *testing.T) {
	a := newBackend(t, "a")
	logs := make(records, 100)
	bal, addr := start(t, Config{Upstreams: []Upstream{{Addr: a.addr()}}, SNIAllow: []string{"chat.example.test"},
		LogConnections: true, Logger: slog.New(logs)})

	other := dialFrom(t, "127.0.0.1", addr)
	defer other.Close()
	other.Write(clientHello(t, "other.example.test"))
	other.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := other.Read(make([]byte, 1)); err == nil {
		t.Fatal("a name not allowed reached a node")
	}
	if _, got := logs.next(t, "closing connection: server name not allowed"); got["sni"] != "other.example.test" {
		t.Errorf("refusal line %v", got)
	}
	if n := bal.Status()[0].Total; n != 0 {
		t.Errorf("%d connections made to the node for a refused name", n)
	}

	allowed := dialFrom(t, "127.0.0.1", addr)
	defer allowed.Close()
	allowed.Write(clientHello(t, "Chat.Example.Test"))
	if g := greeting(t, allowed); g != "a" {
		t.Fatalf("greeting %q", g)
	}
}
