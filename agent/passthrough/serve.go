package passthrough

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"time"
)

// goroutinesOnly turns the event loops off: every listener is then
// served by a goroutine per direction (the tests run both ways).
var goroutinesOnly = false

// Serve accepts connections on ln and forwards them until Shutdown (then
// it returns ErrClosed) or ctx is cancelled. It owns ln and closes it. At
// MaxConns, or when accepting fails for lack of file descriptors, it pauses
// with backoff instead of spinning.
func (b *Balancer) Serve(ctx context.Context, ln net.Listener) error {
	var ll *loopListener
	if tl, ok := ln.(*net.TCPListener); ok && !goroutinesOnly && startLoops() == nil {
		if l, err := newLoopListener(tl); err == nil {
			ll, ln = l, l
		}
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		ln.Close()
		return ErrClosed
	}
	b.lns[ln] = struct{}{}
	b.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer func() {
		b.mu.Lock()
		delete(b.lns, ln)
		b.mu.Unlock()
		ln.Close()
	}()

	if ll != nil && b.slots == nil {
		return b.serveInLoops(ctx, ll)
	}
	if ll != nil {
		return b.serveLoop(ctx, ll)
	}
	var backoff time.Duration
	for {
		if err := b.acquire(ctx); err != nil {
			return err
		}
		c, err := ln.Accept()
		if err != nil {
			if err := b.acceptFailed(ctx, err, &backoff); err != nil {
				return err
			}
			continue
		}
		backoff = 0
		b.handlers.Add(1) // Done when the connection is over (see handle)
		go b.handle(c)
	}
}

// acceptFailed gives back the slot taken for a failed accept and says
// what Serve returns: ErrClosed after Shutdown, ctx's error, the
// listener's close; or nil after a pause (EMFILE, ENFILE...), doubling
// from 5ms to at most 1s, so that the accept loop never spins.
func (b *Balancer) acceptFailed(ctx context.Context, err error, backoff *time.Duration) error {
	b.release()
	switch {
	case b.isClosed():
		return ErrClosed
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, net.ErrClosed):
		return err
	}
	*backoff = min(max(2**backoff, 5*time.Millisecond), time.Second)
	b.log.Warn("accept failed; pausing", "err", err, "pause", *backoff)
	t := time.NewTimer(*backoff)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// acquire takes a MaxConns slot for the next accept, waiting for one.
func (b *Balancer) acquire(ctx context.Context) error {
	if b.slots == nil {
		return nil
	}
	select {
	case b.slots <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (b *Balancer) release() {
	if b.slots != nil {
		<-b.slots
	}
}

func (b *Balancer) isClosed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closed
}

// conn is one client connection and, once connected, its upstream.
type conn struct {
	client   net.Conn
	mu       sync.Mutex
	upstream net.Conn
	closed   bool
	reason   string // why the balancer closed it, if it did
	lc       *lconn // served by a loop (then client and upstream are nil)
}

func (c *conn) isClosing() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

func (c *conn) setUpstream(u net.Conn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.upstream = u
	return true
}

// close closes both sides, the balancer's reason for it noted if it is the
// first; safe to call more than once, from any goroutine.
func (c *conn) close(reason string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.closed, c.reason = true, reason
	if c.lc != nil {
		c.lc.l.post(loopWork{close: c.lc, reason: reason})
		return
	}
	c.client.Close()
	if c.upstream != nil {
		c.upstream.Close()
	}
}

// handle serves one client connection; it owns client. It peeks, picks
// and connects, then hands the connection to two fresh copy goroutines and
// returns: its own stack, grown by the dial and the peek, is not kept for
// the connection's idle life.
func (b *Balancer) handle(client net.Conn) {
	c := &conn{client: client}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		client.Close()
		b.release()
		b.handlers.Done()
		return
	}
	b.conns[c] = struct{}{}
	cfg := b.cfg
	b.mu.Unlock()
	var u *upstream
	start := time.Now()
	var sni string
	finish := func(out copied) {
		c.close("")
		if u != nil && cfg.LogConnections && b.log.Enabled(context.Background(), slog.LevelInfo) {
			b.logClosed(c, u, sni, start, out)
		}
		if u != nil {
			b.released(u, c)
		}
		b.mu.Lock()
		delete(b.conns, c)
		b.mu.Unlock()
		b.release()
		b.handlers.Done()
	}

	var hello []byte
	if !cfg.DisableSNIPeek {
		client.SetReadDeadline(time.Now().Add(cfg.helloTimeout()))
		h, name, err := peekClientHello(client)
		if err != nil {
			b.log.Log(context.Background(), cfg.refusalLevel(), "closing connection: no TLS ClientHello", "client", client.RemoteAddr().String(), "err", err)
			finish(copied{})
			return
		}
		client.SetReadDeadline(time.Time{})
		if len(cfg.SNIAllow) > 0 && !slices.Contains(cfg.SNIAllow, strings.ToLower(name)) {
			b.log.Log(context.Background(), cfg.refusalLevel(), "closing connection: server name not allowed", "client", client.RemoteAddr().String(), "sni", name)
			finish(copied{})
			return
		}
		hello, sni = h, name
	}

	var up net.Conn
	u, up = b.connect(c, clientKey(client.RemoteAddr()))
	if up == nil {
		b.log.Warn("closing connection", "client", client.RemoteAddr().String(), "sni", sni, "err", ErrNoLiveUpstreams)
		finish(copied{})
		return
	}
	if len(hello) > 0 {
		if _, err := up.Write(hello); err != nil {
			finish(copied{reason: writeFail[fromClient]})
			return
		}
		u.toUpstream.Add(int64(len(hello)))
	}
	forward(c.client, up, cfg.idleTimeout(), &u.toUpstream, &u.toClient, int64(len(hello)), finish)
}

