package passthrough

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// backend is an upstream on loopback: it says its name, then echoes.
type backend struct {
	name string
	ln   net.Listener
	wg   sync.WaitGroup
}

func newBackend(t *testing.T, name string) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{name: name, ln: ln}
	b.wg.Add(1)
	go b.serve()
	t.Cleanup(b.stop)
	return b
}

func (b *backend) serve() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			defer c.Close()
			io.WriteString(c, b.name+"\n")
			io.Copy(c, c)
		}()
	}
}

func (b *backend) addr() string { return b.ln.Addr().String() }
func (b *backend) stop()        { b.ln.Close() }

// start runs a balancer on a loopback listener and returns its address.
func start(t *testing.T, cfg Config) (*Balancer, string) {
	t.Helper()
	b, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- b.Serve(context.Background(), ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		b.Shutdown(ctx)
		if err := <-done; !errors.Is(err, ErrClosed) {
			t.Errorf("Serve returned %v, want ErrClosed", err)
		}
	})
	return b, ln.Addr().String()
}

// dialFrom connects to addr from the loopback source address src.
func dialFrom(t *testing.T, src, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func greeting(t *testing.T, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("read greeting: %v", err)
	}
	return strings.TrimSpace(line)
}

func raw(ups ...*backend) Config {
	cfg := Config{DisableSNIPeek: true}
	for _, u := range ups {
		cfg.Upstreams = append(cfg.Upstreams, Upstream{Addr: u.addr()})
	}
	return cfg
}

// Each client lands where nginx's ring puts its address.
func TestHashFollowsTheRing(t *testing.T) {
	a, b := newBackend(t, "a"), newBackend(t, "b")
	bal, addr := start(t, raw(a, b))
	names := map[string]string{a.addr(): "a", b.addr(): "b"}
	seen := map[string]int{}
	for i := 1; i <= 16; i++ {
		src := "127.0.0." + itoa(i)
		c := dialFrom(t, src, addr)
		got := greeting(t, c)
		c.Close()
		want := names[bal.cfg.Upstreams[bal.ring.Server(bal.ring.Start(src))].Addr]
		if got != want {
			t.Errorf("client %s went to %s, ring says %s", src, got, want)
		}
		seen[got]++
	}
	if len(seen) != 2 {
		t.Errorf("16 clients all went to one backend: %v", seen)
	}
}

func itoa(i int) string { return strconv.Itoa(i) }

// A dead upstream: every connection goes to the other, and the dead one
// is marked down.
func TestNextUpstream(t *testing.T) {
	a, b := newBackend(t, "a"), newBackend(t, "b")
	bal, addr := start(t, raw(a, b))
	a.stop()
	for i := 1; i <= 10; i++ {
		c := dialFrom(t, "127.0.0."+itoa(i), addr)
		if got := greeting(t, c); got != "b" {
			t.Errorf("connection %d went to %s", i, got)
		}
		c.Close()
	}
	for _, s := range bal.Status() {
		if s.Addr == a.addr() && !s.PassiveDown {
			t.Errorf("dead upstream not marked down: %+v", s)
		}
	}
}

// When every upstream is down, the connection that finds them so fails
// and the failure counts reset, so the next connection tries them again
// (nginx's "no live upstreams" recovery).
func TestNoLiveUpstreams(t *testing.T) {
	a, b := newBackend(t, "a"), newBackend(t, "b")
	addrA := a.addr()
	bal, addr := start(t, raw(a, b))
	a.stop()
	b.stop()
	fails := func() {
		t.Helper()
		c := dialFrom(t, "127.0.0.1", addr)
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("connection with no live upstream: %v", err)
		}
	}
	fails() // both tried, both marked down
	ln, err := net.Listen("tcp", addrA)
	if err != nil {
		t.Skipf("cannot listen on %s again: %v", addrA, err)
	}
	a2 := &backend{name: "a2", ln: ln}
	a2.wg.Add(1)
	go a2.serve()
	defer a2.stop()
	fails() // both still marked down: this one fails and resets the counts
	c := dialFrom(t, "127.0.0.1", addr)
	if got := greeting(t, c); got != "a2" {
		t.Errorf("after the reset got %q", got)
	}
	c.Close()
	_ = bal
}

