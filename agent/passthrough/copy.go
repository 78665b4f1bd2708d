package passthrough

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// bufSize is the copy buffer, taken from a pool only while bytes move.
const bufSize = 32 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, bufSize); return &b }}

// splice forwards bytes both ways between client and upstream, in two
// goroutines of its own, until both directions end, carrying half-closes
// across, or until neither direction has moved a byte for idle; then it
// calls done. It returns at once and closes neither connection. toUp and
// toClient count the bytes forwarded each way.
func splice(client, upstream net.Conn, idle time.Duration, toUp, toClient *atomic.Int64, done func()) {
	h := &halves{done: done}
	h.last.Store(time.Now().UnixNano())
	h.left.Store(2)
	go copyHalf(upstream, client, idle, h, toUp)
	go copyHalf(client, upstream, idle, h, toClient)
}

// halves is what the two directions of one connection share.
type halves struct {
	last atomic.Int64 // UnixNano of the last byte moved either way
	left atomic.Int32 // directions still running
	done func()
}

func (h *halves) finish() {
	if h.left.Add(-1) == 0 {
		h.done()
	}
}

// copyHalf copies src to dst. While src is idle it holds no buffer: it
// waits for readability through the descriptor, then borrows a buffer for
// one read and write. At src's EOF it half-closes dst. If neither
// direction has moved for idle, it closes both to end the other half too.
func copyHalf(dst, src net.Conn, idle time.Duration, h *halves, count *atomic.Int64) {
	defer h.finish()
	last := &h.last
	for {
		src.SetReadDeadline(time.Unix(0, last.Load()).Add(idle))
		err := waitReadable(src)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			if time.Since(time.Unix(0, last.Load())) < idle {
				continue // the other direction moved: not idle
			}
			src.Close()
			dst.Close()
			return
		}
		if err != nil {
			dst.Close()
			return
		}
		bp := bufPool.Get().(*[]byte)
		n, rerr := src.Read(*bp)
		if n > 0 {
			last.Store(time.Now().UnixNano())
			if _, werr := dst.Write((*bp)[:n]); werr != nil {
				bufPool.Put(bp)
				src.Close()
				return
			}
			count.Add(int64(n))
		}
		bufPool.Put(bp)
		if rerr == io.EOF {
			closeWrite(dst)
			return
		}
		if rerr != nil && !errors.Is(rerr, os.ErrDeadlineExceeded) {
			dst.Close()
			return
		}
	}
}

// waitReadable blocks until c has data or EOF to read, without reading.
func waitReadable(c net.Conn) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil // not a socket: just read
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	var peekErr error
	err = rc.Read(func(fd uintptr) bool {
		var b [1]byte
		_, _, e := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		if e == unix.EAGAIN {
			return false
		}
		if e != nil && e != unix.EINTR {
			peekErr = e
		}
		return true
	})
	if err != nil {
		return err
	}
	if peekErr != nil {
		return peekErr
	}
	return nil
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		return
	}
	c.Close()
}
