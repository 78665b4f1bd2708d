package test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mmtls/mmtls/test/fixture"
)

// drainCluster is two real Mattermost nodes of one cluster, each on its
// own loopback address with its agent answering agent checks on a port
// they share (a balancer polls HOST:port).
type drainCluster struct {
	r         *rollout
	agentPort int
}

func newDrainCluster(t *testing.T) *drainCluster {
	t.Helper()
	r := newRollout(t, 0)
	ips := []string{"127.0.0.2", "127.0.0.3"}
	dc := &drainCluster{r: r, agentPort: sharedPort(t, ips)}
	for i, ip := range ips {
		tree, listen := newRealTreeOn(t, r.pg, fixture.Mattermost672)
		n := startRealNode(t, tree, listen)
		m := &member{name: fmt.Sprintf("mm%d", i+1), n: n, addr: net.JoinHostPort(ip, strconv.Itoa(sharedPort(t, []string{ip})))}
		restart := fmt.Sprintf(`test ! -e %s/fail || exit 1; %s`, tree.Root, windowScript(m.name, r.windows, tree.StandinCtl(standinBin, "restart")))
		os.WriteFile(filepath.Join(tree.Root, "restart.sh"), []byte(restart+"\n"), 0o700)
		m.conf = r.writeConf(m, r.key)
		f, err := os.OpenFile(m.conf, os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(f, "agent_check = %q\nagent_check_allow = [\"127.0.0.0/8\"]\n", net.JoinHostPort(ip, strconv.Itoa(dc.agentPort)))
		f.Close()
		r.nodes = append(r.nodes, m)
	}
	return dc
}

// start runs every node's agent.
func (dc *drainCluster) start() {
	for _, m := range dc.r.nodes {
		dc.r.start(m)
	}
}

// sharedPort returns a TCP port free on every one of ips.
func sharedPort(t *testing.T, ips []string) int {
	t.Helper()
	for range 50 {
		ln, err := net.Listen("tcp", ips[0]+":0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ok := true
		for _, ip := range ips[1:] {
			l, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
			if err != nil {
				ok = false
				break
			}
			l.Close()
		}
		ln.Close()
		if ok {
			return port
		}
	}
	t.Fatal("no port free on every address")
	return 0
}

// rotate publishes a new pair and waits until both nodes serve it.
func (dc *drainCluster) rotate(t *testing.T) {
	t.Helper()
	_, cert, key := dc.r.chain()
	if res := dc.r.publish(cert, key, "--timeout", "5m"); res.code != 0 {
		t.Fatalf("publish --wait:\n%s", res)
	}
}

// load opens fresh TLS connections through a balancer, about 50 a second
// from rotating client addresses (the balancers hash on them), each
// verified against the cluster's root and asking Mattermost's ping; and a
// few long-lived connections that ask it every 200ms and, when cut,
// reconnect through the balancer after 3s, as Mattermost's clients do.
type load struct {
	addr  string
	roots *x509.CertPool

	ok, failed atomic.Int64
	mu         sync.Mutex
	errs       []string
	cuts       []time.Duration // long-lived: from the cut to working again
	cutNow     atomic.Int32    // long-lived connections cut and not back yet
	stop       chan struct{}
	wg         sync.WaitGroup
}

func startLoad(t *testing.T, addr, rootsFile string) *load {
	t.Helper()
	pem, err := os.ReadFile(rootsFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	l := &load{addr: addr, roots: roots, stop: make(chan struct{})}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		sem := make(chan struct{}, 25) // bounded: at most 25 requests in flight
		for i := 0; ; i++ {
			select {
			case <-l.stop:
				return
			case <-tick.C:
			}
			select {
			case sem <- struct{}{}:
			default:
				l.fail(fmt.Errorf("25 requests in flight: the balancer is stalling"))
				continue
			}
			l.wg.Add(1)
			go func() {
				defer l.wg.Done()
				defer func() { <-sem }()
				src := fmt.Sprintf("127.0.1.%d", 1+i%200)
				if err := l.fresh(src); err != nil {
					l.fail(err)
				} else {
					l.ok.Add(1)
				}
			}()
		}
	}()
	for i := range 4 {
		l.wg.Add(1)
		go l.longLived(fmt.Sprintf("127.0.2.%d", i+1))
	}
	return l
}

func (l *load) fail(err error) {
	l.failed.Add(1)
	l.mu.Lock()
	if len(l.errs) < 20 {
		l.errs = append(l.errs, time.Now().Format("15:04:05.000")+" "+err.Error())
	}
	l.mu.Unlock()
}

// dial makes a verified TLS connection through the balancer from src.
func (l *load) dial(src string) (*tls.Conn, error) {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}},
		Config: &tls.Config{ServerName: fixture.SiteHost, RootCAs: l.roots}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", l.addr)
	if err != nil {
		return nil, err
	}
	return c.(*tls.Conn), nil
}

