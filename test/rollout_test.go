package test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mmtls/mmtls/test/fixture"
	"github.com/mmtls/mmtls/test/pki"
)

// rollout is a cluster for the rollout tests: one PostgreSQL, nodes with
// their stand-in and their agent following the cluster, a publisher's key
// and pairs. Each node's restart command records its window and fails
// while a file "fail" exists in its tree.
type rollout struct {
	t       *testing.T
	pg      *fixture.Postgres
	root    *pki.CA
	roots   string
	key     string // the cluster key file
	dir     string
	windows string
	nodes   []*member
}

type member struct {
	name  string
	n     *node
	addr  string
	agent *watcher
	conf  string
}

func newRollout(t *testing.T, count int) *rollout {
	t.Helper()
	pg, dir := clusterPostgres(t)
	var err error
	r := &rollout{t: t, pg: pg, dir: dir, windows: filepath.Join(dir, "windows"), key: filepath.Join(dir, "cluster.key")}
	if c := runMMTLS(t, "cluster", "keygen", "--out", r.key); c.code != 0 {
		t.Fatalf("keygen:\n%s", c)
	}
	if r.root, err = pki.NewRoot("rollout root", time.Now()); err != nil {
		t.Fatal(err)
	}
	r.roots = filepath.Join(dir, "roots.pem")
	os.WriteFile(r.roots, r.root.PEM(), 0o644)
	for i := range count {
		n := newNode(t)
		addr, _ := fixture.PickPort()
		m := &member{name: fmt.Sprintf("node%d", i+1), n: n, addr: addr}
		restart := fmt.Sprintf(`test ! -e %s/fail || { echo "node asked to fail" >&2; exit 1; }; %s`,
			n.tree.Root, windowScript(m.name, r.windows, n.tree.StandinCtl(standinBin, "restart")))
		os.WriteFile(filepath.Join(n.tree.Root, "restart.sh"), []byte(restart+"\n"), 0o700)
		m.conf = r.writeConf(m, r.key)
		r.nodes = append(r.nodes, m)
	}
	return r
}

func (r *rollout) writeConf(m *member, key string) string {
	r.t.Helper()
	n := m.n
	conf := fmt.Sprintf(`[source]
from = "cluster"

[push]
mattermost_dir = %q
state_dir = %q
ca_file = %q
owner = %q
listen = %q
restart_command = "sh %s"
verify_timeout = "20s"

[watch]
reconcile = "2s"

[cluster]
mode = "postgres"
dsn = %q
key_file = %q
node = %q
advertise = %q
`, n.tree.MattermostDir, n.tree.StateDir, r.roots, mmUser, m.addr, filepath.Join(n.tree.Root, "restart.sh"), r.pg.DSN, key, m.name, m.addr)
	path := filepath.Join(n.tree.Root, "mmtls.toml")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		r.t.Fatal(err)
	}
	return path
}

// start runs the node's agent (mmtls watch with its config).
func (r *rollout) start(m *member) {
	r.t.Helper()
	w := &watcher{done: make(chan struct{})}
	w.cmd = exec.Command(mmtlsBin, "watch", "--config", m.conf, "--log-level", "debug")
	w.cmd.Stderr = &w.stderr
	if err := w.cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	go func() { w.cmd.Wait(); close(w.done) }()
	m.agent = w
	t := r.t
	t.Cleanup(func() {
		r.stop(m)
		if t.Failed() {
			t.Logf("%s agent log:\n%s", m.name, w.log())
		}
	})
}

func (r *rollout) stop(m *member) {
	w := m.agent
	if w == nil {
		return
	}
	w.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-w.done:
	case <-time.After(30 * time.Second):
		w.cmd.Process.Kill()
		<-w.done
	}
}

