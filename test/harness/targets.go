package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// target is a way to reach the backends: directly or through a proxy.
// start runs the proxy in front of the given backends.
type target struct {
	name   string
	start  func(tlsMode bool, backends []string) (addr string, pids func() []int, stop func(), conf string, err error)
	direct bool
}

type proc struct {
	cmd *exec.Cmd
}

func startProc(name string, args ...string) (*proc, error) {
	cmd := exec.Command(name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return &proc{cmd: cmd}, nil
}

func (p *proc) stop() {
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	done := make(chan struct{})
	go func() { p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
}

// groupPIDs lists the processes of a process group (nginx's workers).
func groupPIDs(pgid int) []int {
	var out []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if g, err := syscall.Getpgid(pid); err == nil && g == pgid {
			out = append(out, pid)
		}
	}
	return out
}

func waitListening(addr string) error {
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := dialTCP(context.Background(), addr, 0); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s not listening", addr)
}

func freePort() string {
	ln, err := netListen()
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func mmtlsTarget(bin string, dir string) target {
	return target{name: "mmtls", start: func(tlsMode bool, backends []string) (string, func() []int, func(), string, error) {
		addr := freePort()
		args := []string{"balance", "--listen", addr, "--control-socket", filepath.Join(dir, "balance.sock"), "--log-level", "error",
			"--sni-peek=" + strconv.FormatBool(tlsMode)}
		for _, b := range backends {
			args = append(args, "--upstream", b)
		}
		p, err := startProc(bin, args...)
		if err != nil {
			return "", nil, nil, "", err
		}
		if err := waitListening(addr); err != nil {
			p.stop()
			return "", nil, nil, "", err
		}
		return addr, func() []int { return []int{p.cmd.Process.Pid} }, p.stop, "mmtls " + strings.Join(args, " "), nil
	}}
}

func nginxTarget(dir string) target {
	return target{name: "nginx", start: func(tlsMode bool, backends []string) (string, func() []int, func(), string, error) {
		addr := freePort()
		var up strings.Builder
		for _, b := range backends {
			fmt.Fprintf(&up, "        server %s;\n", b)
		}
		preread := ""
		if tlsMode {
			preread = "        ssl_preread on;\n"
		}
		conf := fmt.Sprintf(`load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes %s;
worker_rlimit_nofile 20000;
pid %s/nginx.pid;
error_log %s/nginx-error.log error;
events { worker_connections 20000; }
stream {
    upstream mm {
        hash $remote_addr consistent;
%s    }
    server {
        listen %s;
%s        proxy_pass mm;
    }
}
`, *nginxWorkers, dir, dir, up.String(), addr, preread)
		path := filepath.Join(dir, "nginx.conf")
		os.WriteFile(path, []byte(conf), 0o644)
		pids, stop, err := startGroup(addr, "nginx", "-p", dir, "-c", path, "-g", "daemon off;")
		return addr, pids, stop, conf, err
	}}
}

func haproxyTarget(dir string) target {
	return target{name: "haproxy", start: func(tlsMode bool, backends []string) (string, func() []int, func(), string, error) {
		addr := freePort()
		var srv strings.Builder
		for i, b := range backends {
			fmt.Fprintf(&srv, "    server s%d %s\n", i, b)
		}
		inspect := ""
		if tlsMode {
			inspect = "    tcp-request inspect-delay 5s\n    tcp-request content accept if { req_ssl_hello_type 1 }\n"
		}
		conf := fmt.Sprintf(`global
    maxconn 9950
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend fe
    bind %s
%s    default_backend be
backend be
    balance source
    hash-type consistent
%s`, addr, inspect, srv.String())
		path := filepath.Join(dir, "haproxy.cfg")
		os.WriteFile(path, []byte(conf), 0o644)
		pids, stop, err := startGroup(addr, "haproxy", "-db", "-f", path)
		return addr, pids, stop, conf, err
	}}
}

// startGroup starts a proxy in its own process group and waits until it
// listens on addr; pids lists the group's processes (nginx's workers).
func startGroup(addr, name string, args ...string) (pids func() []int, stop func(), err error) {
	p, err := startProc(name, args...)
	if err != nil {
		return nil, nil, err
	}
	if err := waitListening(addr); err != nil {
		p.stop()
		return nil, nil, err
	}
	pg := p.cmd.Process.Pid
	return func() []int { return groupPIDs(pg) }, p.stop, nil
}

// startBackend runs one backend process and returns its address.
func startBackend(self string, certFile, keyFile string) (string, *proc, error) {
	args := []string{"backend"}
	if certFile != "" {
		args = append(args, "--cert", certFile, "--key", keyFile)
	}
	cmd := exec.Command(self, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return "", nil, err
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		return "", nil, err
	}
	return strings.TrimSpace(line), &proc{cmd: cmd}, nil
}

// allTargets lists every target, in the order of a run's first repetition.
func allTargets(self, bin, dir string) []target {
	return []target{{name: "direct", direct: true}, mmtlsTarget(bin, dir), nginxTarget(dir), haproxyTarget(dir), naiveTarget(self)}
}

// naiveTarget is the harness's own naive Go proxy (see naiveMain).
func naiveTarget(self string) target {
	return target{name: "naive", start: func(_ bool, backends []string) (string, func() []int, func(), string, error) {
		addr := freePort()
		args := []string{"naive", "--listen", addr}
		for _, b := range backends {
			args = append(args, "--upstream", b)
		}
		pids, stop, err := startGroup(addr, self, args...)
		return addr, pids, stop, "harness " + strings.Join(args, " "), err
	}}
}
