package passthrough

import (
	"net"
	"net/netip"
	"testing"

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