func (r *rollout) chain() (*pki.Chain, string, string) {
	r.t.Helper()
	c := newChain(r.t, r.root)
	d, err := os.MkdirTemp(r.dir, "pair-")
	if err != nil {
		r.t.Fatal(err)
	}
	cert, key := filepath.Join(d, "fullchain.pem"), filepath.Join(d, "privkey.pem")
	os.WriteFile(cert, c.FullChain(), 0o600)
	os.WriteFile(key, c.Leaf.KeyPEM, 0o600)
	return c, cert, key
}

func (r *rollout) publish(cert, key string, extra ...string) result {
	r.t.Helper()
	args := append([]string{"publish", "--cert", cert, "--key", key, "--dsn", r.pg.DSN, "--cluster-key", r.key, "--ca-file", r.roots,
		"--wait", "--timeout", "2m", "--poll", "100ms"}, extra...)
	return runMMTLS(r.t, args...)
}

func (r *rollout) status() (result, map[string]any) {
	r.t.Helper()
	res := runMMTLS(r.t, "cluster", "status", "--dsn", r.pg.DSN, "--json")
	var st map[string]any
	if err := json.Unmarshal([]byte(res.stdout), &st); err != nil {
		r.t.Fatalf("status JSON: %v\n%s", err, res)
	}
	return res, st
}

