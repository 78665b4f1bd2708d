package test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mmtls/mmtls/test/fixture"
)

// node is one throwaway Mattermost node: a tree, a stand-in serving it, and
// the flags that point mmtls at it.
type node struct {
	t      testing.TB
	tree   *fixture.Tree
	listen string // the ListenAddress the stand-in starts with
}

func newNode(t testing.TB, extra ...string) *node {
	t.Helper()
	root, err := os.MkdirTemp("", "mmtls-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	// The stand-in runs as mattermost and must reach its directory.
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	listen, err := fixture.PickPort()
	if err != nil {
		t.Fatal(err)
	}
	tree, err := fixture.NewTree(root, mmUser, mmUID, mmGID, listen, "https://"+fixture.SiteHost)
	if err != nil {
		t.Fatal(err)
	}
	n := &node{t: t, tree: tree, listen: listen}
	if err := tree.RunCtl(context.Background(), standinBin, "start", extra...); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tree.RunCtl(context.Background(), standinBin, "stop"); err != nil {
			t.Errorf("stop stand-in: %v", err)
		}
		if t.Failed() {
			t.Logf("stand-in log:\n%s", tree.ServiceLog())
		}
	})
	n.waitPlain(listen)
	return n
}

// pushArgs are the flags that point mmtls at this node.
func (n *node) pushArgs(p *fixture.Pair, caFile string, extra ...string) []string {
	args := []string{"push", "--cert", p.CertFile, "--key", p.KeyFile,
		"--mattermost-dir", n.tree.MattermostDir, "--state-dir", n.tree.StateDir,
		"--ca-file", caFile, "--owner", mmUser,
		"--verify-timeout", "20s", "--lock-timeout", "10s"}
	return append(args, extra...)
}

// restartCmd is a --restart-command that records config.json as mmtls left
// it (the stand-in rewrites it at start, as Mattermost does), counts
// restarts, then restarts the stand-in.
func (n *node) restartCmd(extra ...string) string {
	snap := filepath.Join(n.tree.Root, "config-before-restart.json")
	count := filepath.Join(n.tree.Root, "restarts")
	return fmt.Sprintf("cp %s %s && echo restart >> %s && %s", n.tree.ConfigPath, snap, count,
		n.tree.StandinCtl(standinBin, "restart", extra...))
}

func (n *node) restarts() int {
	b, _ := os.ReadFile(filepath.Join(n.tree.Root, "restarts"))
	return strings.Count(string(b), "restart")
}

// waitPlain waits until the stand-in answers its ping over plain HTTP.
func (n *node) waitPlain(addr string) {
	n.t.Helper()
	n.waitPlainFor(addr, 20*time.Second)
}

func (n *node) waitPlainFor(addr string, timeout time.Duration) {
	n.t.Helper()
	waitFor(n.t, timeout, func() error {
		c := &http.Client{Timeout: 2 * time.Second}
		resp, err := c.Get("http://" + addr + "/api/v4/system/ping")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("HTTP %d", resp.StatusCode)
		}
		return nil
	})
}

// served returns the SHA-256 fingerprint of the leaf served at addr.
func served(addr string) (string, error) {
	d := &net.Dialer{Timeout: 3 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{ServerName: fixture.SiteHost, InsecureSkipVerify: true})
	if err != nil {
		return "", err
	}
	defer conn.Close()
	sum := sha256.Sum256(conn.ConnectionState().PeerCertificates[0].Raw)
	return "sha256:" + hex.EncodeToString(sum[:]), nil
}

func fingerprint(p *fixture.Pair) string {
	sum := sha256.Sum256(p.Chain.Leaf.Cert.Raw)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func assertServes(t *testing.T, addr string, p *fixture.Pair) {
	t.Helper()
	got, err := served(addr)
	if err != nil {
		t.Fatalf("TLS handshake with %s: %v", addr, err)
	}
	if want := fingerprint(p); got != want {
		t.Fatalf("%s serves %s, want %s", addr, got, want)
	}
}

// waitFor polls cond until it returns nil or the timeout passes.
func waitFor(t testing.TB, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met after %s: %v", timeout, err)
		}
		<-tick.C
	}
}

// result is what one mmtls run printed and returned.
type result struct {
	code           int
	stdout, stderr string
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

func runMMTLS(t testing.TB, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, mmtlsBin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatalf("run mmtls: %v", err)
	}
	return r
}

// pushJSON runs a push with --json and decodes its result.
func pushJSON(t *testing.T, args ...string) (result, map[string]any) {
	t.Helper()
	r := runMMTLS(t, append(args, "--json")...)
	var m map[string]any
	if r.stdout != "" {
		if err := json.Unmarshal([]byte(r.stdout), &m); err != nil {
			t.Fatalf("decode --json output: %v\n%s", err, r)
		}
	}
	return r, m
}