// logClosed writes the one line of a connection that reached a node: who,
// where, what moved each way, how long, and why it ended (the balancer's
// reason, if it closed it, comes first).
func (b *Balancer) logClosed(c *conn, u *upstream, sni string, start time.Time, out copied) {
	c.mu.Lock()
	reason := c.reason
	c.mu.Unlock()
	if reason == "" {
		reason = out.reason
	}
	b.log.LogAttrs(context.Background(), slog.LevelInfo, "connection closed",
		slog.String("client", c.client.RemoteAddr().String()),
		slog.String("sni", sni),
		slog.String("upstream", u.Addr),
		slog.Int64("bytes_up", out.bytes[fromClient]),
		slog.Int64("bytes_down", out.bytes[fromUpstream]),
		slog.Duration("duration", time.Since(start).Round(time.Millisecond)),
		slog.String("reason", reason))
}

// connect dials upstreams in the method's order until one answers, within
// the tries and time budgets. Once connected, nothing is retried.
func (b *Balancer) connect(c *conn, key string) (*upstream, net.Conn) {
	b.mu.Lock()
	cfg := b.cfg
	n := len(b.ups)
	b.mu.Unlock()
	tries := cfg.NextUpstreamTries
	if tries <= 0 || tries > n {
		tries = n
	}
	deadline := time.Now().Add(cfg.nextTimeout())
	p := b.newPicker(key)
	for range tries {
		now := time.Now()
		if now.After(deadline) {
			return nil, nil
		}
		u := p.next(now)
		if u == nil {
			return nil, nil
		}
		// No TCP keep-alive probes toward the upstream (four setsockopt
		// calls per connection): the idle timeout ends dead connections.
		d := net.Dialer{Timeout: min(cfg.connectTimeout(), time.Until(deadline)), KeepAlive: -1}
		up, err := d.Dial("tcp", u.Addr)
		if err != nil {
			b.log.Debug("upstream connect failed; trying the next", "upstream", u.Addr, "err", err)
			b.failed(u, time.Now())
			continue
		}
		if !c.setUpstream(up) {
			up.Close()
			return nil, nil
		}
		b.succeeded(u, c)
		return u, up
	}
	return nil, nil
}

// clientKey is the client address as nginx prints $remote_addr: an IPv4
// client of a dual-stack listener in dotted form, as nginx's (IPv6-only by
// default) listeners see it.
func clientKey(a net.Addr) string {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.IP.String()
	}
	host, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	return host
}

// Shutdown stops accepting, stops health checks, waits for connections to
// end until ctx is done, then closes the rest, and returns once every
// connection handler has exited: http.Server's semantics.
func (b *Balancer) Shutdown(ctx context.Context) error {
	b.mu.Lock()
	b.closed = true
	for ln := range b.lns {
		ln.Close()
	}
	if b.health != nil {
		b.health()
	}
	for _, u := range b.ups {
		if u.drainTimer != nil {
			u.drainTimer.Stop()
		}
	}
	b.mu.Unlock()
	b.healthWG.Wait()

	done := make(chan struct{})
	go func() { b.handlers.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	b.mu.Lock()
	left := make([]*conn, 0, len(b.conns))
	for c := range b.conns {
		left = append(left, c)
	}
	b.mu.Unlock()
	b.log.Info("shutdown deadline passed; closing connections", "connections", len(left))
	for _, c := range left {
		c.close("shutdown deadline")
	}
	<-done
	return ctx.Err()
}
