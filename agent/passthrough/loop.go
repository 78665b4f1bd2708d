package passthrough

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The event loops serve the connections of TCP listeners: one loop per
// CPU but one (at least one), each an epoll set of its own with the
// listeners and its connections' sockets in it, edge-triggered; the loops
// accept in turn (EPOLLEXCLUSIVE). A connection then costs no goroutine and no stack: it is
// its sockets, a small struct, and while a write is held back the bytes
// it could not write. Reading the ClientHello, connecting (non-blocking,
// the next node on failure or timeout), copying both ways (splice while
// bulk, as in copy.go), half-closes, the idle timeout and the balancer's
// own closes all happen in the loop, with the same rules and log lines as
// the goroutine per direction that serves other listeners (serve.go).

var (
	loopsOnce sync.Once
	loops     []*evloop
	loopsErr  error
	loopNext  atomic.Uint32
)

// startLoops starts the process's loops once.
func startLoops() error {
	loopsOnce.Do(func() {
		// One loop fewer than Go's processors (at least one): a loop
		// blocked in epoll_wait keeps its processor in a system call, and
		// with every processor there the runtime takes them back and
		// hands them to other threads on each wait.
		for range max(runtime.GOMAXPROCS(0)-1, 1) {
			l, err := newLoop()
			if err != nil {
				if len(loops) == 0 {
					loopsErr = err // the goroutine engine serves instead
				}
				return
			}
			loops = append(loops, l)
			go l.run()
		}
	})
	return loopsErr
}

func pickLoop() *evloop {
	return loops[int(loopNext.Add(1))%len(loops)]
}

// evloop is one event loop. Only its goroutine touches conns, timers and
// buf; others hand it work through queue (and a write to wake).
type evloop struct {
	epfd, wake int
	buf        []byte
	conns      map[int]*lconn // by socket
	listeners  map[int32]*loopListener
	paused     map[*loopListener]pause // listeners left after accept failed
	timers     timerHeap
	ready      []*lconn // connections with more to do than one turn allows
	retired    []int    // sockets to close at the end of this turn
	yielded    time.Time

	mu    sync.Mutex
	queue []loopWork
}

// pause is a listener this loop left after an accept failure, until.
type pause struct {
	until   time.Time
	backoff time.Duration
}

type loopWork struct {
	add      *lconn // a new connection
	close    *lconn // the balancer closes it (drain, shutdown)
	reason   string
	listen   *loopListener // accept from it too
	unlisten *loopListener // it was closed
}

func newLoop() (*evloop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll: %w", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wake)}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wake, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(wake)
		return nil, fmt.Errorf("epoll: %w", err)
	}
	return &evloop{epfd: epfd, wake: wake, buf: make([]byte, bufSize), conns: map[int]*lconn{}, listeners: map[int32]*loopListener{}, paused: map[*loopListener]pause{}}, nil
}

// post hands work to the loop from another goroutine.
func (l *evloop) post(w loopWork) {
	l.mu.Lock()
	first := len(l.queue) == 0
	l.queue = append(l.queue, w)
	l.mu.Unlock()
	if first {
		var one = [8]byte{1}
		unix.Write(l.wake, one[:])
	}
}

// Connection states in the loop.
const (
	stHello   = iota // reading the ClientHello
	stConnect        // connecting to an upstream
	stRelay          // copying both ways
	stClosed
)

// lconn is one connection served by a loop.
type lconn struct {
	l        *evloop
	b        *Balancer
	c        *conn
	cfg      Config
	addr     netip.AddrPort // the client's
	cfd, ufd int            // sockets; ufd is -1 until connecting
	state    int
	start    time.Time
	last     time.Time // last byte moved either way
	hello    []byte
	sni      string
	picker   *picker
	u        *upstream
	tryUntil time.Time // the next-upstream budget
	dirs     [2]ldir
	readyQ   bool   // in l.ready
	firstEnd string // why the connection ended, the first reason
	// The connection's timer: when, for which step, its index in the
	// loop's heap (-1: none).
	when time.Time
	kind int
	tidx int
}

// ldir is one direction of a connection in a loop.
type ldir struct {
	pending []byte // read, not yet written
	pipe    *pipe  // borrowed while bulk bytes wait in it
	inPipe  int
	bulk    bool
	eof     bool  // the source ended; the other side was half-closed
	bytes   int64 // forwarded
	// canRead is set by a readable event on the source and cleared by a
	// read that finds less than it asked for (nginx's rule: the next
	// byte brings a new event), unless hup: an end or error reported
	// with bytes is read to the end.
	canRead, hup bool
	// fin: the source's end was reported without an error (EPOLLRDHUP).
	// TCP takes a FIN only in order, so every byte before it is queued
	// already: a read that finds less than it asked for has reached the
	// end, and no read is spent on finding 0.
	fin bool
}

