package test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mmtls/mmtls/agent/passthrough"
	"github.com/mmtls/mmtls/test/fixture"
)

func needTool(t *testing.T, name string, alt ...string) string {
	t.Helper()
	for _, n := range append([]string{name}, alt...) {
		if p, err := exec.LookPath(n); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s is not installed; .ci/run installs it", name)
	}
	t.Skipf("%s is not installed", name)
	return ""
}

// namedBackends listen on loopback and greet each client with their name.
func namedBackends(t *testing.T, n int) []string {
	t.Helper()
	var addrs []string
	for i := range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		name := fmt.Sprintf("node%d", i+1)
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "%s\n", name)
				c.Close()
			}
		}()
		addrs = append(addrs, ln.Addr().String())
	}
	return addrs
}

// via connects to addr from src and returns the backend's name.
func via(addr, src string) (string, error) {
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// checkNginx runs nginx -t on the stream block mmtls writes and returns
// the nginx binary and the config file.
func checkNginx(t *testing.T, stream string) (string, string) {
	t.Helper()
	nginx := needTool(t, "nginx", "/usr/sbin/nginx")
	module := "/usr/lib/nginx/modules/ngx_stream_module.so"
	if _, err := os.Stat(module); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("nginx's stream module is not installed (libnginx-mod-stream)")
		}
		t.Skip("nginx's stream module is not installed (libnginx-mod-stream)")
	}
	dir := t.TempDir()
	conf := fmt.Sprintf("load_module %s;\npid %s/nginx.pid;\nerror_log %s/error.log;\nworker_processes 1;\nevents {}\n%s",
		module, dir, dir, stream)
	path := filepath.Join(dir, "nginx.conf")
	os.WriteFile(path, []byte(conf), 0o644)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, nginx, "-t", "-p", dir, "-c", path).CombinedOutput(); err != nil {
		t.Fatalf("nginx -t on mmtls's configuration: %v\n%s\n%s", err, out, stream)
	}
	return nginx, path
}

// startNginx runs a real nginx with the stream block mmtls writes.
func startNginx(t *testing.T, stream string) {
	t.Helper()
	nginx, path := checkNginx(t, stream)
	dir := filepath.Dir(path)
	cmd := exec.Command(nginx, "-p", dir, "-c", path, "-g", "daemon off;")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGQUIT)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
	})
}

// The balancer maps clients to nodes exactly as a real nginx with
// `hash $remote_addr consistent` does, weights included.
func TestHashMappingEqualsNginx(t *testing.T) {
	for _, weighted := range []bool{false, true} {
		t.Run(fmt.Sprintf("weighted=%v", weighted), func(t *testing.T) {
			backends := namedBackends(t, 3)
			listen, _ := fixture.PickPort()
			args := []string{"balance", "--listen", listen, "--sni-peek=false", "--print", "nginx"}
			cfg := passthrough.Config{DisableSNIPeek: true}
			for i, b := range backends {
				up := passthrough.Upstream{Addr: b}
				arg := b
				if weighted && i == 0 {
					up.Weight, arg = 3, b+",weight=3"
				}
				cfg.Upstreams = append(cfg.Upstreams, up)
				args = append(args, "--upstream", arg)
			}
			r := runMMTLS(t, args...)
			if r.code != 0 {
				t.Fatalf("mmtls balance --print nginx:\n%s", r)
			}
			startNginx(t, r.stdout)
			waitFor(t, 10*time.Second, func() error { _, err := via(listen, "127.0.0.1"); return err })

			bal, err := passthrough.New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			go bal.Serve(context.Background(), ln)
			defer func() {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				bal.Shutdown(ctx)
			}()

			counts := map[string]int{}
			for i := 1; i <= 60; i++ {
				src := fmt.Sprintf("127.0.%d.%d", i/50, 1+i%50)
				want, err := via(listen, src)
				if err != nil {
					t.Fatalf("via nginx from %s: %v", src, err)
				}
				got, err := via(ln.Addr().String(), src)
				if err != nil {
					t.Fatalf("via mmtls from %s: %v", src, err)
				}
				if got != want {
					t.Errorf("client %s: nginx sends it to %s, mmtls to %s", src, want, got)
				}
				counts[want]++
			}
			if len(counts) < 2 {
				t.Errorf("all 60 clients on one node (%v): the comparison proves little", counts)
			}
		})
	}
}

// The HAProxy configuration mmtls writes is valid.
func TestHAProxyConfigValid(t *testing.T) {
	haproxy := needTool(t, "haproxy", "/usr/sbin/haproxy")
	r := runMMTLS(t, "balance", "--listen", "127.0.0.1:8443", "--upstream", "127.0.0.1:9001", "--upstream", "127.0.0.1:9002,weight=2",
		"--health-check", "ping", "--health-server-name", "chat.example.test", "--print", "haproxy")
	if r.code != 0 {
		t.Fatalf("--print haproxy:\n%s", r)
	}
	path := filepath.Join(t.TempDir(), "haproxy.cfg")
	os.WriteFile(path, []byte(r.stdout), 0o644)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, haproxy, "-c", "-f", path).CombinedOutput(); err != nil {
		t.Errorf("haproxy -c: %v\n%s\n%s", err, out, r.stdout)
	}
}

// The exports accept the listen addresses the README shows (":443", and
// IPv6's "[::]:443"): nginx refuses "listen :443;".
func TestExportsTakeTheREADMEsAddresses(t *testing.T) {
	args := []string{"balance", "--listen", ":443", "--listen", "[::]:443", "--upstream", "127.0.0.1:9001", "--upstream", "127.0.0.1:9002"}
	r := runMMTLS(t, append(args, "--print", "nginx")...)
	if r.code != 0 || !strings.Contains(r.stdout, "listen 443;") || !strings.Contains(r.stdout, "listen [::]:443;") {
		t.Fatalf("--print nginx:\n%s", r)
	}
	checkNginx(t, r.stdout)
	haproxy := needTool(t, "haproxy", "/usr/sbin/haproxy")
	r = runMMTLS(t, append(args, "--print", "haproxy")...)
	path := filepath.Join(t.TempDir(), "haproxy.cfg")
	os.WriteFile(path, []byte(r.stdout), 0o644)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, haproxy, "-c", "-f", path).CombinedOutput(); r.code != 0 || err != nil {
		t.Errorf("haproxy -c: %v\n%s\n%s", err, out, r.stdout)
	}
}
