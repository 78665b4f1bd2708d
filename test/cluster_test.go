package test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mmtls/mmtls/test/fixture"
	"github.com/mmtls/mmtls/test/pki"
)

// Two nodes of one cluster watch the same renewed certificate. Each takes
// the PostgreSQL advisory lock in the database Mattermost's config names
// before restarting: their restart windows never overlap.
func TestClusterNodesRestartOneAtATime(t *testing.T) {
	ctx := context.Background()
	pgRoot, err := os.MkdirTemp("", "mmtls-pg-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(pgRoot)
	os.Chmod(pgRoot, 0o755)
	pg, err := fixture.StartPostgres(ctx, filepath.Join(pgRoot, "pg"), mmUser)
	if errors.Is(err, fixture.ErrNoPostgres) && os.Getenv("CI") != "true" {
		t.Skipf("cluster test: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Stop()

	windows := filepath.Join(pgRoot, "windows")
	src := filepath.Join(pgRoot, "src")
	os.MkdirAll(src, 0o700)
	cert, key := filepath.Join(src, "fullchain.pem"), filepath.Join(src, "privkey.pem")
	root, err := pki.NewRoot("cluster root", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	rootFile := filepath.Join(pgRoot, "root.pem")
	os.WriteFile(rootFile, root.PEM(), 0o644)
	write := func(c *pki.Chain) {
		for path, data := range map[string][]byte{key: c.Leaf.KeyPEM, cert: c.FullChain()} {
			os.WriteFile(path+".tmp", data, 0o600)
			os.Rename(path+".tmp", path)
		}
	}

	type member struct {
		n    *node
		addr string
	}
	var nodes []member
	for i := range 2 {
		n := newNode(t)
		// Mattermost's config names the shared database, as on a real cluster.
		var cfg map[string]map[string]any
		b, _ := os.ReadFile(n.tree.ConfigPath)
		if err := json.Unmarshal(b, &cfg); err != nil {
			t.Fatal(err)
		}
		cfg["SqlSettings"]["DriverName"], cfg["SqlSettings"]["DataSource"] = "postgres", pg.DSN
		cfg["ClusterSettings"] = map[string]any{"Enable": true, "ClusterName": "mmtls-test"} // a cluster node
		b, _ = json.MarshalIndent(cfg, "", "    ")
		os.WriteFile(n.tree.ConfigPath, b, 0o600)
		addr, _ := fixture.PickPort()
		name := fmt.Sprintf("node%d", i+1)
		// The restart window: from before the restart until a moment after it,
		// while the node holds the lock through its verification.
		restart := fmt.Sprintf(`echo "start %s $(date +%%s%%N)" >> %s && %s && sleep 0.3 && echo "end %s $(date +%%s%%N)" >> %s`,
			name, windows, n.tree.StandinCtl(standinBin, "restart"), name, windows)
		nodes = append(nodes, member{n: n, addr: addr})
		// Each node's agent starts below, once the source exists.
		os.WriteFile(filepath.Join(n.tree.Root, "restart.sh"), []byte(restart+"\n"), 0o700)
	}
	c1 := newChain(t, root)
	write(c1)
	for _, m := range nodes {
		m.n.startWatchCluster(t, `mode = "auto"`, "sh "+filepath.Join(m.n.tree.Root, "restart.sh"), cert, key, rootFile, m.addr)
	}
	for _, m := range nodes {
		m.n.waitServes(t, m.addr, c1)
	}
	// The renewal lands on both nodes at once.
	c2 := newChain(t, root)
	write(c2)
	for _, m := range nodes {
		m.n.waitServes(t, m.addr, c2)
	}

	// The last restart command may still be finishing its window.
	var b []byte
	waitFor(t, 20*time.Second, func() error {
		b, _ = os.ReadFile(windows)
		if n := strings.Count(string(b), "end "); n < 4 {
			return fmt.Errorf("%d restart windows closed", n)
		}
		return nil
	})
	type window struct {
		node       string
		start, end int64
	}
	open := map[string]int64{}
	var ws []window
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 {
			t.Fatalf("bad window line %q", line)
		}
		ts, _ := strconv.ParseInt(f[2], 10, 64)
		if f[0] == "start" {
			open[f[1]] = ts
		} else {
			ws = append(ws, window{f[1], open[f[1]], ts})
		}
	}
	if len(ws) != 4 {
		t.Fatalf("%d restart windows, want 4 (two nodes, provisioning and renewal):\n%s", len(ws), b)
	}
	sort.Slice(ws, func(i, j int) bool { return ws[i].start < ws[j].start })
	for i := 1; i < len(ws); i++ {
		if ws[i].start < ws[i-1].end {
			t.Errorf("%s restarted at %d while %s was restarting until %d", ws[i].node, ws[i].start, ws[i-1].node, ws[i-1].end)
		}
	}
}

// A certbot deploy hook pushing on two nodes at once: each push takes the
// cluster lock in the database Mattermost's config names, so the restarts
// take turns (with --cluster-mode off they overlap: the test can fail).
func TestConcurrentPushesRestartOneAtATime(t *testing.T) {
	ctx := context.Background()
	pgRoot, err := os.MkdirTemp("", "mmtls-pg-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(pgRoot)
	os.Chmod(pgRoot, 0o755)
	pg, err := fixture.StartPostgres(ctx, filepath.Join(pgRoot, "pg"), mmUser)
	if errors.Is(err, fixture.ErrNoPostgres) && os.Getenv("CI") != "true" {
		t.Skipf("cluster test: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Stop()
	windows := filepath.Join(pgRoot, "windows")
	type member struct {
		n       *node
		addr    string
		restart string
	}
	var ms []member
	for i := range 2 {
		n := newNode(t)
		var cfg map[string]map[string]any
		b, _ := os.ReadFile(n.tree.ConfigPath)
		json.Unmarshal(b, &cfg)
		cfg["SqlSettings"]["DriverName"], cfg["SqlSettings"]["DataSource"] = "postgres", pg.DSN
		cfg["ClusterSettings"] = map[string]any{"Enable": true, "ClusterName": "mmtls-test"} // a cluster node
		b, _ = json.MarshalIndent(cfg, "", "    ")
		os.WriteFile(n.tree.ConfigPath, b, 0o600)
		addr, _ := fixture.PickPort()
		name := fmt.Sprintf("node%d", i+1)
		restart := fmt.Sprintf(`echo "start %s $(date +%%s%%N)" >> %s && %s && sleep 0.5 && echo "end %s $(date +%%s%%N)" >> %s`,
			name, windows, n.tree.StandinCtl(standinBin, "restart"), name, windows)
		ms = append(ms, member{n, addr, restart})
	}
	ps, roots := ms[0].n.pairs(1)
	results := make(chan result, len(ms))
	for _, m := range ms {
		go func() {
			results <- runMMTLS(t, m.n.pushArgs(ps[0], roots, "--listen", m.addr, "--restart-command", m.restart)...)
		}()
	}
	for range ms {
		if r := <-results; r.code != 0 {
			t.Fatalf("push:\n%s", r)
		}
	}
	b, _ := os.ReadFile(windows)
	var ws [][2]int64
	open := map[string]int64{}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(line)
		ts, _ := strconv.ParseInt(f[2], 10, 64)
		if f[0] == "start" {
			open[f[1]] = ts
		} else {
			ws = append(ws, [2]int64{open[f[1]], ts})
		}
	}
	sort.Slice(ws, func(i, j int) bool { return ws[i][0] < ws[j][0] })
	if len(ws) != 2 || ws[1][0] < ws[0][1] {
		t.Errorf("restart windows overlap: %v\n%s", ws, b)
	}
}