// fileState is a file's content, owner and mode, to compare before/after.
type fileState struct {
	data     string
	uid, gid uint32
	mode     uint32
}

func stateOf(t *testing.T, path string) fileState {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		return fileState{data: "<" + err.Error() + ">"}
	}
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	return fileState{data: string(b), uid: st.Uid, gid: st.Gid, mode: st.Mode}
}

// holdPort listens on a fresh loopback port and never answers: connections
// are accepted by the kernel and then nothing happens, as with a wedged
// server. It is closed at the end of the test.
func holdPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln.Addr().String()
}

// pairs writes count certificate pairs under the node's tree, each from its
// own CA, and one roots file trusting them all.
func (n *node) pairs(count int) ([]*fixture.Pair, string) {
	n.t.Helper()
	now := time.Now()
	var ps []*fixture.Pair
	for i := range count {
		p, err := fixture.WritePair(filepath.Join(n.tree.Root, fmt.Sprintf("src%d", i+1)), now)
		if err != nil {
			n.t.Fatal(err)
		}
		ps = append(ps, p)
	}
	roots := filepath.Join(n.tree.Root, "roots.pem")
	if err := fixture.Roots(roots, ps...); err != nil {
		n.t.Fatal(err)
	}
	return ps, roots
}

// mustPush runs a push that must succeed.
func (n *node) mustPush(p *fixture.Pair, roots string, extra ...string) {
	n.t.Helper()
	if r := runMMTLS(n.t, n.pushArgs(p, roots, extra...)...); r.code != 0 {
		n.t.Fatalf("push %s:\n%s", p.CertFile, r)
	}
}

// clusterPostgres starts a private PostgreSQL for a cluster test, in a new
// directory that it returns; both go at the test's end. Without
// PostgreSQL the test is skipped (failed under CI).
func clusterPostgres(t *testing.T) (*fixture.Postgres, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "mmtls-pg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	pg, err := fixture.StartPostgres(context.Background(), filepath.Join(dir, "pg"), mmUser)
	if errors.Is(err, fixture.ErrNoPostgres) && os.Getenv("CI") != "true" {
		t.Skipf("cluster test: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pg.Stop() })
	return pg, dir
}

// joinCluster points the stand-in's config at pg as a cluster node's is:
// its database, and ClusterSettings.Enable.
func (n *node) joinCluster(pg *fixture.Postgres) {
	n.t.Helper()
	var cfg map[string]map[string]any
	b, _ := os.ReadFile(n.tree.ConfigPath)
	if err := json.Unmarshal(b, &cfg); err != nil {
		n.t.Fatal(err)
	}
	cfg["SqlSettings"]["DriverName"], cfg["SqlSettings"]["DataSource"] = "postgres", pg.DSN
	cfg["ClusterSettings"] = map[string]any{"Enable": true, "ClusterName": "mmtls-test"}
	b, _ = json.MarshalIndent(cfg, "", "    ")
	os.WriteFile(n.tree.ConfigPath, b, 0o600)
}

// window is one restart that a test's restart command recorded, as lines
// "start NAME UNIX_NS" and "end NAME UNIX_NS" in a file.
type window struct {
	node       string
	start, end int64
}

// windowScript is a restart command that records its window in file around
// restart (and a pause, while the push still holds the lock).
func windowScript(name, file, restart string) string {
	return fmt.Sprintf(`echo "start %s $(date +%%s%%N)" >> %s && %s; rc=$?; sleep 0.3; echo "end %s $(date +%%s%%N)" >> %s; exit $rc`,
		name, file, restart, name, file)
}

// readWindows returns the closed windows recorded in file, by start.
func readWindows(file string) []window {
	b, _ := os.ReadFile(file)
	open := map[string]int64{}
	var ws []window
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 {
			continue
		}
		ts, _ := strconv.ParseInt(f[2], 10, 64)
		if f[0] == "start" {
			open[f[1]] = ts
		} else {
			ws = append(ws, window{f[1], open[f[1]], ts})
		}
	}
	sort.Slice(ws, func(i, j int) bool { return ws[i].start < ws[j].start })
	return ws
}

// assertNoOverlap fails if two restart windows overlap.
func assertNoOverlap(t *testing.T, ws []window) {
	t.Helper()
	for i := 1; i < len(ws); i++ {
		if ws[i].start < ws[i-1].end {
			t.Errorf("%s restarted while %s was restarting", ws[i].node, ws[i-1].node)
		}
	}
}

// startDaemon starts cmd in a process group of its own, its output in out,
// and stops the group with SIGTERM (SIGKILL after grace) when stop is
// called or the test ends, then logs out if the test failed.
func startDaemon(t *testing.T, what string, cmd *exec.Cmd, grace time.Duration) (out *fixture.Buffer, stop func()) {
	t.Helper()
	out = &fixture.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", what, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(grace):
				syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				<-exited
			}
		})
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("%s output:\n%s", what, out)
		}
	})
	return out, stop
}
