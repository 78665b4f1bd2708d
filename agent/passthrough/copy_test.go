package passthrough

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"testing"
	"time"
)

// bulkBackend reads everything the client sends until its half-close,
// while sending size bytes of its own, then half-closes; it reports the
// digest of what it read.
func bulkBackend(t *testing.T, size int) (addr string, got <-chan [32]byte) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan [32]byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		wrote := make(chan struct{})
		go func() {
			defer close(wrote)
			io.Copy(c, io.LimitReader(randomBytes(2), int64(size)))
			c.(*net.TCPConn).CloseWrite()
		}()
		h := sha256.New()
		io.Copy(h, c)
		ch <- [32]byte(h.Sum(nil))
		<-wrote // closing before would cut what is still to be sent
	}()
	return ln.Addr().String(), ch
}

// randomBytes is a reproducible stream: the same bytes however it is read.
func randomBytes(seed byte) io.Reader {
	return rand.NewChaCha8([32]byte{seed})
}

func digest(r io.Reader, n int) [32]byte {
	h := sha256.New()
	io.Copy(h, io.LimitReader(r, int64(n)))
	return [32]byte(h.Sum(nil))
}

// Bulk both ways at once goes through pipes, arrives whole and in order,
// is counted exactly, and every pipe is given back: while the connection
// then sits idle it holds none, and small exchanges after the bulk still
// pass.
func TestBulkSplicesAndGivesThePipesBack(t *testing.T) {
	const size = 16 << 20
	addr, got := bulkBackend(t, size)
	b, baddr := start(t, Config{DisableSNIPeek: true, Upstreams: []Upstream{{Addr: addr}}})
	before := pipes.spliced.Load()

	c := dialFrom(t, "127.0.0.1", baddr)
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	sent := make(chan error, 1)
	go func() {
		_, err := io.Copy(c, io.LimitReader(randomBytes(1), size))
		c.(*net.TCPConn).CloseWrite()
		sent <- err
	}()
	if d := digest(c, size+1); d != digest(randomBytes(2), size) {
		t.Fatal("the bytes from the node arrived changed, short or long")
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if d := <-got; d != digest(randomBytes(1), size) {
		t.Fatal("the bytes to the node arrived changed, short or long")
	}
	if moved := pipes.spliced.Load() - before; moved < size {
		t.Errorf("%d bytes went through pipes; bulk of 2 x %d should have spliced most", moved, size)
	}
	waitUntil(t, func() bool { return b.ActiveConns() == 0 })
	st := b.Status()[0]
	if st.BytesToUpstream != size || st.BytesToClient != size {
		t.Errorf("counted %d up, %d down; want %d each", st.BytesToUpstream, st.BytesToClient, size)
	}
	if n := pipes.borrowed(); n != 0 {
		t.Errorf("%d pipes still borrowed after the connection ended", n)
	}
}

// A connection that moved bulk and then waits holds no pipe, and goes
// back to small exchanges.
func TestIdleAfterBulkHoldsNoPipe(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c) // echo
	}()
	b, baddr := start(t, Config{DisableSNIPeek: true, Upstreams: []Upstream{{Addr: ln.Addr().String()}}})
	c := dialFrom(t, "127.0.0.1", baddr)
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))

	const size = 4 << 20
	go io.Copy(c, io.LimitReader(randomBytes(3), size))
	if d := digest(c, size); d != digest(randomBytes(3), size) {
		t.Fatal("echoed bulk arrived changed")
	}
	// The last splice's pipe goes back just after its bytes are written.
	waitUntil(t, func() bool { return pipes.borrowed() == 0 })
	for i := range 3 {
		msg := []byte{'p', 'i', 'n', 'g', byte('0' + i)}
		c.Write(msg)
		back := make([]byte, len(msg))
		if _, err := io.ReadFull(c, back); err != nil || !bytes.Equal(back, msg) {
			t.Fatalf("small exchange %d after bulk: %q, %v", i, back, err)
		}
	}
	if b.ActiveConns() != 1 {
		t.Errorf("%d connections, want 1", b.ActiveConns())
	}
}

// waitUntil polls cond for up to ten seconds.
func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// BenchmarkBulkDownload streams from a node to the client through the
// balancer, in process: MB/s per client. The proxy's share of the CPU is
// the harness's figure (test/harness), this one is for profiles.
func BenchmarkBulkDownload(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		zeros := make([]byte, 64<<10)
		for {
			if _, err := c.Write(zeros); err != nil {
				return
			}
		}
	}()
	_, front := balancerFor(b, ln.Addr().String())
	c, err := net.Dial("tcp", front)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64<<10)
	b.SetBytes(1 << 20)
	for b.Loop() {
		for n := 0; n < 1<<20; {
			m, err := c.Read(buf)
			if err != nil {
				b.Fatal(err)
			}
			n += m
		}
	}
}

// A client that sends and half-closes at once has all its bytes carried,
// whatever their count, however the end arrives: with them or after.
func TestBytesThenEndArriveWhole(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				h := sha256.New()
				n, _ := io.Copy(h, c) // until the client's half-close
				fmt.Fprintf(c, "%d %x", n, h.Sum(nil))
			}()
		}
	}()
	b, addr := start(t, Config{DisableSNIPeek: true, Upstreams: []Upstream{{Addr: ln.Addr().String()}}})
	for _, size := range []int{1, 1000, 20000, bufSize - 1, bufSize, bufSize + 1, 3*bufSize + 7} {
		c := dialFrom(t, "127.0.0.1", addr)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		msg, _ := io.ReadAll(io.LimitReader(randomBytes(3), int64(size)))
		c.Write(msg) // one write: the end follows at once
		c.(*net.TCPConn).CloseWrite()
		reply, err := io.ReadAll(c)
		c.Close()
		if want := fmt.Sprintf("%d %x", size, sha256.Sum256(msg)); err != nil || string(reply) != want {
			t.Errorf("%d bytes then the end: node got %q (%v), want %q", size, reply, err, want)
		}
	}
	waitUntil(t, func() bool { return b.ActiveConns() == 0 })
}