// Timer kinds: a connection has at most one timer at a time, for the
// step it is in.
const (
	tmHello = iota
	tmConnect
	tmIdle
)

// timerHeap orders connections by their timer; each knows its index.
type timerHeap []*lconn

func (h timerHeap) Len() int           { return len(h) }
func (h timerHeap) Less(i, j int) bool { return h[i].when.Before(h[j].when) }
func (h timerHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].tidx, h[j].tidx = i, j
}
func (h *timerHeap) Push(x any) {
	lc := x.(*lconn)
	lc.tidx = len(*h)
	*h = append(*h, lc)
}
func (h *timerHeap) Pop() any {
	old := *h
	lc := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	lc.tidx = -1
	return lc
}

// loopListener is a TCP listener whose accepting is done by serveLoop:
// closing it also wakes serveLoop's wait.
type loopListener struct {
	addr       net.Addr
	b          *Balancer
	id         int32 // its token in the loops' epoll sets
	epfd, wake int   // serveLoop's own wait (with MaxConns)
	once       sync.Once
	done       chan struct{} // closed by Close

	mu sync.RWMutex // held for reading while fd is used, for writing to close it
	fd int          // the listening socket, -1 once closed
}

var listenerIDs atomic.Int32

// newLoopListener takes tl over for the loops. They accept from a
// duplicate of its socket and tl is closed: Go's own poller had the
// socket in its epoll set too and was woken for every new connection,
// only to find nobody waiting on it (a thread woken, a context switch
// and two epoll waits more per connection). Closing tl takes the socket
// out of that set; the duplicate keeps it listening.
func newLoopListener(tl *net.TCPListener) (*loopListener, error) {
	rc, err := tl.SyscallConn()
	if err != nil {
		return nil, err
	}
	fd := -1
	cerr := rc.Control(func(lfd uintptr) {
		var d int
		if d, err = unix.FcntlInt(lfd, unix.F_DUPFD_CLOEXEC, 0); err == nil {
			fd = d
		}
	})
	if err == nil {
		err = cerr
	}
	if err == nil {
		// As nginx's tcp_nodelay (Go's default too): small writes go out
		// at once. Set here, every accepted socket inherits it, one
		// system call fewer per connection.
		err = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	}
	if err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("take over the listener: %w", err)
	}
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(fd)
		unix.Close(epfd)
		return nil, err
	}
	for _, w := range []int{fd, wake} {
		ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(w)}
		if err == nil {
			err = unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, w, &ev)
		}
	}
	if err != nil {
		unix.Close(fd)
		unix.Close(epfd)
		unix.Close(wake)
		return nil, err
	}
	addr := tl.Addr()
	tl.Close()
	return &loopListener{addr: addr, fd: fd, epfd: epfd, wake: wake, id: listenerIDs.Add(1), done: make(chan struct{})}, nil
}

// Addr is the listener's address.
func (ll *loopListener) Addr() net.Addr { return ll.addr }

// Accept is not used: the loops and serveLoop accept from the socket.
func (ll *loopListener) Accept() (net.Conn, error) {
	return nil, errors.New("passthrough: a loop listener is accepted from by the event loops")
}

// Close closes the listener and wakes serveLoop, which closes the rest.
// Closing the socket also takes it out of every loop's epoll set.
func (ll *loopListener) Close() error {
	err := error(net.ErrClosed)
	ll.mu.Lock()
	if ll.fd >= 0 {
		err = unix.Close(ll.fd)
		ll.fd = -1
	}
	ll.mu.Unlock()
	ll.once.Do(func() {
		var one = [8]byte{1}
		unix.Write(ll.wake, one[:])
		close(ll.done)
	})
	return err
}

// control runs f with the listening socket, which cannot be closed (and
// its number handed to another socket) meanwhile; net.ErrClosed once it
// is closed.
func (ll *loopListener) control(f func(fd int)) error {
	ll.mu.RLock()
	defer ll.mu.RUnlock()
	if ll.fd < 0 {
		return net.ErrClosed
	}
	f(ll.fd)
	return nil
}

