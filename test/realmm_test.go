package test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mmtls/mmtls/test/fixture"
)

// newRealNode runs a real Mattermost server (built once and cached, see
// fixture.MattermostServer) on a private PostgreSQL, as the mattermost
// user, plain HTTP on a loopback port.
func newRealNode(t *testing.T, rel fixture.Release) *node {
	t.Helper()
	tree, listen := newRealTreeOn(t, nil, rel)
	return startRealNode(t, tree, listen)
}

// startRealNode starts the real server of a tree newRealTreeOn laid out.
func startRealNode(t *testing.T, tree *fixture.Tree, listen string) *node {
	t.Helper()
	ctx := context.Background()
	n := &node{t: t, tree: tree, listen: listen}
	if err := tree.RunCtl(ctx, standinBin, "start"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tree.RunCtl(context.Background(), standinBin, "stop"); err != nil {
			t.Errorf("stop mattermost: %v", err)
		}
		if t.Failed() {
			log := tree.ServiceLog()
			if len(log) > 8000 {
				log = log[len(log)-8000:]
			}
			t.Logf("mattermost log (tail):\n%s", log)
		}
	})
	waitForReal(t, n, listen)
	return n
}

// newRealTree lays out a real Mattermost server's install, configured for
// a private PostgreSQL (started here) and plain HTTP on a loopback port, and
// starts nothing else.
func newRealTree(t *testing.T) (*fixture.Tree, string) {
	t.Helper()
	return newRealTreeOn(t, nil, fixture.Mattermost672)
}

// newRealTreeOn is newRealTree on the given PostgreSQL (nil: its own), as
// the nodes of one cluster share theirs.
func newRealTreeOn(t *testing.T, pg *fixture.Postgres, rel fixture.Release) (*fixture.Tree, string) {
	t.Helper()
	ctx := context.Background()
	srv, err := fixture.MattermostRelease(ctx, rel, t.Logf)
	if err != nil {
		t.Fatalf("real Mattermost server: %v", err)
	}
	root, err := os.MkdirTemp("", "mmtls-real-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	os.Chmod(root, 0o755)
	if pg == nil {
		pg, err = fixture.StartPostgres(ctx, filepath.Join(root, "pg"), mmUser)
		if errors.Is(err, fixture.ErrNoPostgres) && os.Getenv("CI") != "true" {
			t.Skipf("real-server tests: %v", err)
		}
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := pg.Stop(); err != nil {
				t.Errorf("stop postgres: %v", err)
			}
		})
	}
	listen, err := fixture.PickPort()
	if err != nil {
		t.Fatal(err)
	}
	tree, err := fixture.NewTree(root, mmUser, mmUID, mmGID, listen, "https://"+fixture.SiteHost)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"i18n", "templates", "fonts", "bin/mattermost"} {
		if err := os.Symlink(filepath.Join(srv, d), filepath.Join(tree.MattermostDir, d)); err != nil {
			t.Fatal(err)
		}
	}
	// A config that keeps the server off the network: no telemetry,
	// marketplace, notices or security-bulletin checks.
	cfg := map[string]any{
		"ServiceSettings": map[string]any{"SiteURL": "https://" + fixture.SiteHost, "ListenAddress": listen,
			"EnableSecurityFixAlert": false, "EnableLinkPreviews": false, "EnableGifPicker": false},
		"SqlSettings":          map[string]any{"DriverName": "postgres", "DataSource": pg.DSN},
		"LogSettings":          map[string]any{"EnableDiagnostics": false, "EnableFile": false, "ConsoleLevel": "INFO"},
		"PluginSettings":       map[string]any{"Enable": false, "EnableMarketplace": false, "AutomaticPrepackagedPlugins": false, "EnableRemoteMarketplace": false},
		"AnnouncementSettings": map[string]any{"AdminNoticesEnabled": false, "UserNoticesEnabled": false},
		"EmailSettings":        map[string]any{"SendEmailNotifications": false},
		"FileSettings":         map[string]any{"Directory": "./data/"},
	}
	b, _ := json.MarshalIndent(cfg, "", "    ")
	if err := os.WriteFile(tree.ConfigPath, b, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Chown(tree.ConfigPath, mmUID, mmGID)
	tree.Exec = filepath.Join(tree.MattermostDir, "bin", "mattermost")
	return tree, listen
}

func waitForReal(t *testing.T, n *node, addr string) {
	t.Helper()
	start := time.Now()
	n.waitPlainFor(addr, 3*time.Minute)
	t.Logf("Mattermost answered on %s after %s", addr, time.Since(start).Round(time.Millisecond))
}

// Every promise of mmtls push, on a real Mattermost server of each
// generation: 6.7.2, which hangs on a bad pair, and 7.7.0, which exits.
func TestRealMattermost(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: skipping the real Mattermost server")
	}
	for _, rel := range fixture.Releases {
		t.Run(rel.Name, func(t *testing.T) { testRealMattermost(t, rel) })
	}
}

