package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const serverName = "chat.example.test"

func netListen() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }

// dialTCP connects from 127.0.0.(1+src%8), so hashing proxies use both backends.
func dialTCP(ctx context.Context, addr string, src int) (net.Conn, error) {
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+src%8))}}
	return d.DialContext(ctx, "tcp", addr)
}

// client opens a connection (through the target, or straight to a
// backend) and sends the protocol byte.
type client struct {
	roots   *x509.CertPool
	tlsMode bool
	addrFor func(src int) string
}

func (cl *client) open(ctx context.Context, src int, cmd byte) (net.Conn, error) {
	c, err := dialTCP(ctx, cl.addrFor(src), src)
	if err != nil {
		return nil, err
	}
	if cl.tlsMode {
		tc := tls.Client(c, &tls.Config{ServerName: serverName, RootCAs: cl.roots})
		if err := tc.HandshakeContext(ctx); err != nil {
			c.Close()
			return nil, err
		}
		c = tc
	}
	if _, err := c.Write([]byte{cmd}); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// throughput returns the bytes moved over streams in d, downloading ('D')
// or uploading ('U').
func (cl *client) throughput(cmd byte, streams int, d time.Duration) (int64, error) {
	var total atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, streams)
	deadline := time.Now().Add(d)
	for i := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := cl.open(context.Background(), i, cmd)
			if err != nil {
				errc <- err
				return
			}
			defer c.Close()
			c.SetDeadline(deadline)
			buf := make([]byte, 64<<10)
			for time.Now().Before(deadline) {
				var n int
				if cmd == 'D' {
					n, err = c.Read(buf)
				} else {
					n, err = c.Write(buf)
				}
				total.Add(int64(n))
				if err != nil {
					return
				}
			}
		}()
	}
	wg.Wait()
	select {
	case err := <-errc:
		return 0, err
	default:
	}
	return total.Load(), nil
}

// connRate returns the connections made in d, each with a 16-byte
// request and reply.
func (cl *client) connRate(workers int, d time.Duration) (int64, error) {
	var count, fails atomic.Int64
	var wg sync.WaitGroup
	deadline := time.Now().Add(d)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := make([]byte, 16)
			for i := 0; time.Now().Before(deadline); i++ {
				c, err := cl.open(context.Background(), w*7919+i, 'E')
				if err != nil {
					fails.Add(1)
					continue
				}
				c.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := c.Write(req); err == nil {
					if _, err := io.ReadFull(c, req); err == nil {
						count.Add(1)
					}
				}
				c.Close()
			}
		}()
	}
	wg.Wait()
	if count.Load() == 0 {
		return 0, fmt.Errorf("no connection completed (%d failed)", fails.Load())
	}
	return count.Load(), nil
}

// rtt returns the p50 and p99 of a 64-byte round trip, in microseconds.
func (cl *client) rtt(n int) (float64, float64, error) {
	c, err := cl.open(context.Background(), 3, 'E')
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Minute))
	buf := make([]byte, 64)
	lat := make([]float64, 0, n)
	for range n {
		t := time.Now()
		if _, err := c.Write(buf); err != nil {
			return 0, 0, err
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return 0, 0, err
		}
		lat = append(lat, float64(time.Since(t).Nanoseconds())/1000)
	}
	sort.Float64s(lat)
	return lat[len(lat)/2], lat[len(lat)*99/100], nil
}

// idleConns opens n connections that each carry one small exchange and
// then stay idle; close releases them.
func (cl *client) idleConns(n int) (close func(), err error) {
	conns := make([]net.Conn, 0, n)
	closeAll := func() {
		for _, c := range conns {
			c.Close()
		}
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	var firstErr error
	var failed atomic.Bool // stop opening at the first failure
	for i := range n {
		if failed.Load() {
			break
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := cl.open(context.Background(), i, 'E')
			if err == nil {
				c.SetDeadline(time.Now().Add(10 * time.Second))
				b := []byte("0123456789abcdef")
				if _, err = c.Write(b); err == nil {
					_, err = io.ReadFull(c, b)
				}
				c.SetDeadline(time.Time{})
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed.Store(true)
				if firstErr == nil {
					firstErr = err
				}
				if c != nil {
					c.Close()
				}
				return
			}
			conns = append(conns, c)
		}()
	}
	wg.Wait()
	if firstErr != nil {
		closeAll()
		return nil, firstErr
	}
	return closeAll, nil
}

// memSnapshot is what the memory figure compares.
type memSnapshot struct {
	rssKiB, fds int64
	sunreclaim  int64 // KiB, system-wide
}

func snapshot(pids []int) memSnapshot {
	var s memSnapshot
	for _, pid := range pids {
		s.rssKiB += statusField(pid, "VmRSS:")
		if es, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
			s.fds += int64(len(es))
		}
	}
	s.sunreclaim = meminfo("SUnreclaim:")
	return s
}

// clockTick is the unit of utime and stime in /proc/PID/stat (USER_HZ,
// 100 on every Linux this runs on).
const clockTick = 10 * time.Millisecond

// cpuTime is the CPU time, user and system, the processes have used so
// far, all their threads included.
func cpuTime(pids []int) time.Duration {
	var t time.Duration
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		// The command name, in parentheses, may hold spaces: count the
		// fields after its closing parenthesis (utime and stime are the
		// 14th and 15th of the line).
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(f) < 13 {
			continue
		}
		u, _ := strconv.ParseInt(f[11], 10, 64)
		s, _ := strconv.ParseInt(f[12], 10, 64)
		t += time.Duration(u+s) * clockTick
	}
	return t
}

func statusField(pid int, key string) int64 {
	return procField(fmt.Sprintf("/proc/%d/status", pid), key)
}

func meminfo(key string) int64 { return procField("/proc/meminfo", key) }

// procField returns the number after key in a /proc file of "Key: N kB" lines.
func procField(path, key string) int64 {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, key) {
			f := strings.Fields(line)
			n, _ := strconv.ParseInt(f[1], 10, 64)
			return n
		}
	}
	return 0
}

// machineCPU is the whole machine's CPU time so far, from /proc/stat:
// busy (user, nice, system, irq, softirq) and idle (idle, iowait), and
// the time stolen by the hypervisor.
func machineCPU() (busy, idle, steal time.Duration) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	v := func(i int) time.Duration {
		if i >= len(f) {
			return 0
		}
		n, _ := strconv.ParseInt(f[i], 10, 64)
		return time.Duration(n) * clockTick
	}
	return v(1) + v(2) + v(3) + v(6) + v(7), v(4) + v(5), v(8)
}