// accept takes one connection off the listener: the socket, its peer,
// and unix.EAGAIN when none is waiting.
func (ll *loopListener) accept() (int, netip.AddrPort, error) {
	var (
		fd   int
		peer netip.AddrPort
		aerr error
	)
	if err := ll.control(func(lfd int) {
		fd, peer, aerr = accept4(lfd)
	}); err != nil {
		return -1, netip.AddrPort{}, err
	}
	return fd, peer, aerr
}

// accept4 is accept4(2), non-blocking and close-on-exec, with the peer's
// address. (x/sys/unix's Accept4 also asks the listener for its protocol,
// a getsockopt on every connection.)
func accept4(lfd int) (int, netip.AddrPort, error) {
	var rsa unix.RawSockaddrAny
	size := uint32(unix.SizeofSockaddrAny)
	fd, _, errno := unix.Syscall6(unix.SYS_ACCEPT4, uintptr(lfd), uintptr(unsafe.Pointer(&rsa)),
		uintptr(unsafe.Pointer(&size)), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
	if errno != 0 {
		return -1, netip.AddrPort{}, errno
	}
	return int(fd), rawAddrPort(&rsa), nil
}

// rawAddrPort is the IPv4 or IPv6 address and port of a raw socket
// address (its port in network order).
func rawAddrPort(rsa *unix.RawSockaddrAny) netip.AddrPort {
	switch rsa.Addr.Family {
	case unix.AF_INET:
		a := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		p := (*[2]byte)(unsafe.Pointer(&a.Port))
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(p[0])<<8|uint16(p[1]))
	case unix.AF_INET6:
		a := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
		p := (*[2]byte)(unsafe.Pointer(&a.Port))
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr).Unmap(), uint16(p[0])<<8|uint16(p[1]))
	}
	return netip.AddrPort{}
}

// serveLoop accepts from a TCP listener and hands each connection to a
// loop. It behaves as Serve's accept loop: the MaxConns slots, the pause
// when descriptors run out, the return at Shutdown or ctx's end.
func (b *Balancer) serveLoop(ctx context.Context, ll *loopListener) error {
	defer func() {
		unix.Close(ll.epfd)
		unix.Close(ll.wake)
	}()
	events := make([]unix.EpollEvent, 2)
	var backoff time.Duration
	for {
		if err := b.acquire(ctx); err != nil {
			return err
		}
		fd, peer, err := ll.accept()
		for err == unix.EAGAIN || err == unix.EINTR || err == unix.ECONNABORTED {
			if _, werr := unix.EpollWait(ll.epfd, events, -1); werr != nil && werr != unix.EINTR {
				err = werr
				break
			}
			if b.isClosed() || ctx.Err() != nil {
				break
			}
			fd, peer, err = ll.accept()
		}
		if err == nil && (b.isClosed() || ctx.Err() != nil) {
			unix.Close(fd)
			err = net.ErrClosed
		}
		if err != nil {
			if err := b.acceptFailed(ctx, err, &backoff); err != nil {
				return err
			}
			continue
		}
		backoff = 0
		b.handlers.Add(1) // Done when the connection is over
		b.adopt(fd, peer)
	}
}

// serveInLoops has the loops accept from the listener themselves, each
// in turn (EPOLLEXCLUSIVE), until it is closed or ctx ends. (With
// MaxConns, serveLoop accepts instead: it waits for a slot first.)
func (b *Balancer) serveInLoops(ctx context.Context, ll *loopListener) error {
	ll.b = b
	for _, l := range loops {
		l.post(loopWork{listen: ll})
	}
	select {
	case <-ll.done:
	case <-ctx.Done():
	}
	ll.Close()
	for _, l := range loops {
		l.post(loopWork{unlisten: ll})
	}
	unix.Close(ll.epfd)
	unix.Close(ll.wake)
	switch {
	case b.isClosed():
		return ErrClosed
	case ctx.Err() != nil:
		return ctx.Err()
	}
	return net.ErrClosed
}

// listenTo adds a listener to the loop's epoll set; its events carry its
// id with Pad -1, never taken for a socket's.
func (l *evloop) listenTo(ll *loopListener) {
	ll.control(func(fd int) {
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLEXCLUSIVE, Fd: ll.id, Pad: -1}
		if unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev) == nil {
			l.listeners[ll.id] = ll
		}
	})
}

