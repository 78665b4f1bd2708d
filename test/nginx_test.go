package test

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
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
		module, dir, dir, strings.ReplaceAll(stream, "/var/log/nginx/", dir+"/"))
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

// The exports say every setting: the header names each flag, what the
// engine has is written, and what it lacks is a comment naming the flag.
func TestExportsSayEverySetting(t *testing.T) {
	pair, err := fixture.WritePair(t.TempDir(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"balance", "--listen", ":443", "--upstream", "10.0.0.1:443", "--upstream", "10.0.0.2:443,weight=2",
		"--sni-allow", "chat.example.test", "--redirect-http", ":80", "--site-url", "https://chat.example.test",
		"--acme-webroot", "/var/www/acme", "--health-check", "ping", "--health-server-name", "chat.example.test",
		"--ca-file", pair.RootFile, "--max-conns", "1000", "--drain-timeout", "1m", "--agent-check-port", "9470"}
	for _, engine := range []string{"nginx", "haproxy"} {
		r := runMMTLS(t, append(args, "--print", engine)...)
		if r.code != 0 {
			t.Fatalf("--print %s:\n%s", engine, r)
		}
		header, _, _ := strings.Cut(r.stdout, "\n")
		for _, flag := range []string{"--sni-allow", "--redirect-http", "--site-url", "--acme-webroot", "--health-check", "--ca-file", "--max-conns", "--drain-timeout", "--agent-check-port"} {
			if !strings.Contains(header, flag) {
				t.Errorf("%s: the header omits %s: %s", engine, flag, header)
			}
		}
		want := map[string][]string{
			"nginx": {"stream {} goes at the top level", "map $ssl_preread_server_name", "access_log", "return 301 https://chat.example.test$request_uri",
				"root /var/www/acme", "limit_conn mmtls_conns 1000", "#   --health-check ping:", "#   --ca-file:", "#   --drain-timeout:", "#   --agent-check-port 9470:"},
			"haproxy": {"log /dev/log", "option tcplog", "req.ssl_sni -i chat.example.test", "check-sni chat.example.test", "verify required",
				"ca-file " + pair.RootFile, "maxconn 1000", "redirect prefix https://chat.example.test", "#   --acme-webroot:", "#   --drain-timeout:",
				"agent-check agent-port 9470 agent-inter 2000ms", "http-check send hdr Host chat.example.test", "id 2"},
		}[engine]
		for _, w := range want {
			if !strings.Contains(r.stdout, w) {
				t.Errorf("--print %s lacks %q:\n%s", engine, w, r.stdout)
			}
		}
		if engine == "nginx" {
			checkNginx(t, r.stdout)
		} else {
			checkHAProxy(t, r.stdout)
		}
	}
	// Without --health-check HAProxy still checks (a TCP connect is free).
	r := runMMTLS(t, "balance", "--listen", ":443", "--upstream", "10.0.0.1:443", "--print", "haproxy")
	if !strings.Contains(r.stdout, "server node1 10.0.0.1:443 id 1 check") {
		t.Errorf("--print haproxy without --health-check has no check:\n%s", r.stdout)
	}
}

// checkHAProxy runs haproxy -c on a configuration mmtls wrote.
func checkHAProxy(t *testing.T, cfg string) {
	t.Helper()
	haproxy := needTool(t, "haproxy", "/usr/sbin/haproxy")
	path := filepath.Join(t.TempDir(), "haproxy.cfg")
	os.WriteFile(path, []byte(cfg), 0o644)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, haproxy, "-c", "-f", path).CombinedOutput(); err != nil {
		t.Errorf("haproxy -c: %v\n%s\n%s", err, out, cfg)
	}
}

// A real nginx running the export closes what mmtls balance closes (a
// server name not allowed, plain HTTP on the TLS port) and redirects and
// serves ACME challenges as it does.
func TestNginxExportBehavesAsTheBalancer(t *testing.T) {
	node := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "node") }))
	node.StartTLS()
	defer node.Close()
	webroot := t.TempDir()
	// nginx's workers run as nobody: the webroot must be theirs to read.
	os.Chmod(filepath.Dir(webroot), 0o755)
	os.Chmod(webroot, 0o755)
	os.MkdirAll(filepath.Join(webroot, ".well-known", "acme-challenge"), 0o755)
	os.WriteFile(filepath.Join(webroot, ".well-known", "acme-challenge", "tok123"), []byte("tok123.thumb"), 0o644)
	flags := []string{"--upstream", node.Listener.Addr().String(), "--sni-allow", "chat.example.test",
		"--site-url", "https://chat.example.test", "--acme-webroot", webroot}

	nginxTLS, _ := fixture.PickPort()
	nginxHTTP, _ := fixture.PickPort()
	r := runMMTLS(t, append([]string{"balance", "--listen", nginxTLS, "--redirect-http", nginxHTTP, "--print", "nginx"}, flags...)...)
	if r.code != 0 {
		t.Fatalf("--print nginx:\n%s", r)
	}
	startNginx(t, r.stdout)
	balHTTP, _ := fixture.PickPort()
	bal := startBalancer(t, append([]string{"--redirect-http", balHTTP}, flags...)...)

	for _, engine := range []struct{ name, tls, http string }{{"nginx", nginxTLS, nginxHTTP}, {"mmtls", bal.addr, balHTTP}} {
		waitFor(t, 10*time.Second, func() error { return handshake(engine.tls, "chat.example.test") })
		if err := handshake(engine.tls, "other.example.test"); err == nil {
			t.Errorf("%s: a server name not allowed reached the node", engine.name)
		}
		c, err := net.DialTimeout("tcp", engine.tls, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(15 * time.Second))
		io.WriteString(c, "GET / HTTP/1.0\r\n\r\n")
		if got, _ := io.ReadAll(c); len(got) != 0 {
			t.Errorf("%s: plain HTTP on the TLS port reached the node: %q", engine.name, got)
		}
		c.Close()

		client := &http.Client{Timeout: 5 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		resp, err := client.Get("http://" + engine.http + "/channels/town-square?x=1")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 301 || resp.Header.Get("Location") != "https://chat.example.test/channels/town-square?x=1" {
			t.Errorf("%s: redirect: %d %q", engine.name, resp.StatusCode, resp.Header.Get("Location"))
		}
		resp, err = client.Get("http://" + engine.http + "/.well-known/acme-challenge/tok123")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != "tok123.thumb" {
			t.Errorf("%s: ACME challenge: %d %q", engine.name, resp.StatusCode, body)
		}
	}
}

// handshake completes a TLS handshake through addr with server name sni.
func handshake(addr, sni string) error {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: &tls.Config{ServerName: sni, InsecureSkipVerify: true}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	return c.Close()
}