func TestRolloutThroughTheClusterDatabase(t *testing.T) {
	r := newRollout(t, 3)
	for _, m := range r.nodes {
		r.start(m)
	}
	// The publisher has no Mattermost at all: only the DSN and the key.
	v1, c1, k1 := r.chain()
	start := time.Now()
	res := r.publish(c1, k1)
	if res.code != 0 || !strings.Contains(res.stdout, "complete: every live node serves bundle") {
		t.Fatalf("publish --wait:\n%s", res)
	}
	t.Logf("publish to all three verified: %s (%d restart windows)", time.Since(start).Round(time.Millisecond), len(readWindows(r.windows)))
	for _, m := range r.nodes {
		m.n.waitServes(t, m.addr, v1)
	}
	ws := readWindows(r.windows)
	if len(ws) != 3 {
		t.Fatalf("%d restarts, want 3: %v", len(ws), ws)
	}
	assertNoOverlap(t, ws)
	st, js := r.status()
	if st.code != 0 {
		t.Errorf("cluster status after a complete rollout: exit %d\n%s", st.code, st)
	}
	for _, n := range js["nodes"].([]any) {
		n := n.(map[string]any)
		if n["served_fingerprint"] != fingerprintOf(v1) || n["reported_fingerprint"] != fingerprintOf(v1) {
			t.Errorf("status row %v", n)
		}
	}
	if again := r.publish(c1, k1); again.code != 0 || !strings.Contains(again.stdout, "nothing to do") {
		t.Errorf("publishing the same pair again:\n%s", again)
	}

	t.Run("a failing node halts the rollout; retry completes it", func(t *testing.T) {
		bad := r.nodes[1]
		os.WriteFile(filepath.Join(bad.n.tree.Root, "fail"), nil, 0o600)
		v2, c2, k2 := r.chain()
		res := r.publish(c2, k2)
		if res.code != 4 || !strings.Contains(res.stderr, "halted at "+bad.name) {
			t.Fatalf("publish --wait with a failing node: want exit 4 naming %s:\n%s", bad.name, res)
		}
		bad.n.waitServes(t, bad.addr, v1)
		halted := 0
		for _, m := range r.nodes {
			if got, _ := served(m.addr); got == fingerprintOf(v1) {
				halted++
			}
		}
		if halted < 1 {
			t.Errorf("no node kept the previous certificate")
		}
		if st, js := r.status(); st.code != 1 || js["bundle"].(map[string]any)["state"] != "halted" {
			t.Errorf("status of a halted rollout: exit %d %v", st.code, js["bundle"])
		}
		os.Remove(filepath.Join(bad.n.tree.Root, "fail"))
		res = r.publish(c2, k2, "--retry")
		if res.code != 0 {
			t.Fatalf("publish --retry:\n%s", res)
		}
		for _, m := range r.nodes {
			m.n.waitServes(t, m.addr, v2)
		}
	})

	t.Run("a node that was down catches up", func(t *testing.T) {
		down := r.nodes[2]
		r.stop(down)
		before, _ := served(down.addr)
		v3, c3, k3 := r.chain()
		// The stopped agent's heartbeat goes stale (3 x 2s): the rollout
		// completes without it.
		if res := r.publish(c3, k3); res.code != 0 {
			t.Fatalf("publish with a node down:\n%s", res)
		}
		if got, _ := served(down.addr); got != before {
			t.Errorf("the stopped node changed")
		}
		r.start(down)
		down.n.waitServes(t, down.addr, v3)
	})

	t.Run("a node with the wrong cluster key installs nothing", func(t *testing.T) {
		wrong := r.nodes[0]
		r.stop(wrong)
		other := filepath.Join(r.dir, "other.key")
		if c := runMMTLS(t, "cluster", "keygen", "--out", other); c.code != 0 {
			t.Fatal(c)
		}
		before, _ := served(wrong.addr)
		wrong.conf = r.writeConf(wrong, other)
		r.start(wrong)
		_, c4, k4 := r.chain()
		runMMTLS(t, "publish", "--cert", c4, "--key", k4, "--dsn", r.pg.DSN, "--cluster-key", r.key, "--ca-file", r.roots)
		waitFor(t, time.Minute, func() error {
			if !strings.Contains(wrong.agent.log(), "this node's key file "+other+" has key id") {
				return fmt.Errorf("no refusal naming the key file yet")
			}
			return nil
		})
		if got, _ := served(wrong.addr); got != before {
			t.Errorf("the node with the wrong key changed its certificate")
		}
	})

	t.Run("PostgreSQL restarted in the middle of a rollout", func(t *testing.T) {
		r.stop(r.nodes[0]) // the one with the wrong key sits this out
		r.nodes[0].conf = r.writeConf(r.nodes[0], r.key)
		r.start(r.nodes[0])
		v5, c5, k5 := r.chain()
		if res := runMMTLS(t, "publish", "--cert", c5, "--key", k5, "--dsn", r.pg.DSN, "--cluster-key", r.key, "--ca-file", r.roots); res.code != 0 {
			t.Fatal(res)
		}
		if err := r.pg.Restart(); err != nil {
			t.Fatal(err)
		}
		for _, m := range r.nodes {
			m.n.waitServes(t, m.addr, v5)
		}
		if st, _ := r.status(); st.code != 0 {
			t.Errorf("status after the rollout completed: %s", st)
		}
	})

	t.Run("no private key in a dump of the database", func(t *testing.T) {
		dump, err := exec.Command("pg_dump", r.pg.DSN).CombinedOutput()
		if err != nil {
			t.Skipf("pg_dump: %v %s", err, dump)
		}
		k, _ := os.ReadFile(k1)
		body := strings.Join(strings.Split(strings.TrimSpace(string(k)), "\n")[1:3], "")
		if strings.Contains(string(dump), "PRIVATE KEY") || strings.Contains(string(dump), body[:40]) {
			t.Error("the dump holds a private key in the clear")
		}
		if !strings.Contains(string(dump), "mmtls.bundles") {
			t.Errorf("the dump has no mmtls schema:\n%.500s", dump)
		}
	})
}