// acceptFrom takes one waiting connection, as nginx does by default:
// the listener is level-triggered, so the next wait reports the others,
// and a lone connection costs no accept that finds none.
func (l *evloop) acceptFrom(ll *loopListener) {
	b := ll.b
	for range 64 { // aborted ones are skipped
		fd, peer, err := ll.accept()
		switch {
		case err == unix.EAGAIN || err == unix.ECONNABORTED || err == unix.EINTR:
			if err == unix.EAGAIN {
				return
			}
			continue
		case err != nil:
			if errors.Is(err, net.ErrClosed) || b.isClosed() {
				return
			}
			// Out of descriptors (EMFILE, ENFILE...): the listener stays
			// readable, so this loop leaves it for a while, with backoff.
			p := l.paused[ll]
			p.backoff = min(max(2*p.backoff, 5*time.Millisecond), time.Second)
			p.until = time.Now().Add(p.backoff)
			l.paused[ll] = p
			b.log.Warn("accept failed; pausing", "err", err, "pause", p.backoff)
			ll.control(func(fd int) { unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, fd, nil) })
			return
		}
		if p, ok := l.paused[ll]; ok && p.backoff > 0 && p.until.IsZero() {
			delete(l.paused, ll) // accepting again: the backoff starts over
		}
		b.handlers.Add(1) // Done when the connection is over
		if lc := b.newLconn(l, fd, peer); lc != nil {
			l.add(lc)
		}
		return
	}
}

// adopt starts serving an accepted socket in a loop.
func (b *Balancer) adopt(fd int, peer netip.AddrPort) {
	l := pickLoop()
	if lc := b.newLconn(l, fd, peer); lc != nil {
		l.post(loopWork{add: lc})
	}
}

// newLconn registers an accepted socket with the balancer, or closes it
// (the balancer is shutting down, or an upstream is given by name: the
// goroutine engine then serves it). b.handlers has been added to.
func (b *Balancer) newLconn(l *evloop, fd int, peer netip.AddrPort) *lconn {
	// fd has TCP_NODELAY from the listener (newLoopListener).
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		unix.Close(fd)
		b.release()
		b.handlers.Done()
		return nil
	}
	if b.byName {
		b.mu.Unlock()
		// An upstream given by name is dialled through Go's resolver:
		// served by the goroutine engine.
		f := os.NewFile(uintptr(fd), "client")
		nc, err := net.FileConn(f)
		f.Close()
		if err != nil {
			b.log.Warn("closing connection", "err", err)
			b.release()
			b.handlers.Done()
			return nil
		}
		go b.handle(nc)
		return nil
	}
	lc := &lconn{l: l, b: b, cfd: fd, ufd: -1, addr: peer, start: time.Now(), tidx: -1, cfg: b.cfg}
	lc.c = &conn{lc: lc}
	b.conns[lc.c] = struct{}{}
	b.mu.Unlock()
	return lc
}

// yieldEvery is how often a loop gives its goroutine back to the
// scheduler: often enough that the runtime never finds it running 10 ms,
// seldom enough that what a yield costs stays small: it wakes a second
// thread, which takes the goroutine over while the first goes to sleep
// (at every 5 ms, 6% of the loop's CPU under TLS connection load).
const yieldEvery = 8 * time.Millisecond

// yield gives the loop's goroutine back to the scheduler, every
// yieldEvery, before it waits. A goroutine that never does is, to the Go
// runtime, one that has run for 10 ms: its monitor then signals the
// thread, takes the P out of the blocking wait and hands it to another
// thread, and polls every 20 µs for a while after. Yielding keeps the P
// with the loop and the monitor asleep (measured under connection load:
// the monitor's wake-ups per connection fell from 0.43 to 0.02 raw, from
// 2.1 to 0.1 with TLS).
func (l *evloop) yield() {
	if now := time.Now(); now.Sub(l.yielded) >= yieldEvery {
		runtime.Gosched()
		l.yielded = now
	}
}