// Half-closes are carried: the client's EOF reaches the backend, whose
// reply still comes back.
func TestHalfClose(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		data, _ := io.ReadAll(c) // until the client's half-close
		io.WriteString(c, "got "+string(data))
	}()
	_, addr := start(t, Config{DisableSNIPeek: true, Upstreams: []Upstream{{Addr: ln.Addr().String()}}})
	c := dialFrom(t, "127.0.0.1", addr)
	defer c.Close()
	io.WriteString(c, "request")
	c.(*net.TCPConn).CloseWrite()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	reply, err := io.ReadAll(c)
	if err != nil || string(reply) != "got request" {
		t.Errorf("reply %q, %v", reply, err)
	}
}

// A client that sends one byte of ClientHello and stalls is closed at the
// hello deadline.
func TestStalledClientHello(t *testing.T) {
	a := newBackend(t, "a")
	_, addr := start(t, Config{Upstreams: []Upstream{{Addr: a.addr()}}, HelloTimeout: 200 * time.Millisecond})
	c := dialFrom(t, "127.0.0.1", addr)
	defer c.Close()
	c.Write([]byte{0x16})
	start := time.Now()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := c.Read(make([]byte, 1))
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("stalled client not closed: %v", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("closed after %s", d)
	}
}

// An upstream that accepts but never answers the health check is down
// within fall x interval (with room for a loaded CI machine).
func TestActiveHealthDown(t *testing.T) {
	hung, _ := net.Listen("tcp", "127.0.0.1:0")
	defer hung.Close()
	a := newBackend(t, "a")
	cfg := Config{DisableSNIPeek: true, Upstreams: []Upstream{{Addr: hung.Addr().String()}, {Addr: a.addr()}},
		Health: HealthConfig{Mode: HealthTLS, ServerName: "chat.example.test", Interval: 100 * time.Millisecond, Fall: 3, Rise: 2}}
	bal, _ := start(t, cfg)
	started := time.Now()
	deadline := started.Add(5 * time.Second)
	for {
		st := bal.Status()
		if !st[0].Healthy {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("hung upstream still up after %s", time.Since(started))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if d := time.Since(started); d > 2*time.Second {
		t.Errorf("down after %s, want about fall x interval = 300ms", d)
	}
}

// Drain: no new connections to the node, live ones continue until the
// drain deadline.
func TestDrain(t *testing.T) {
	a, b := newBackend(t, "a"), newBackend(t, "b")
	cfg := raw(a, b)
	cfg.Method = MethodRoundRobin
	cfg.DrainTimeout = 300 * time.Millisecond
	bal, addr := start(t, cfg)
	var onA net.Conn
	for i := 0; i < 4 && onA == nil; i++ {
		c := dialFrom(t, "127.0.0.1", addr)
		if greeting(t, c) == "a" {
			onA = c
		} else {
			defer c.Close()
		}
	}
	if onA == nil {
		t.Fatal("round-robin never chose a")
	}
	defer onA.Close()
	if err := bal.Drain(a.addr()); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 4; i++ {
		c := dialFrom(t, "127.0.0.1", addr)
		if got := greeting(t, c); got != "b" {
			t.Errorf("new connection went to drained %s", got)
		}
		c.Close()
	}
	io.WriteString(onA, "still here\n")
	onA.SetReadDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(onA)
	if line, _ := r.ReadString('\n'); line != "still here\n" {
		t.Errorf("live connection broken by drain: %q", line)
	}
	// At the deadline it is closed.
	onA.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := r.ReadByte(); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("drained connection not closed at the deadline: %v", err)
	}
}

// Shutdown waits for live connections until its deadline, then closes them.
func TestShutdown(t *testing.T) {
	a := newBackend(t, "a")
	b, err := New(raw(a))
	if err != nil {
		t.Fatal(err)
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	done := make(chan error, 1)
	go func() { done <- b.Serve(context.Background(), ln) }()
	c := dialFrom(t, "127.0.0.1", ln.Addr().String())
	defer c.Close()
	greeting(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := b.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown = %v, want the deadline", err)
	}
	if err := <-done; !errors.Is(err, ErrClosed) {
		t.Errorf("Serve = %v", err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("connection still open after shutdown: %v", err)
	}
	if _, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
		t.Error("listener still accepting after shutdown")
	}
}

func TestControlSocket(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the control socket serves root only")
	}
	a, b := newBackend(t, "a"), newBackend(t, "b")
	bal, _ := start(t, raw(a, b))
	path := filepath.Join(t.TempDir(), "balance.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- bal.ServeControl(ctx, ln, 0) }()
	defer func() { cancel(); <-done }()
	resp, err := Control(ctx, path, ControlRequest{Command: "drain", Upstream: a.addr()})
	if err != nil || len(resp.Upstreams) != 2 || !resp.Upstreams[0].Draining {
		t.Errorf("drain: %+v %v", resp, err)
	}
	if _, err := Control(ctx, path, ControlRequest{Command: "drain", Upstream: "nope:1"}); err == nil || !strings.Contains(err.Error(), `no upstream "nope:1"`) {
		t.Errorf("drain of an unknown upstream: %v", err)
	}
	if _, err := Control(ctx, path, ControlRequest{Command: "reboot"}); err == nil {
		t.Error("unknown command accepted")
	}
}

// At MaxConns, the next connection waits (in the kernel's queue) until
// one ends, then is served.
func TestMaxConns(t *testing.T) {
	a := newBackend(t, "a")
	cfg := raw(a)
	cfg.MaxConns = 2
	b, addr := start(t, cfg)
	first := dialFrom(t, "127.0.0.1", addr)
	defer first.Close()
	second := dialFrom(t, "127.0.0.1", addr)
	defer second.Close()
	for _, c := range []net.Conn{first, second} {
		if g := greeting(t, c); g != "a" {
			t.Fatalf("greeting %q", g)
		}
	}
	third := dialFrom(t, "127.0.0.1", addr)
	defer third.Close()
	third.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := third.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a third connection at MaxConns 2 was served or closed: %v", err)
	}
	if n := b.ActiveConns(); n != 2 {
		t.Errorf("%d connections, want 2", n)
	}
	first.Close()
	if g := greeting(t, third); g != "a" {
		t.Fatalf("greeting after a slot freed: %q", g)
	}
}

// An upstream given by host name is dialled through Go's resolver.
func TestUpstreamByName(t *testing.T) {
	a := newBackend(t, "a")
	_, port, _ := net.SplitHostPort(a.addr())
	_, addr := start(t, Config{DisableSNIPeek: true, Upstreams: []Upstream{{Addr: "localhost:" + port}}})
	c := dialFrom(t, "127.0.0.1", addr)
	defer c.Close()
	if g := greeting(t, c); g != "a" {
		t.Fatalf("greeting %q", g)
	}
	io.WriteString(c, "ping\n")
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != "ping\n" {
		t.Fatalf("echo %q, %v", line, err)
	}
}

// An upstream that never answers the connect (its accept queue full, so
// the kernel drops the SYN) is given up at ConnectTimeout and the next
// one is tried.
func TestConnectTimeoutTriesNext(t *testing.T) {
	full := fullListener(t)
	b := newBackend(t, "b")
	// Round-robin: the first connection tries the first upstream (the
	// hash would pick by ports that change from run to run).
	cfg := Config{DisableSNIPeek: true, ConnectTimeout: 200 * time.Millisecond, Method: MethodRoundRobin,
		Upstreams: []Upstream{{Addr: full}, {Addr: b.addr()}}}
	bal, addr := start(t, cfg)
	for i := 1; i <= 6; i++ {
		c := dialFrom(t, "127.0.0."+itoa(i), addr)
		if got := greeting(t, c); got != "b" {
			t.Errorf("connection %d went to %s", i, got)
		}
		c.Close()
	}
	if s := bal.Status()[0]; !s.PassiveDown {
		t.Errorf("the upstream that never answered is not marked down: %+v", s)
	}
}

// fullListener listens with a backlog of one and never accepts; once two
// connections wait in it, further SYNs are dropped.
func fullListener(t *testing.T) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, _ := syscall.Getsockname(fd)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*syscall.SockaddrInet4).Port))
	for range 3 {
		d := net.Dialer{Timeout: 100 * time.Millisecond}
		if c, err := d.Dial("tcp", addr); err == nil {
			t.Cleanup(func() { c.Close() })
		}
	}
	return addr
}
