package test

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mmtls/mmtls/test/fixture"
	"github.com/mmtls/mmtls/test/pki"
)

// Watch timings for tests: short, but long enough that certbot's pauses
// below are seen by the loop as separate bursts.
const (
	testQuiet   = 300 * time.Millisecond
	testMaxWait = 2 * time.Second
)

// watcher is a running `mmtls watch` process.
type watcher struct {
	cmd    *exec.Cmd
	stderr fixture.Buffer
	done   chan struct{}
}

func (w *watcher) log() string { return w.stderr.String() }

// settle returns once the loop has handled every event before it: it
// touches the source certificate and waits until the loop has looked at the
// source and found it unchanged. Whatever the earlier events scheduled has
// happened by then, so counting restarts afterwards needs no sleep.
func (w *watcher) settle(t *testing.T, cert string) {
	t.Helper()
	const seen = "source unchanged since the last push"
	before := strings.Count(w.log(), seen)
	now := time.Now()
	if err := os.Chtimes(cert, now, now); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*testMaxWait, func() error {
		if strings.Count(w.log(), seen) == before {
			return fmt.Errorf("the loop has not looked at the source since the touch")
		}
		return nil
	})
}

// startWatch runs `mmtls watch` for the node with a config file holding
// the test's watch timings; the source pair and extra flags are given.
func (n *node) startWatch(t *testing.T, cert, key, roots, listen string, extra ...string) *watcher {
	t.Helper()
	return n.startWatchCluster(t, `mode = "off"`, n.restartCmd(), cert, key, roots, listen, extra...)
}

// startWatchCluster is startWatch with the [cluster] settings and the
// restart command given.
func (n *node) startWatchCluster(t *testing.T, cluster, restart, cert, key, roots, listen string, extra ...string) *watcher {
	t.Helper()
	cfg := filepath.Join(n.tree.Root, "mmtls.toml")
	toml := fmt.Sprintf("[watch]\nquiet = %q\nmax_wait = %q\nbackoff_min = \"500ms\"\nmax_restarts_per_hour = 50\n\n[cluster]\n%s\n",
		testQuiet.String(), testMaxWait.String(), cluster)
	if err := os.WriteFile(cfg, []byte(toml), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"watch", "--config", cfg, "--cert", cert, "--key", key, "--log-level", "debug",
		"--mattermost-dir", n.tree.MattermostDir, "--state-dir", n.tree.StateDir, "--ca-file", roots, "--owner", mmUser,
		"--listen", listen, "--restart-command", restart, "--verify-timeout", "20s"}
	w := &watcher{done: make(chan struct{})}
	w.cmd = exec.Command(mmtlsBin, append(args, extra...)...)
	w.cmd.Stderr = &w.stderr
	if err := w.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { w.cmd.Wait(); close(w.done) }()
	t.Cleanup(func() {
		w.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-w.done:
		case <-time.After(30 * time.Second):
			w.cmd.Process.Kill()
			t.Error("mmtls watch did not stop on SIGTERM")
		}
		if t.Failed() {
			t.Logf("mmtls watch log:\n%s", w.log())
		}
	})
	return w
}

func (n *node) waitServes(t *testing.T, addr string, c *pki.Chain) {
	t.Helper()
	want := fingerprintOf(c)
	waitFor(t, 30*time.Second, func() error {
		got, err := served(addr)
		if err != nil {
			return err
		}
		if got != want {
			return fmt.Errorf("serves %s, want %s", got, want)
		}
		return nil
	})
}

func newChain(t *testing.T, root *pki.CA) *pki.Chain {
	t.Helper()
	now := time.Now()
	inter, err := root.Intermediate("watch intermediate", now)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := inter.Issue(pki.Leaf{DNSNames: []string{fixture.SiteHost}}, now)
	if err != nil {
		t.Fatal(err)
	}
	return &pki.Chain{Root: root, Intermediate: inter, Leaf: leaf}
}