func (l *evloop) run() {
	events := make([]unix.EpollEvent, 256)
	for {
		timeout := -1
		next := time.Time{}
		if len(l.timers) > 0 {
			next = l.timers[0].when
		}
		for _, p := range l.paused {
			if !p.until.IsZero() && (next.IsZero() || p.until.Before(next)) {
				next = p.until
			}
		}
		if len(l.ready) > 0 {
			timeout = 0
		} else if !next.IsZero() {
			timeout = max(int(time.Until(next)/time.Millisecond)+1, 0)
		}
		l.yield()
		n, err := unix.EpollWait(l.epfd, events, timeout)
		if err != nil && err != unix.EINTR {
			time.Sleep(10 * time.Millisecond) // not expected; never spin
			continue
		}
		for _, ev := range events[:max(n, 0)] {
			if ev.Pad == -1 {
				if ll := l.listeners[ev.Fd]; ll != nil {
					l.acceptFrom(ll)
				}
				continue
			}
			fd := int(ev.Fd)
			if fd == l.wake {
				l.drainQueue()
				continue
			}
			lc := l.conns[fd]
			if lc == nil {
				continue
			}
			l.event(lc, fd, ev.Events)
		}
		if len(l.ready) > 0 {
			ready := l.ready
			l.ready = nil
			for _, lc := range ready {
				lc.readyQ = false
				if lc.state == stRelay {
					l.pump(lc, fromClient)
					l.pump(lc, fromUpstream)
				}
			}
		}
		l.fireTimers()
		l.resumeListeners()
		for _, fd := range l.retired {
			unix.Close(fd)
		}
		l.retired = l.retired[:0]
	}
}

// retire takes a socket out of the loop; it is closed after the events
// of this turn, so that a stale event for it cannot reach another socket
// given its number meanwhile.
func (l *evloop) retire(fd int) {
	delete(l.conns, fd)
	l.retired = append(l.retired, fd)
}

// resumeListeners takes back the listeners whose pause has passed.
func (l *evloop) resumeListeners() {
	now := time.Now()
	for ll, p := range l.paused {
		if p.until.IsZero() || p.until.After(now) {
			continue
		}
		p.until = time.Time{} // the backoff stays until an accept succeeds
		l.paused[ll] = p
		if l.listeners[ll.id] != nil {
			delete(l.listeners, ll.id)
			l.listenTo(ll)
		}
	}
}

func (l *evloop) drainQueue() {
	var b [8]byte
	unix.Read(l.wake, b[:])
	l.mu.Lock()
	q := l.queue
	l.queue = nil
	l.mu.Unlock()
	for _, w := range q {
		switch {
		case w.add != nil:
			l.add(w.add)
		case w.close != nil:
			l.closeConn(w.close, w.reason)
		case w.listen != nil:
			l.listenTo(w.listen)
		case w.unlisten != nil:
			delete(l.listeners, w.unlisten.id)
			delete(l.paused, w.unlisten)
		}
	}
}

func (l *evloop) register(lc *lconn, fd int) error {
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(fd)}
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return err
	}
	l.conns[fd] = lc
	return nil
}

func (l *evloop) setTimer(lc *lconn, kind int, when time.Time) {
	lc.kind, lc.when = kind, when
	if lc.tidx >= 0 {
		heap.Fix(&l.timers, lc.tidx)
		return
	}
	heap.Push(&l.timers, lc)
}

func (l *evloop) add(lc *lconn) {
	if lc.c.isClosing() {
		l.finish(lc, "")
		return
	}
	if err := l.register(lc, lc.cfd); err != nil {
		lc.b.log.Warn("closing connection", "client", lc.addr.String(), "err", err)
		l.finish(lc, "")
		return
	}
	if lc.cfg.DisableSNIPeek {
		l.connect(lc)
		return
	}
	lc.state = stHello
	l.setTimer(lc, tmHello, lc.start.Add(lc.cfg.helloTimeout()))
	// A client sends its ClientHello as soon as it is connected, so it is
	// often here by now: read it at once, as nginx does, rather than after
	// a wait that would return at once (EAGAIN costs no more than that
	// wait). If it is not, its arrival brings an event.
	lc.dirs[fromClient].canRead = true
	l.readHello(lc)
}

func (l *evloop) event(lc *lconn, fd int, ev uint32) {
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
		// Noted in every state: bytes that come while connecting are
		// read once the relay starts.
		d := &lc.dirs[fromClient]
		if fd == lc.ufd {
			d = &lc.dirs[fromUpstream]
		}
		d.canRead = true
		if ev&(unix.EPOLLRDHUP|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			d.hup = true
		}
		if ev&unix.EPOLLRDHUP != 0 && ev&unix.EPOLLERR == 0 {
			d.fin = true
		}
	}
	switch lc.state {
	case stHello:
		if fd == lc.cfd && ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			l.readHello(lc)
		}
	case stConnect:
		if fd == lc.ufd && ev&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			l.connected(lc)
		}
	case stRelay:
		readable := ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLERR|unix.EPOLLHUP) != 0
		writable := ev&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) != 0
		src := fromClient
		if fd == lc.ufd {
			src = fromUpstream
		}
		if readable {
			l.pump(lc, src)
		}
		if writable && lc.state == stRelay && lc.dirs[1-src].waiting() {
			l.pump(lc, 1-src)
		}
	}
}

