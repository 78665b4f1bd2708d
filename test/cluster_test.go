package test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/mmtls/mmtls/test/fixture"
	"github.com/mmtls/mmtls/test/pki"
)

// Two nodes of one cluster watch the same renewed certificate. Each takes
// the PostgreSQL advisory lock in the database Mattermost's config names
// before restarting: their restart windows never overlap.
func TestClusterNodesRestartOneAtATime(t *testing.T) {
	pg, pgRoot := clusterPostgres(t)

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
		n.joinCluster(pg)
		addr, _ := fixture.PickPort()
		name := fmt.Sprintf("node%d", i+1)
		// The restart window: from before the restart until a moment after it,
		// while the node holds the lock through its verification.
		restart := windowScript(name, windows, n.tree.StandinCtl(standinBin, "restart"))
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
	var ws []window
	waitFor(t, 20*time.Second, func() error {
		if ws = readWindows(windows); len(ws) < 4 {
			return fmt.Errorf("%d restart windows closed", len(ws))
		}
		return nil
	})
	if len(ws) != 4 {
		t.Fatalf("%d restart windows, want 4 (two nodes, provisioning and renewal): %v", len(ws), ws)
	}
	assertNoOverlap(t, ws)
}

// A certbot deploy hook pushing on two nodes at once: each push takes the
// cluster lock in the database Mattermost's config names, so the restarts
// take turns (with --cluster-mode off they overlap: the test can fail).
func TestConcurrentPushesRestartOneAtATime(t *testing.T) {
	pg, pgRoot := clusterPostgres(t)
	windows := filepath.Join(pgRoot, "windows")
	type member struct {
		n       *node
		addr    string
		restart string
	}
	var ms []member
	for i := range 2 {
		n := newNode(t)
		n.joinCluster(pg)
		addr, _ := fixture.PickPort()
		name := fmt.Sprintf("node%d", i+1)
		restart := windowScript(name, windows, n.tree.StandinCtl(standinBin, "restart"))
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
	ws := readWindows(windows)
	if len(ws) != 2 {
		t.Fatalf("%d restart windows, want 2: %v", len(ws), ws)
	}
	assertNoOverlap(t, ws)
}