// The schema is created and migrated by Mattermost's own database user,
// the owner of its database and no superuser, as often as it is asked.
func TestRolloutMigratesAsTheDatabaseOwner(t *testing.T) {
	r := newRollout(t, 0)
	ctx := context.Background()
	for _, sql := range []string{"CREATE ROLE mmowner LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE", "CREATE DATABASE mmowned OWNER mmowner"} {
		if out, err := r.pg.Psql(ctx, "mattermost", sql); err != nil {
			t.Fatal(out, err)
		}
	}
	dsn := strings.Replace(strings.Replace(r.pg.DSN, "mmuser@", "mmowner@", 1), "/mattermost?", "/mmowned?", 1)
	_, c, k := r.chain()
	for i := range 2 {
		if res := runMMTLS(t, "publish", "--cert", c, "--key", k, "--dsn", dsn, "--cluster-key", r.key, "--ca-file", r.roots); res.code != 0 {
			t.Fatalf("publish %d as the owner:\n%s", i+1, res)
		}
	}
	out, err := r.pg.Psql(ctx, "mmowned", "SELECT count(*) FROM mmtls.migrations; SELECT tableowner FROM pg_tables WHERE schemaname = 'mmtls' ORDER BY tablename")
	if err != nil {
		t.Fatal(err)
	}
	if f := strings.Fields(out); len(f) != 4 || f[0] != "1" || f[1] != "mmowner" {
		t.Errorf("migrations and owners: %q", out)
	}
}

// Three real Mattermost 6.7.2 servers on one PostgreSQL, each with its own
// tree, port, state directory and agent following the cluster, and a
// publisher with no Mattermost: publish --wait, every node serves the new
// leaf, one restart at a time, and status agrees with a live probe.
func TestRolloutRealMattermost(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: skipping the real Mattermost servers")
	}
	for _, rel := range fixture.Releases {
		t.Run(rel.Name, func(t *testing.T) { testRolloutRealMattermost(t, rel) })
	}
}

func testRolloutRealMattermost(t *testing.T, rel fixture.Release) {
	r := newRollout(t, 0)
	for i := range 3 {
		tree, listen := newRealTreeOn(t, r.pg, rel)
		n := startRealNode(t, tree, listen)
		addr, _ := fixture.PickPort()
		m := &member{name: fmt.Sprintf("mm%d", i+1), n: n, addr: addr}
		restart := fmt.Sprintf(`test ! -e %s/fail || exit 1; %s`, tree.Root, windowScript(m.name, r.windows, tree.StandinCtl(standinBin, "restart")))
		os.WriteFile(filepath.Join(tree.Root, "restart.sh"), []byte(restart+"\n"), 0o700)
		m.conf = r.writeConf(m, r.key)
		r.nodes = append(r.nodes, m)
		r.start(m)
	}
	v1, c1, k1 := r.chain()
	start := time.Now()
	res := r.publish(c1, k1, "--timeout", "10m")
	total := time.Since(start)
	if res.code != 0 {
		t.Fatalf("publish --wait:\n%s", res)
	}
	t.Logf("publish --wait:\n%s", res.stdout)
	var restarts time.Duration
	ws := readWindows(r.windows)
	for _, w := range ws {
		restarts += time.Duration(w.end - w.start)
	}
	assertNoOverlap(t, ws)
	if len(ws) != 3 {
		t.Fatalf("%d restarts, want 3: %v", len(ws), ws)
	}
	t.Logf("publish to 3 real nodes verified: %s; Mattermost restart commands %s; beyond them %s (%s per node: notification, lock hand-offs, Mattermost coming up, verification)",
		total.Round(time.Millisecond), restarts.Round(time.Millisecond), (total - restarts).Round(time.Millisecond), ((total - restarts) / 3).Round(time.Millisecond))
	// From each agent's log: its restart until its verification succeeded
	// (Mattermost's stop and start, and the verification's last poll).
	var restartToVerified time.Duration
	for _, m := range r.nodes {
		restartToVerified += logSpan(t, m.agent.log(), `msg="restarting mattermost"`, `msg=verified`)
	}
	t.Logf("restart to verified, summed over the nodes: %s; the rest, %s per node, is mmtls's: notification, unseal, install, configure, lock hand-off",
		restartToVerified.Round(time.Millisecond), ((total - restartToVerified) / 3).Round(time.Millisecond))
	for _, m := range r.nodes {
		assertServes(t, m.addr, &fixture.Pair{Chain: v1})
	}
	if st, _ := r.status(); st.code != 0 {
		t.Errorf("cluster status: %s", st)
	}
}

