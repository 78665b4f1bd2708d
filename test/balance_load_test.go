package test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mmtls/mmtls/test/fixture"
)

// SIGHUP with 1,000 live connections: the config is re-read (a node
// added), none of them is dropped, new ones reach the new node.
func TestBalanceReloadKeepsLiveConnections(t *testing.T) {
	a, b := newEchoBackend(t, "a"), newEchoBackend(t, "b")
	cfg := filepath.Join(t.TempDir(), "mmtls.toml")
	write := func(ups ...string) {
		q := make([]string, len(ups))
		for i, u := range ups {
			q[i] = strconv.Quote(u)
		}
		body := fmt.Sprintf("[balance]\nupstreams = [%s]\nsni_peek = false\nmethod = \"round-robin\"\n", strings.Join(q, ", "))
		if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(a.addr())
	p := startBalancer(t, "--config", cfg)
	const n = 1000
	sessions := make([]*session, 0, n)
	defer func() {
		for _, s := range sessions {
			s.c.Close()
		}
	}()
	for i := range n {
		s := openSession(t, p.addr, fmt.Sprintf("127.0.%d.%d", 1+i/250, 1+i%250))
		sessions = append(sessions, s)
	}
	write(a.addr(), b.addr())
	p.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, 10*time.Second, func() error {
		if !strings.Contains(p.stderr.String(), "balancer configuration updated") {
			return fmt.Errorf("no reload logged")
		}
		return nil
	})
	var broken atomic.Int64
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := i; j < n; j += 10 {
				if err := sessions[j].echo(); err != nil {
					broken.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if broken.Load() > 0 {
		t.Errorf("%d of %d live connections broken by the reload", broken.Load(), n)
	}
	seen := map[string]bool{}
	for range 4 {
		s := openSession(t, p.addr, "127.0.0.1")
		seen[s.node] = true
		s.c.Close()
	}
	if !seen["b"] {
		t.Errorf("the node added by the reload gets no connections: %v", seen)
	}
}

// 10,000 connection attempts against a balancer limited to 64 file
// descriptors: no crash, no busy loop while descriptors are short, and
// full service once they are free again.
func TestBalanceLowFDLimit(t *testing.T) {
	a := newEchoBackend(t, "a")
	addr, _ := fixture.PickPort()
	sock := filepath.Join(t.TempDir(), "balance.sock")
	cmd := exec.Command("/bin/sh", "-c", fmt.Sprintf("ulimit -n 64 && exec %s balance --listen %s --upstream %s --sni-peek=false --control-socket %s --log-level error",
		mmtlsBin, addr, a.addr(), sock))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(40 * time.Second):
			cmd.Process.Kill()
		}
	}()
	waitFor(t, 10*time.Second, func() error { _, err := via(addr, "127.0.0.1"); return err })

	// Hold connections until the balancer runs out of descriptors.
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for range 60 {
		c, err := net.DialTimeout("tcp", addr, 500*time.Millisecond)
		if err != nil {
			break
		}
		held = append(held, c)
	}
	cpuBefore, wallBefore := cpuTime(t, cmd.Process.Pid), time.Now()
	var attempts, served atomic.Int64
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil && attempts.Add(1) <= 10000 {
				d := net.Dialer{Timeout: 100 * time.Millisecond}
				c, err := d.DialContext(ctx, "tcp", addr)
				if err != nil {
					continue
				}
				c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
				if _, err := c.Read(make([]byte, 2)); err == nil {
					served.Add(1)
				}
				c.Close()
			}
		}()
	}
	wg.Wait()
	wall := time.Since(wallBefore)
	cpu := cpuTime(t, cmd.Process.Pid) - cpuBefore
	select {
	case <-done:
		t.Fatal("the balancer died")
	default:
	}
	t.Logf("%d attempts in %s, %d served while short of descriptors; balancer CPU %s", min(attempts.Load(), 10000), wall.Round(time.Millisecond), served.Load(), cpu)
	if cpu > wall/2 {
		t.Errorf("balancer used %s of CPU in %s: a busy accept loop?", cpu, wall)
	}
	for _, c := range held {
		c.Close()
	}
	held = nil
	waitFor(t, 15*time.Second, func() error {
		name, err := via(addr, "127.0.0.1")
		if err != nil || name != "a" {
			return fmt.Errorf("after the burst: %q %v", name, err)
		}
		return nil
	})
}

// cpuTime reads a process's user+system CPU time from /proc.
func cpuTime(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * time.Second / 100 // clock ticks, USER_HZ = 100
}