func newRoot(t *testing.T, n *node) (*pki.CA, string) {
	t.Helper()
	root, err := pki.NewRoot("watch root", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(n.tree.Root, "root.pem")
	if err := os.WriteFile(path, root.PEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	return root, path
}

// certbot's renewal reproduced exactly, with pauses between the link swaps
// longer than the quiet period: exactly one push and one restart, the new
// certificate served, the mismatched intermediate pair never pushed.
func TestWatchCertbotRenewal(t *testing.T) {
	n := newNode(t)
	root, rootFile := newRoot(t, n)
	v1 := newChain(t, root)
	cb, err := fixture.NewCertbot(filepath.Join(n.tree.Root, "etc", "letsencrypt"), fixture.SiteHost, v1)
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := fixture.PickPort()
	w := n.startWatch(t, cb.CertFile(), cb.KeyFile(), rootFile, addr)

	// Provisioned at start.
	n.waitServes(t, addr, v1)
	if n.restarts() != 1 {
		t.Fatalf("restarts after provisioning = %d, want 1", n.restarts())
	}

	v2 := newChain(t, root)
	if err := cb.Renew(v2, func(string) { time.Sleep(2 * testQuiet) }); err != nil {
		t.Fatal(err)
	}
	n.waitServes(t, addr, v2)
	w.settle(t, cb.CertFile())
	if got := n.restarts(); got != 2 {
		t.Errorf("restarts after the renewal = %d, want exactly 2 (provisioning and renewal)", got)
	}
	log := w.log()
	if got := strings.Count(log, `msg="pushed the source pair"`); got != 2 {
		t.Errorf("%d pushes logged, want 2", got)
	}
	if !strings.Contains(log, "source pair not consistent yet") {
		t.Error("the mismatched mid-renewal pair was never seen (pauses too short?)")
	}
	if strings.Contains(log, "was refused") || strings.Contains(log, "push failed") {
		t.Error("a push was attempted with the mismatched pair")
	}
}

// 100 rewrites of the source within a second: at most one restart, the
// last pair served.
func TestWatchBurstOfRewrites(t *testing.T) {
	n := newNode(t)
	root, rootFile := newRoot(t, n)
	src := filepath.Join(n.tree.Root, "src")
	os.MkdirAll(src, 0o700)
	cert, key := filepath.Join(src, "tls.crt"), filepath.Join(src, "tls.key")
	chains := []*pki.Chain{newChain(t, root), newChain(t, root), newChain(t, root)}
	write := func(c *pki.Chain) {
		// As an editor or a deploy tool does: write aside, rename over.
		for path, data := range map[string][]byte{cert: c.FullChain(), key: c.Leaf.KeyPEM} {
			tmp := path + ".tmp"
			if err := os.WriteFile(tmp, data, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, path); err != nil {
				t.Fatal(err)
			}
		}
	}
	write(chains[0])
	addr, _ := fixture.PickPort()
	w := n.startWatch(t, cert, key, rootFile, addr)
	n.waitServes(t, addr, chains[0])
	before := n.restarts()

	start := time.Now()
	for i := range 100 {
		write(chains[1+i%2])
		time.Sleep(8 * time.Millisecond)
	}
	last := chains[1+99%2]
	if d := time.Since(start); d > 1500*time.Millisecond {
		t.Logf("100 rewrites took %s", d)
	}
	n.waitServes(t, addr, last)
	w.settle(t, cert)
	if got := n.restarts() - before; got > 1 {
		t.Errorf("%d restarts for one burst, want at most 1", got)
	}
	n.waitServes(t, addr, last)
}

// The source directory deleted and re-created with a new pair is picked up.
func TestWatchSourceDirRecreated(t *testing.T) {
	n := newNode(t)
	root, rootFile := newRoot(t, n)
	src := filepath.Join(n.tree.Root, "secrets", "tls")
	os.MkdirAll(src, 0o700)
	cert, key := filepath.Join(src, "fullchain.pem"), filepath.Join(src, "privkey.pem")
	c1, c2 := newChain(t, root), newChain(t, root)
	os.WriteFile(cert, c1.FullChain(), 0o600)
	os.WriteFile(key, c1.Leaf.KeyPEM, 0o600)
	addr, _ := fixture.PickPort()
	w := n.startWatch(t, cert, key, rootFile, addr)
	n.waitServes(t, addr, c1)

	if err := os.RemoveAll(src); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*testMaxWait, func() error { // the loop sees the directory gone
		if !strings.Contains(w.log(), "source pair not consistent yet") {
			return fmt.Errorf("the loop has not found the source missing")
		}
		return nil
	})
	os.MkdirAll(src, 0o700)
	os.WriteFile(key, c2.Leaf.KeyPEM, 0o600)
	os.WriteFile(cert, c2.FullChain(), 0o600)
	n.waitServes(t, addr, c2)
}

// Metrics are served; SIGHUP re-reads the config file; SIGTERM stops the
// loop cleanly.
func TestWatchMetricsAndSignals(t *testing.T) {
	n := newNode(t)
	root, rootFile := newRoot(t, n)
	c := newChain(t, root)
	src := filepath.Join(n.tree.Root, "src")
	os.MkdirAll(src, 0o700)
	os.WriteFile(filepath.Join(src, "c.pem"), c.FullChain(), 0o600)
	os.WriteFile(filepath.Join(src, "k.pem"), c.Leaf.KeyPEM, 0o600)
	addr, _ := fixture.PickPort()
	metrics, _ := fixture.PickPort()
	w := n.startWatch(t, filepath.Join(src, "c.pem"), filepath.Join(src, "k.pem"), rootFile, addr, "--metrics-listen", metrics)
	n.waitServes(t, addr, c)
	waitFor(t, 10*time.Second, func() error {
		resp, err := http.Get("http://" + metrics + "/metrics")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		for _, want := range []string{
			`mmtls_pushes_total{result="changed"} 1`,
			`mmtls_mattermost_restarts_total 1`,
			fmt.Sprintf("mmtls_cert_not_after_timestamp_seconds %s", strconv.FormatFloat(float64(c.Leaf.Cert.NotAfter.Unix()), 'g', -1, 64)),
			"mmtls_verify_duration_seconds_count 1",
		} {
			if !strings.Contains(string(body), want) {
				return fmt.Errorf("metrics lack %q", want)
			}
		}
		return nil
	})
	w.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, 10*time.Second, func() error {
		if !strings.Contains(w.log(), "configuration reloaded") {
			return fmt.Errorf("no reload logged")
		}
		return nil
	})
	w.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-w.done:
	case <-time.After(20 * time.Second):
		t.Fatal("watch did not stop on SIGTERM")
	}
	if code := w.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("exit code %d after SIGTERM", code)
	}
}

func fingerprintOf(c *pki.Chain) string {
	return fingerprint(&fixture.Pair{Chain: c})
}
