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

// forward forwards bytes both ways between client and upstream, in two
// goroutines of its own, until both directions end, carrying half-closes
// across, or until neither direction has moved a byte for idle; then it
// calls done with what moved and why it ended. It returns at once and
// closes neither connection. toUp and toClient count the bytes forwarded
// each way (the upstream's totals); sent is what the client had sent
// before (the replayed ClientHello), counted in the connection's bytes.
func forward(client, upstream net.Conn, idle time.Duration, toUp, toClient *atomic.Int64, sent int64, done func(copied)) {
	h := &halves{done: done}
	h.out.bytes[fromClient] = sent
	h.last.Store(time.Now().UnixNano())
	h.left.Store(2)
	go copyHalf(upstream, client, idle, h, toUp, fromClient)
	go copyHalf(client, upstream, idle, h, toClient, fromUpstream)
}

// The directions of a connection, by the side bytes come from.
const (
	fromClient = iota
	fromUpstream
)

// copied is what one connection moved and why it ended.
type copied struct {
	bytes  [2]int64 // by direction
	reason string   // the first end: "client closed", "idle timeout"...
}

// halves is what the two directions of one connection share.
type halves struct {
	last  atomic.Int64 // UnixNano of the last byte moved either way
	left  atomic.Int32 // directions still running
	first atomic.Int32 // 1 + the direction that ended first on its own
	// Each direction writes only its own element; done reads both after
	// the last direction's decrement of left.
	out  copied
	why  [2]string
	done func(copied)
}

// end records why direction dir ended. Ends caused by the other direction
// closing (net.ErrClosed) pass reason "" and never count as the first.
func (h *halves) end(dir int, reason string) {
	if reason != "" {
		h.why[dir] = reason
		h.first.CompareAndSwap(0, int32(dir)+1)
	}
	if h.left.Add(-1) == 0 {
		if f := h.first.Load(); f > 0 {
			h.out.reason = h.why[f-1]
		}
		h.done(h.out)
	}
}

// Why a direction ended, by its source.
var (
	closedBy  = [2]string{"client closed", "node closed"}
	failedBy  = [2]string{"client error", "node error"}
	writeFail = [2]string{"write to node failed", "write to client failed"}
)

// copyHalf copies src to dst. While src is idle it holds no buffer: it
// waits for readability through the descriptor, and a buffer is borrowed
// from the pool only for the read that finds data (and given back when the
// read would block). A read that fills the whole buffer starts bulk: the
// direction then splices through a borrowed pipe (spliceReady) as long as
// each wake-up finds at least a buffer's worth, and goes back to buffers
// when less comes. At src's EOF it half-closes dst. If neither direction
// has moved for idle, it closes both to end the other half too.
func copyHalf(dst, src net.Conn, idle time.Duration, h *halves, count *atomic.Int64, dir int) {
	reason := ""
	defer func() { h.end(dir, reason) }()
	last := &h.last
	rc, rcDst := rawConn(src), rawConn(dst)
	canSplice := rc != nil && rcDst != nil
	bulk := false
	for {
		src.SetReadDeadline(time.Unix(0, last.Load()).Add(idle))
		var (
			n         int
			err, werr error
		)
		if bulk {
			var ok bool
			n, err, werr, ok = spliceReady(rcDst, rc)
			if !ok {
				bulk = false
				continue
			}
			bulk = n >= bufSize
		} else {
			var bp *[]byte
			bp, n, err = readReady(src, rc)
			if n > 0 {
				full := n == len(*bp)
				n, werr = dst.Write((*bp)[:n])
				bulk = canSplice && full && werr == nil
			}
			if bp != nil {
				bufPool.Put(bp)
			}
		}
		if n > 0 {
			last.Store(time.Now().UnixNano())
			count.Add(int64(n))
			h.out.bytes[dir] += int64(n)
		}
		if werr != nil {
			if !errors.Is(werr, net.ErrClosed) {
				reason = writeFail[dir]
			}
			src.Close()
			return
		}
		switch {
		case err == nil:
		case err == io.EOF:
			reason = closedBy[dir]
			closeWrite(dst)
			return
		case errors.Is(err, os.ErrDeadlineExceeded):
			if time.Since(time.Unix(0, last.Load())) < idle {
				continue // the other direction moved: not idle
			}
			reason = "idle timeout"
			src.Close()
			dst.Close()
			return
		default:
			if !errors.Is(err, net.ErrClosed) {
				reason = failedBy[dir]
			}
			dst.Close()
			return
		}
	}
}

// readReady reads what src has, waiting for it without holding a buffer:
// the read is tried when the poller says src is readable, with a buffer
// taken from the pool for that attempt and returned if it would block.
// The caller gives back the returned buffer.
func readReady(src net.Conn, rc syscall.RawConn) (*[]byte, int, error) {
	if rc == nil {
		bp := bufPool.Get().(*[]byte)
		n, err := src.Read(*bp)
		return bp, n, err
	}
	var (
		bp   *[]byte
		n    int
		rerr error
	)
	err := rc.Read(func(fd uintptr) bool {
		bp = bufPool.Get().(*[]byte)
		n, rerr = unix.Read(int(fd), *bp)
		if rerr == unix.EAGAIN {
			bufPool.Put(bp)
			bp = nil
			return false // wait for readability, holding nothing
		}
		return true
	})
	switch {
	case err != nil:
		return bp, 0, err
	case rerr != nil:
		return bp, 0, rerr
	case n == 0:
		return bp, 0, io.EOF
	}
	return bp, n, nil
}

func rawConn(c net.Conn) syscall.RawConn {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		return
	}
	c.Close()
}