func testRealMattermost(t *testing.T, rel fixture.Release) {
	n := newRealNode(t, rel)
	ps, roots := n.pairs(3)
	p1, p2, p3 := ps[0], ps[1], ps[2]
	addr, _ := fixture.PickPort()
	restart := n.restartCmd()
	push := func(p *fixture.Pair, extra ...string) (result, map[string]any) {
		return pushJSON(t, n.pushArgs(p, roots, append([]string{"--listen", addr, "--restart-command", restart, "--verify-timeout", "3m"}, extra...)...)...)
	}
	logTimings := func(what string, res map[string]any) {
		tm, _ := res["timings_ms"].(map[string]any)
		own := tm["plan"].(float64) + tm["install"].(float64) + tm["configure"].(float64)
		t.Logf("%s: total %.0f ms = mmtls %.0f ms (plan %.0f, install %.0f, configure %.0f) + restart command %.0f ms + until verified %.0f ms",
			what, tm["total"], own, tm["plan"], tm["install"], tm["configure"], tm["restart"], tm["verify"])
	}

	t.Run("first push from plain HTTP", func(t *testing.T) {
		r, res := push(p1)
		if r.code != 0 || res["verified"] != true {
			t.Fatalf("first push:\n%s", r)
		}
		assertServes(t, addr, p1)
		logTimings("first push (plain HTTP -> TLS)", res)
		var written map[string]map[string]any
		b, _ := os.ReadFile(filepath.Join(n.tree.Root, "config-before-restart.json"))
		json.Unmarshal(b, &written)
		if ss := written["ServiceSettings"]; ss["ConnectionSecurity"] != "TLS" || ss["ListenAddress"] != addr {
			t.Errorf("mmtls wrote ServiceSettings %v", ss)
		}
	})
	t.Run("identical push restarts nothing", func(t *testing.T) {
		before := n.restarts()
		r, res := push(p1)
		if r.code != 0 || res["status"] != "unchanged" || n.restarts() != before {
			t.Fatalf("identical push: %v, restarts %d -> %d\n%s", res["status"], before, n.restarts(), r)
		}
	})
	t.Run("renewal", func(t *testing.T) {
		r, res := push(p2)
		if r.code != 0 || res["verified"] != true {
			t.Fatalf("renewal:\n%s", r)
		}
		assertServes(t, addr, p2)
		logTimings("renewal (TLS -> TLS)", res)
	})
	t.Run("doctor: a healthy real node", func(t *testing.T) {
		r := runMMTLS(t, "doctor", "--json", "--mattermost-dir", n.tree.MattermostDir, "--ca-file", roots, "--owner", mmUser)
		var out struct{ Checks []map[string]string }
		if err := json.Unmarshal([]byte(r.stdout), &out); err != nil || r.code != 0 {
			t.Fatalf("doctor on a healthy node: %v\n%s", err, r)
		}
		for _, c := range out.Checks {
			if (c["id"] == "served" || c["id"] == "served-chain") && c["status"] != "ok" {
				t.Errorf("doctor on the real %s: %v", rel.Name, c)
			}
		}
	})
	t.Run("bad pairs refused while the old certificate serves", func(t *testing.T) {
		before := n.restarts()
		for name, args := range map[string][]string{
			"mismatched": {"--cert", p3.CertFile, "--key", p1.KeyFile},
			"swapped":    {"--cert", p3.KeyFile, "--key", p3.CertFile},
		} {
			r := runMMTLS(t, append(n.pushArgs(p3, roots, "--listen", addr, "--restart-command", restart), args...)...)
			if r.code != 3 {
				t.Errorf("%s: want exit 3:\n%s", name, r)
			}
		}
		if n.restarts() != before {
			t.Errorf("refused pushes restarted Mattermost")
		}
		assertServes(t, addr, p2)
	})
	unreadable := "unreadable key: " + rel.Name + " hangs, verify catches it, rolled back"
	if rel.ExitsOnBadPair {
		unreadable = "unreadable key: " + rel.Name + " exits at once, verify catches it, rolled back"
	}
	t.Run(unreadable, func(t *testing.T) {
		start := time.Now()
		r, _ := push(p3, "--owner", "root", "--verify-timeout", "20s")
		if r.code != 4 {
			t.Fatalf("want exit 4:\n%s", r)
		}
		t.Logf("rollback after the failed start took %s", time.Since(start).Round(time.Millisecond))
		if rel.ExitsOnBadPair && !strings.Contains(n.tree.ServiceLog(), "Error starting server") {
			t.Errorf("%s did not log its fatal start error; did it exit?", rel.Name)
		}
		assertServes(t, addr, p2)
	})
	t.Run("new port held: rolled back to the old certificate, config and port", func(t *testing.T) {
		held := holdPort(t)
		r := runMMTLS(t, n.pushArgs(p3, roots, "--listen", held, "--restart-command", restart, "--verify-timeout", "20s")...)
		if r.code != 4 || !strings.Contains(r.stderr, "verified: Mattermost serves TLS on "+addr) {
			t.Fatalf("want exit 4 with the old state verified:\n%s", r)
		}
		assertServes(t, addr, p2)
	})
	t.Run("killed between install and restart, completed by the next run", func(t *testing.T) {
		marker := filepath.Join(n.tree.Root, "restart-started")
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, mmtlsBin, n.pushArgs(p3, roots, "--listen", addr, "--restart-command", "echo $$ > "+marker+"; exec sleep 120")...)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var pid int
		waitFor(t, 30*time.Second, func() error {
			b, err := os.ReadFile(marker)
			if err == nil {
				pid, err = strconv.Atoi(strings.TrimSpace(string(b)))
			}
			return err
		})
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		syscall.Kill(pid, syscall.SIGKILL)
		r, res := push(p3)
		if r.code != 0 || !strings.Contains(res["recovered"].(string), "was completed") {
			t.Fatalf("next run:\n%s", r)
		}
		assertServes(t, addr, p3)
	})
}