// The host that holds the certificate needs no hook: its agent, with
// [cluster] publish = true, publishes each renewal of its source pair, and
// the nodes roll it out.
func TestRolloutPublishedByTheCertHostsAgent(t *testing.T) {
	r := newRollout(t, 2)
	for _, m := range r.nodes {
		r.start(m)
	}
	src := filepath.Join(r.dir, "live")
	os.MkdirAll(src, 0o700)
	cert, key := filepath.Join(src, "fullchain.pem"), filepath.Join(src, "privkey.pem")
	renew := func() *pki.Chain {
		c := newChain(t, r.root)
		for path, data := range map[string][]byte{key: c.Leaf.KeyPEM, cert: c.FullChain()} {
			os.WriteFile(path+".new", data, 0o600)
			os.Rename(path+".new", path)
		}
		return c
	}
	v1 := renew()
	conf := filepath.Join(r.dir, "publisher.toml")
	os.WriteFile(conf, []byte(fmt.Sprintf("[source]\ncert = %q\nkey = %q\n\n[push]\nca_file = %q\n\n[watch]\nquiet = \"300ms\"\nmax_wait = \"2s\"\n\n[cluster]\npublish = true\ndsn = %q\nkey_file = %q\n",
		cert, key, r.roots, r.pg.DSN, r.key)), 0o600)
	pub := &member{name: "publisher", conf: conf}
	r.start(pub)
	for _, m := range r.nodes {
		m.n.waitServes(t, m.addr, v1)
	}
	v2 := renew()
	for _, m := range r.nodes {
		m.n.waitServes(t, m.addr, v2)
	}
	if !strings.Contains(pub.agent.log(), "published to the cluster") {
		t.Errorf("publisher log:\n%s", pub.agent.log())
	}
}

// Bad input at publish: an unreachable database and a MySQL DSN get clear
// errors, store nothing, and never print the DSN's password.
func TestPublishRefusals(t *testing.T) {
	r := newRollout(t, 0)
	_, c, k := r.chain()
	res := runMMTLS(t, "publish", "--cert", c, "--key", k, "--dsn", "postgres://mmuser:s3cretpw@127.0.0.1:1/mattermost?connect_timeout=2",
		"--cluster-key", r.key, "--ca-file", r.roots)
	if res.code == 0 || !strings.Contains(res.stderr, "connect to the cluster database") || strings.Contains(res.stderr+res.stdout, "s3cretpw") {
		t.Errorf("unreachable database:\n%s", res)
	}
	res = runMMTLS(t, "publish", "--cert", c, "--key", k, "--dsn", "mysql://mmuser:s3cretpw@tcp(db:3306)/mattermost", "--cluster-key", r.key)
	if res.code != 2 || !strings.Contains(res.stderr, "needs PostgreSQL") || strings.Contains(res.stderr, "s3cretpw") {
		t.Errorf("MySQL DSN:\n%s", res)
	}
	res = runMMTLS(t, "publish", "--cert", c, "--key", c, "--dsn", r.pg.DSN, "--cluster-key", r.key)
	if res.code != 3 {
		t.Errorf("a certificate given as the key: want exit 3:\n%s", res)
	}
	if st, js := r.status(); st.code == 0 || js["bundle"] != nil {
		t.Errorf("something was published: %v", js)
	}
}

// logSpan is the time between the first log line containing from and the
// next one containing to.
func logSpan(t *testing.T, log, from, to string) time.Duration {
	t.Helper()
	var start time.Time
	for _, line := range strings.Split(log, "\n") {
		ts, ok := strings.CutPrefix(line, "time=")
		if !ok {
			continue
		}
		at, err := time.Parse(time.RFC3339Nano, strings.Fields(ts)[0])
		if err != nil {
			continue
		}
		switch {
		case start.IsZero() && strings.Contains(line, from):
			start = at
		case !start.IsZero() && strings.Contains(line, to):
			return at.Sub(start)
		}
	}
	t.Errorf("no %q followed by %q in the log", from, to)
	return 0
}