func (d *ldir) waiting() bool { return len(d.pending) > 0 || d.inPipe > 0 }

// readHello reads what the client has sent until it holds a whole
// ClientHello, as peekClientHello.
func (l *evloop) readHello(lc *lconn) {
	for {
		if cap(lc.hello)-len(lc.hello) < 1024 {
			nb := make([]byte, len(lc.hello), max(2*cap(lc.hello), 2048))
			copy(nb, lc.hello)
			lc.hello = nb
		}
		n, err := unix.Read(lc.cfd, lc.hello[len(lc.hello):cap(lc.hello)])
		if err == unix.EAGAIN {
			return
		}
		if err == unix.EINTR {
			continue
		}
		if n <= 0 {
			if err == nil {
				err = errEOF
			}
			l.refuse(lc, "closing connection: no TLS ClientHello", "err", err)
			return
		}
		asked := cap(lc.hello) - len(lc.hello)
		lc.hello = lc.hello[:len(lc.hello)+n]
		if n < asked && !lc.dirs[fromClient].hup {
			lc.dirs[fromClient].canRead = false
		}
		done, sni, herr := helloIn(lc.hello)
		if herr != nil {
			l.refuse(lc, "closing connection: no TLS ClientHello", "err", herr)
			return
		}
		if !done {
			if !lc.dirs[fromClient].canRead {
				return // the rest of it brings an event
			}
			continue
		}
		if len(lc.cfg.SNIAllow) > 0 && !slices.Contains(lc.cfg.SNIAllow, strings.ToLower(sni)) {
			l.refuse(lc, "closing connection: server name not allowed", "sni", sni)
			return
		}
		lc.sni = sni
		l.connect(lc)
		return
	}
}

var errEOF = errors.New("EOF")

func (l *evloop) refuse(lc *lconn, msg string, kv ...any) {
	lc.b.log.Log(context.Background(), lc.cfg.refusalLevel(), msg, append([]any{"client", lc.addr.String()}, kv...)...)
	l.finish(lc, "")
}