// ping asks Mattermost's ping on c (HTTP/1.1, keep-alive).
func ping(c net.Conn, r *bufio.Reader) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "GET /api/v4/system/ping HTTP/1.1\r\nHost: "+fixture.SiteHost+"\r\n\r\n"); err != nil {
		return err
	}
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		return err
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return err
	}
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"status":"OK"`) {
		return fmt.Errorf("ping: %d %s", resp.StatusCode, body)
	}
	return nil
}

func (l *load) fresh(src string) error {
	c, err := l.dial(src)
	if err != nil {
		return err
	}
	defer c.Close()
	return ping(c, bufio.NewReader(c))
}

func (l *load) longLived(src string) {
	defer l.wg.Done()
	var c *tls.Conn
	var r *bufio.Reader
	var cut time.Time
	defer func() {
		if c != nil {
			c.Close()
		}
	}()
	for {
		select {
		case <-l.stop:
			return
		case <-time.After(200 * time.Millisecond):
		}
		if c == nil {
			var err error
			if c, err = l.dial(src); err != nil {
				l.fail(fmt.Errorf("long-lived reconnect: %w", err))
				c = nil
				continue
			}
			r = bufio.NewReader(c)
		}
		if err := ping(c, r); err != nil {
			// Cut by the node's restart: reconnect after 3s.
			c.Close()
			c = nil
			if cut.IsZero() {
				cut = time.Now()
				l.cutNow.Add(1)
			}
			select {
			case <-l.stop:
				return
			case <-time.After(3 * time.Second):
			}
			continue
		}
		if !cut.IsZero() {
			l.mu.Lock()
			l.cuts = append(l.cuts, time.Since(cut))
			l.mu.Unlock()
			l.cutNow.Add(-1)
			cut = time.Time{}
		}
	}
}

// end stops the load, once the long-lived connections cut by the last
// restart have had their time to come back, and reports it.
func (l *load) end(t *testing.T, name string) (ok, failed int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for l.cutNow.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := l.cutNow.Load(); n > 0 {
		t.Errorf("%s: %d long-lived connections cut and not back 10s after the rotation", name, n)
	}
	close(l.stop)
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	t.Logf("%s: %d requests, %d failed; long-lived connections cut and back after %v; first errors: %q",
		name, l.ok.Load()+l.failed.Load(), l.failed.Load(), l.cuts, l.errs)
	for _, d := range l.cuts {
		if d > 5*time.Second {
			t.Errorf("%s: a long-lived connection cut by a restart was back only after %s (want within 5s)", name, d)
		}
	}
	return l.ok.Load(), l.failed.Load()
}

// A rotation of both nodes refuses no new connection when the nodes drain
// themselves: through mmtls balance and through a real HAProxy with the
// configuration --print haproxy writes; the same run without agent checks
// is measured too, as the baseline that shows what drain prevents.
func TestDrainRotationRefusesNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: skipping the real Mattermost servers")
	}
	dc := newDrainCluster(t)
	dc.start()
	dc.rotate(t) // plain HTTP to TLS
	r := dc.r
	var upstreams []string
	for _, m := range r.nodes {
		upstreams = append(upstreams, "--upstream", m.addr)
	}
	checks := []string{"--health-check", "ping", "--health-server-name", fixture.SiteHost, "--ca-file", r.roots, "--health-interval", "1s", "--log-connections=false"}
	agent := []string{"--agent-check-port", strconv.Itoa(dc.agentPort), "--agent-check-interval", "1s"}

	t.Run("mmtls balance", func(t *testing.T) {
		bal := startBalancer(t, append(append(upstreams, checks...), agent...)...)
		waitFor(t, 30*time.Second, func() error {
			st := runMMTLS(t, "balance", "status", "--control-socket", bal.socket)
			if strings.Count(st.stdout, "up ready") != 2 {
				return fmt.Errorf("agents not seen yet:\n%s", st)
			}
			return nil
		})
		l := startLoad(t, bal.addr, r.roots)
		dc.rotate(t)
		if ok, failed := l.end(t, "through mmtls balance, agent checks on"); failed != 0 || ok < 100 {
			t.Errorf("%d requests failed during the rotation (%d ok)", failed, ok)
		}
		for _, m := range r.nodes {
			if !strings.Contains(m.agent.log(), "draining: every balancer has seen it") {
				t.Errorf("%s did not wait for the balancer to see its drain:\n%s", m.name, m.agent.log())
			}
		}
		if !strings.Contains(bal.stderr.String(), `to="up drain"`) {
			t.Errorf("the balancer never saw a drain:\n%s", bal.stderr)
		}
	})

	t.Run("HAProxy", func(t *testing.T) {
		addr, sock := startHAProxy(t, append(append(upstreams, checks...), agent...))
		waitFor(t, 30*time.Second, func() error {
			if st := haproxyStates(t, sock); st["node1"] != "UP" || st["node2"] != "UP" {
				return fmt.Errorf("HAProxy's servers: %v", st)
			}
			return nil
		})
		l := startLoad(t, addr, r.roots)
		var sawDrain sync.Map
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				for srv, st := range haproxyStates(t, sock) {
					if strings.HasPrefix(st, "DRAIN") {
						sawDrain.Store(srv, true)
					}
				}
				select {
				case <-stop:
					return
				case <-time.After(100 * time.Millisecond):
				}
			}
		}()
		dc.rotate(t)
		close(stop)
		<-done
		if ok, failed := l.end(t, "through HAProxy, agent checks on"); failed != 0 || ok < 100 {
			t.Errorf("%d requests failed during the rotation (%d ok)", failed, ok)
		}
		for _, srv := range []string{"node1", "node2"} {
			if _, ok := sawDrain.Load(srv); !ok {
				t.Errorf("HAProxy's runtime API never showed %s in DRAIN", srv)
			}
		}
	})

	t.Run("baseline without agent checks", func(t *testing.T) {
		bal := startBalancer(t, append(upstreams, checks...)...)
		l := startLoad(t, bal.addr, r.roots)
		dc.rotate(t)
		_, failed := l.end(t, "through mmtls balance, agent checks off")
		t.Logf("without agent checks, %d requests failed during the same rotation", failed)
	})
}

// startHAProxy runs a real HAProxy with the configuration `mmtls balance
// --print haproxy` writes for args, plus an admin socket; it returns the
// frontend's address and the socket.
func startHAProxy(t *testing.T, args []string) (string, string) {
	t.Helper()
	haproxy := needTool(t, "haproxy", "/usr/sbin/haproxy")
	addr, _ := fixture.PickPort()
	res := runMMTLS(t, append([]string{"balance", "--listen", addr, "--print", "haproxy"}, args...)...)
	if res.code != 0 {
		t.Fatalf("--print haproxy:\n%s", res)
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "admin.sock")
	cfg := strings.Replace(res.stdout, "global\n", fmt.Sprintf("global\n    stats socket %s mode 600 level admin\n", sock), 1)
	cfg = strings.Replace(cfg, "log /dev/log local0", "log stdout format raw local0", 1)
	path := filepath.Join(dir, "haproxy.cfg")
	os.WriteFile(path, []byte(cfg), 0o644)
	startDaemon(t, "haproxy with the configuration\n"+cfg+"\n", exec.Command(haproxy, "-db", "-f", path), 10*time.Second)
	waitFor(t, 10*time.Second, func() error {
		c, err := net.DialTimeout("unix", sock, time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
	return addr, sock
}

// haproxyStates reads each server's status from HAProxy's runtime API
// (show stat): UP, DOWN, DRAIN, MAINT...
func haproxyStates(t *testing.T, sock string) map[string]string {
	c, err := net.DialTimeout("unix", sock, time.Second)
	if err != nil {
		return nil
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "show stat\n")
	b, _ := io.ReadAll(c)
	states := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Split(line, ",")
		// pxname, svname, ..., status is the 18th field.
		if len(f) > 17 && f[0] == "mattermost" && strings.HasPrefix(f[1], "node") {
			states[f[1]] = f[17]
		}
	}
	return states
}
