package passthrough

import (
	"context"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// accept4 gives the peer's address and port as the peer sees its own,
// for IPv4 and IPv6, and EAGAIN when nobody waits.
func TestAccept4Peer(t *testing.T) {
	for _, addr := range []string{"127.0.0.1:0", "[::1]:0"} {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Logf("%s: %v (no such loopback here)", addr, err)
			continue
		}
		defer ln.Close()
		rc, err := ln.(*net.TCPListener).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		accept := func() (fd int, peer netip.AddrPort, err error) {
			rc.Control(func(lfd uintptr) { fd, peer, err = accept4(int(lfd)) })
			return
		}
		if fd, _, err := accept(); err != unix.EAGAIN {
			unix.Close(fd)
			t.Fatalf("%s: accept with nobody waiting: %v, want EAGAIN", addr, err)
		}
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		want := c.LocalAddr().(*net.TCPAddr).AddrPort()
		var (
			fd   int
			peer netip.AddrPort
		)
		waitUntil(t, func() bool { fd, peer, err = accept(); return err != unix.EAGAIN })
		if err != nil {
			t.Fatalf("%s: %v", addr, err)
		}
		unix.Close(fd)
		if peer != want {
			t.Errorf("%s: peer %v, want %v", addr, peer, want)
		}
	}
}

// The loops take a TCP listener out of Go's own poller: left there, the
// runtime's epoll set was woken for every new connection with nobody
// waiting on it (a thread woken and a context switch per connection).
func TestLoopListenerLeavesGoPoller(t *testing.T) {
	if goroutinesOnly {
		t.Skip("the goroutine engine accepts through Go's poller")
	}
	up := newBackend(t, "a")
	probe := dialFrom(t, "127.0.0.1", up.addr()) // a socket in Go's poller
	defer probe.Close()
	b, err := New(raw(up))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lnIno, probeIno := socketInode(t, ln.(*net.TCPListener)), socketInode(t, probe.(*net.TCPConn))
	done := make(chan error, 1)
	go func() { done <- b.Serve(context.Background(), ln) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		b.Shutdown(ctx)
		<-done
	}()
	c := dialFrom(t, "127.0.0.1", ln.Addr().String())
	defer c.Close()
	if g := greeting(t, c); g != "a" {
		t.Fatalf("greeting %q through the balancer, want a", g)
	}

	sets := epollSets(t)
	var goPoller []uint64
	watching := 0
	for _, inos := range sets {
		if slices.Contains(inos, probeIno) {
			goPoller = inos
		}
		if slices.Contains(inos, lnIno) {
			watching++
		}
	}
	if goPoller == nil {
		t.Fatalf("no epoll set of this process watches a connection's socket (%d sets)", len(sets))
	}
	if slices.Contains(goPoller, lnIno) {
		t.Error("Go's poller still watches the listening socket the loops accept from")
	}
	if watching < len(loops) {
		t.Errorf("%d epoll sets watch the listening socket, want at least the %d loops'", watching, len(loops))
	}
}

// socketInode is the inode number of a socket's file.
func socketInode(t *testing.T, s syscall.Conn) uint64 {
	t.Helper()
	rc, err := s.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	rc.Control(func(fd uintptr) { err = unix.Fstat(int(fd), &st) })
	if err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// epollSets lists, for each epoll descriptor of this process, the inode
// numbers of the files it watches (from /proc/self/fdinfo).
func epollSets(t *testing.T) map[string][]uint64 {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	sets := map[string][]uint64{}
	for _, e := range entries {
		if link, err := os.Readlink("/proc/self/fd/" + e.Name()); err != nil || link != "anon_inode:[eventpoll]" {
			continue
		}
		info, err := os.ReadFile("/proc/self/fdinfo/" + e.Name())
		if err != nil {
			continue
		}
		var inos []uint64
		for _, line := range strings.Split(string(info), "\n") {
			_, rest, ok := strings.Cut(line, " ino:")
			if !strings.HasPrefix(line, "tfd:") || !ok {
				continue
			}
			hex, _, _ := strings.Cut(rest, " ")
			if ino, err := strconv.ParseUint(hex, 16, 64); err == nil {
				inos = append(inos, ino)
			}
		}
		sets[e.Name()] = inos
	}
	return sets
}

// The loops' listening socket has TCP_NODELAY, so every socket accepted
// from it has it without a system call of its own (nginx's tcp_nodelay).
func TestLoopListenerAcceptsWithNoDelay(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ll, err := newLoopListener(ln.(*net.TCPListener))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { // no serveLoop here to close the rest
		ll.Close()
		unix.Close(ll.epfd)
		unix.Close(ll.wake)
	}()
	c, err := net.Dial("tcp", ll.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var fd int
	waitUntil(t, func() bool { fd, _, err = accept4(ll.fd); return err != unix.EAGAIN })
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if v, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY); err != nil || v == 0 {
		t.Errorf("accepted socket: TCP_NODELAY %d (%v), want it set", v, err)
	}
}
