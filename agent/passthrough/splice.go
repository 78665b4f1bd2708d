package passthrough

import (
	"io"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// Bulk transfers move from socket to socket through a pipe with splice(2),
// never through user space. A direction borrows a pipe only while it moves
// bulk (see copyHalf): it takes one when its socket is readable, splices
// what is there, drains the pipe into the other socket and gives the pipe
// back, so a connection that waits holds no pipe, and an interactive one
// (small reads) never takes one.

// pipeSize is the capacity asked of each pipe (F_SETPIPE_SZ): one splice
// moves up to this much. A pipe holds page references, not copies; a
// smaller capacity (an unprivileged limit) only means more calls.
const pipeSize = 1 << 20

// maxPipes bounds the pipes borrowed at once, two descriptors each; a
// direction that finds none copies through a buffer until one is free.
// keepPipes is how many drained pipes wait for the next bulk direction.
const (
	maxPipes  = 512
	keepPipes = 16
)

type pipe struct{ r, w int }

type pipePool struct {
	mu   sync.Mutex
	free []*pipe
	live int // borrowed or free
	// spliced counts the bytes that went through pipes (for the tests).
	spliced atomic.Int64
}

// borrowed is the number of pipes lent out now.
func (p *pipePool) borrowed() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.live - len(p.free)
}

var pipes pipePool

// get returns a free pipe, a new one, or nil at maxPipes or when the
// system has no descriptor left.
func (p *pipePool) get() *pipe {
	p.mu.Lock()
	if n := len(p.free); n > 0 {
		pp := p.free[n-1]
		p.free = p.free[:n-1]
		p.mu.Unlock()
		return pp
	}
	if p.live >= maxPipes {
		p.mu.Unlock()
		return nil
	}
	p.live++
	p.mu.Unlock()
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		p.mu.Lock()
		p.live--
		p.mu.Unlock()
		return nil
	}
	unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, pipeSize)
	return &pipe{r: fds[0], w: fds[1]}
}

// put gives back a pipe. One that may still hold bytes (a write failed
// half-way) is closed, never lent again.
func (p *pipePool) put(pp *pipe, drained bool) {
	p.mu.Lock()
	if drained && len(p.free) < keepPipes {
		p.free = append(p.free, pp)
		p.mu.Unlock()
		return
	}
	p.live--
	p.mu.Unlock()
	unix.Close(pp.r)
	unix.Close(pp.w)
}

// spliceReady moves what src has to dst through a borrowed pipe, waiting
// for src to be readable without holding one. It returns the bytes that
// reached dst, the read's error (io.EOF at src's end) and the write's. ok
// is false when nothing was tried: no pipe was free, or the sockets cannot
// splice; the caller copies through a buffer instead.
func spliceReady(dst, src syscall.RawConn) (n int, rerr, werr error, ok bool) {
	var (
		p       *pipe
		in      int
		nopipe  bool
		spliced = unix.SPLICE_F_MOVE | unix.SPLICE_F_NONBLOCK
	)
	err := src.Read(func(fd uintptr) bool {
		if p = pipes.get(); p == nil {
			nopipe = true
			return true
		}
		var m int64
		m, rerr = unix.Splice(int(fd), nil, p.w, nil, pipeSize, spliced)
		in = int(m)
		if rerr == unix.EAGAIN {
			pipes.put(p, true)
			p = nil
			return false // wait for readability, holding nothing
		}
		return true
	})
	switch {
	case nopipe:
		return 0, nil, nil, false
	case err != nil:
		if p != nil {
			pipes.put(p, true)
		}
		return 0, err, nil, true
	case rerr == unix.EINVAL && in <= 0:
		pipes.put(p, true)
		return 0, nil, nil, false
	case rerr != nil:
		pipes.put(p, true)
		return 0, rerr, nil, true
	case in == 0:
		pipes.put(p, true)
		return 0, io.EOF, nil, true
	}
	left := in
	err = dst.Write(func(fd uintptr) bool {
		for left > 0 {
			m, e := unix.Splice(p.r, nil, int(fd), nil, left, spliced)
			switch {
			case e == unix.EAGAIN:
				return false // dst is full: wait, holding the pipe's bytes
			case e != nil:
				werr = e
				return true
			case m == 0:
				werr = io.ErrShortWrite
				return true
			}
			left -= int(m)
		}
		return true
	})
	if err != nil && werr == nil {
		werr = err
	}
	pipes.put(p, left == 0)
	pipes.spliced.Add(int64(in - left))
	return in - left, nil, werr, true
}