// connect tries the next upstream, in the method's order, within the
// tries and time budgets; on none it closes the connection.
func (l *evloop) connect(lc *lconn) {
	b := lc.b
	now := time.Now()
	if lc.picker == nil {
		b.mu.Lock()
		n := len(b.ups)
		b.mu.Unlock()
		tries := lc.cfg.NextUpstreamTries
		if tries <= 0 || tries > n {
			tries = n
		}
		lc.picker = b.newPicker(lc.addr.Addr().String())
		lc.picker.budget = tries
		lc.tryUntil = now.Add(lc.cfg.nextTimeout())
	}
	for lc.picker.budget > 0 && now.Before(lc.tryUntil) {
		lc.picker.budget--
		u := lc.picker.next(now)
		if u == nil {
			break
		}
		fd, err := dialNonblock(u.Addr)
		if err != nil {
			b.log.Debug("upstream connect failed; trying the next", "upstream", u.Addr, "err", err)
			b.failed(u, time.Now())
			continue
		}
		if err := l.register(lc, fd); err != nil {
			unix.Close(fd)
			b.failed(u, time.Now())
			continue
		}
		lc.u, lc.ufd, lc.state = u, fd, stConnect
		l.setTimer(lc, tmConnect, minTime(now.Add(lc.cfg.connectTimeout()), lc.tryUntil))
		return
	}
	b.log.Warn("closing connection", "client", lc.addr.String(), "sni", lc.sni, "err", ErrNoLiveUpstreams)
	l.finish(lc, "")
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// dialNonblock starts a connect to addr, an IP address and port.
func dialNonblock(addr string) (int, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return -1, err
	}
	ip := ap.Addr().Unmap()
	var sa unix.Sockaddr
	family := unix.AF_INET
	if ip.Is4() {
		sa = &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ip.As4()}
	} else {
		family = unix.AF_INET6
		sa = &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ip.As16(), ZoneId: zoneID(ip.Zone())}
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	if err := unix.Connect(fd, sa); err != nil && err != unix.EINPROGRESS {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

func zoneID(zone string) uint32 {
	if zone == "" {
		return 0
	}
	if ifi, err := net.InterfaceByName(zone); err == nil {
		return uint32(ifi.Index)
	}
	return 0
}

// connected finishes a connect: on success the relay starts with the
// ClientHello replayed; on failure the next upstream is tried.
func (l *evloop) connected(lc *lconn) {
	b := lc.b
	soerr, err := unix.GetsockoptInt(lc.ufd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err == nil && soerr != 0 {
		err = unix.Errno(soerr)
	}
	if err != nil {
		b.log.Debug("upstream connect failed; trying the next", "upstream", lc.u.Addr, "err", err)
		b.failed(lc.u, time.Now())
		l.dropUpstream(lc)
		l.connect(lc)
		return
	}
	if lc.c.isClosing() {
		l.closeConn(lc, "")
		return
	}
	b.succeeded(lc.u, lc.c)
	lc.state = stRelay
	lc.last = time.Now()
	if len(lc.hello) > 0 {
		lc.dirs[fromClient].pending = lc.hello
	}
	lc.hello = nil
	l.setTimer(lc, tmIdle, lc.last.Add(lc.cfg.idleTimeout()))
	l.pump(lc, fromClient)
	if lc.state == stRelay {
		l.pump(lc, fromUpstream)
	}
}

// dropUpstream closes a socket whose connect failed.
func (l *evloop) dropUpstream(lc *lconn) {
	if lc.ufd >= 0 {
		l.retire(lc.ufd)
		lc.ufd = -1
	}
	lc.u = nil
	lc.state = stConnect
}

// pump moves what it can from direction dir's source to its destination:
// what is held back first, then what can be read, until the source would
// block, the destination would block (its writability resumes it), or a
// turn's share is used (the connection is then queued for the next turn).
func (l *evloop) pump(lc *lconn, dir int) {
	d := &lc.dirs[dir]
	src, dst := lc.cfd, lc.ufd
	if dir == fromUpstream {
		src, dst = lc.ufd, lc.cfd
	}
	count := &lc.u.toUpstream
	if dir == fromUpstream {
		count = &lc.u.toClient
	}
	for turn := 0; turn < 16; turn++ {
		// Held back bytes first.
		if d.inPipe > 0 {
			n, err := unix.Splice(d.pipe.r, nil, dst, nil, d.inPipe, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			if err == unix.EAGAIN {
				return
			}
			if err != nil || n == 0 {
				l.closeConn(lc, writeFail[dir])
				return
			}
			d.inPipe -= int(n)
			pipes.spliced.Add(n)
			l.moved(lc, d, count, int(n))
			if d.inPipe > 0 {
				continue
			}
			pipes.put(d.pipe, true)
			d.pipe = nil
		}
		if len(d.pending) > 0 {
			n, err := unix.Write(dst, d.pending)
			if err == unix.EAGAIN || err == unix.EINTR {
				return
			}
			if err != nil {
				l.closeConn(lc, writeFail[dir])
				return
			}
			l.moved(lc, d, count, n)
			d.pending = d.pending[n:]
			if len(d.pending) > 0 {
				continue
			}
			d.pending = nil
		}
		if d.eof {
			if o := &lc.dirs[1-dir]; o.eof && !o.waiting() {
				l.closeConn(lc, "")
			}
			return
		}
		// Then what the source has: spliced while bulk.
		if !d.canRead {
			return
		}
		if d.bulk {
			if p := pipes.get(); p != nil {
				n, err := unix.Splice(src, nil, p.w, nil, pipeSize, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
				if n > 0 {
					d.pipe, d.inPipe = p, int(n)
					// A short splice is not a drained socket (the pipe
					// fills by pages, not bytes): read on until EAGAIN.
					d.bulk = n >= bufSize
					continue
				}
				pipes.put(p, true)
				if err == unix.EAGAIN {
					d.canRead = false
					return
				}
				if err == nil { // the source's end
					l.srcEnded(lc, dir, dst)
					return
				}
				if err != unix.EINVAL {
					l.closeConn(lc, failedBy[dir])
					return
				}
			}
			d.bulk = false
		}
		n, err := unix.Read(src, l.buf)
		if err == unix.EAGAIN {
			d.canRead = false
			return
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			l.closeConn(lc, failedBy[dir])
			return
		}
		if n == 0 {
			l.srcEnded(lc, dir, dst)
			return
		}
		d.bulk = n == len(l.buf)
		if n < len(l.buf) && !d.hup {
			d.canRead = false
		}
		w, werr := unix.Write(dst, l.buf[:n])
		if werr != nil && werr != unix.EAGAIN && werr != unix.EINTR {
			l.closeConn(lc, writeFail[dir])
			return
		}
		w = max(w, 0)
		l.moved(lc, d, count, w)
		if w < n {
			d.pending = append([]byte(nil), l.buf[w:n]...)
		} else if d.fin && n < len(l.buf) {
			l.srcEnded(lc, dir, dst)
			return
		}
	}
	if !lc.readyQ {
		lc.readyQ = true
		l.ready = append(l.ready, lc)
	}
}

func (l *evloop) moved(lc *lconn, d *ldir, count *atomic.Int64, n int) {
	if n <= 0 {
		return
	}
	d.bytes += int64(n)
	count.Add(int64(n))
	lc.last = time.Now()
}

// srcEnded carries a source's end across as a half-close; the connection
// ends when both directions have.
func (l *evloop) srcEnded(lc *lconn, dir, dst int) {
	d := &lc.dirs[dir]
	d.eof = true
	if lc.firstEnd == "" {
		lc.firstEnd = closedBy[dir]
	}
	if lc.dirs[1-dir].eof && !lc.dirs[1-dir].waiting() {
		// The other way ended before and was read to its end: closing
		// sends the same FIN the shutdown would.
		l.closeConn(lc, "")
		return
	}
	unix.Shutdown(dst, unix.SHUT_WR)
}

func (l *evloop) fireTimers() {
	now := time.Now()
	for len(l.timers) > 0 && !l.timers[0].when.After(now) {
		lc := heap.Pop(&l.timers).(*lconn)
		switch lc.kind {
		case tmHello:
			if lc.state == stHello {
				l.refuse(lc, "closing connection: no TLS ClientHello", "err", "timeout")
			}
		case tmConnect:
			if lc.state == stConnect && lc.ufd >= 0 {
				lc.b.log.Debug("upstream connect failed; trying the next", "upstream", lc.u.Addr, "err", "timeout")
				lc.b.failed(lc.u, now)
				l.dropUpstream(lc)
				l.connect(lc)
			}
		case tmIdle:
			if lc.state != stRelay {
				continue
			}
			if due := lc.last.Add(lc.cfg.idleTimeout()); due.After(now) {
				l.setTimer(lc, tmIdle, due) // bytes moved since: not idle
				continue
			}
			l.closeConn(lc, "idle timeout")
		}
	}
}

// closeConn ends a connection: both sockets closed, pipes given back, the
// balancer's books and log as for the goroutine engine.
func (l *evloop) closeConn(lc *lconn, reason string) {
	if lc.state == stClosed {
		return
	}
	if reason != "" && lc.firstEnd == "" {
		lc.firstEnd = reason
	}
	l.finish(lc, lc.firstEnd)
}

func (l *evloop) finish(lc *lconn, reason string) {
	if lc.state == stClosed {
		return
	}
	relayed := lc.state == stRelay
	lc.state = stClosed
	if lc.tidx >= 0 {
		heap.Remove(&l.timers, lc.tidx)
	}
	for _, fd := range []int{lc.cfd, lc.ufd} {
		if fd >= 0 {
			l.retire(fd)
		}
	}
	for i := range lc.dirs {
		if p := lc.dirs[i].pipe; p != nil {
			pipes.put(p, lc.dirs[i].inPipe == 0)
			lc.dirs[i].pipe = nil
		}
		lc.dirs[i].pending = nil
	}
	b, c := lc.b, lc.c
	c.mu.Lock()
	c.closed = true
	if c.reason != "" {
		reason = c.reason
	}
	c.mu.Unlock()
	if relayed && lc.cfg.LogConnections && b.log.Enabled(context.Background(), slog.LevelInfo) {
		b.log.LogAttrs(context.Background(), slog.LevelInfo, "connection closed",
			slog.String("client", lc.addr.String()),
			slog.String("sni", lc.sni),
			slog.String("upstream", lc.u.Addr),
			slog.Int64("bytes_up", lc.dirs[fromClient].bytes),
			slog.Int64("bytes_down", lc.dirs[fromUpstream].bytes),
			slog.Duration("duration", time.Since(lc.start).Round(time.Millisecond)),
			slog.String("reason", reason))
	}
	if relayed {
		b.released(lc.u, c)
	}
	b.mu.Lock()
	delete(b.conns, c)
	b.mu.Unlock()
	b.release()
	b.handlers.Done()
}
