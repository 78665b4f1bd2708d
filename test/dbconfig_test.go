package test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mmtls/mmtls/test/fixture"
	"github.com/mmtls/mmtls/test/systemdlab"
)

// A real Mattermost 6.7.2 that keeps its config in PostgreSQL
// (MM_CONFIG=postgres://..., in the EnvironmentFile its guide uses), under
// a real systemd: push enrols the node with a drop-in for its unit and
// never writes the Configurations table; a renewal changes neither; a
// failed push rolls back, verified; a conflicting override in the
// EnvironmentFile is refused naming file and line; --dry-run shows the
// drop-in.
func TestDatabaseConfigEnrolledByDropIn(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: skipping the real Mattermost server")
	}
	pg, _ := clusterPostgres(t)
	tree, listen := newRealTreeOn(t, pg, fixture.Mattermost672)
	n := &node{t: t, tree: tree, listen: listen}
	ps, roots := n.pairs(3)
	srv, err := fixture.MattermostServer(context.Background(), t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	rows := seedDatabaseConfig(t, pg, tree, nil)

	lab := bootLab(t, systemdlab.Options{HostNetwork: true, Binds: []string{
		tree.Root + ":" + labTree, tree.MattermostDir + ":/opt/mattermost", filepath.Dir(srv)}})
	in := func(p string) string { return labTree + strings.TrimPrefix(p, tree.Root) }
	mmtls := labBin + "/mmtls"
	envFile := "/opt/mattermost/config/mattermost.environment"
	labRun(t, lab, "sh", "-c", fmt.Sprintf("printf 'MM_CONFIG=%s\\n' > %s && chown mattermost: %s && chmod 600 %s", pg.DSN, envFile, envFile, envFile))
	startMattermostUnit(t, lab, "EnvironmentFile="+envFile+"\n")
	waitForReal(t, n, listen)
	before := rows()

	tlsAddr, _ := fixture.PickPort()
	push := func(p *fixture.Pair, extra ...string) (string, error) {
		args := append([]string{"push", "--cert", in(p.CertFile), "--key", in(p.KeyFile), "--ca-file", in(roots),
			"--listen", tlsAddr, "--verify-timeout", "2m", "--lock-timeout", "2m", "--cluster-mode", "off"}, extra...)
		return lab.Run(context.Background(), mmtls, args...)
	}
	const dropIn = "/etc/systemd/system/mattermost.service.d/50-mmtls-tls.conf"

	out, err := push(ps[0], "--dry-run")
	if err != nil || !strings.Contains(out, dropIn) || !strings.Contains(out, "a database store, enrolled by a systemd drop-in") {
		t.Fatalf("--dry-run:\n%v\n%s", err, out)
	}
	if _, err := lab.Run(context.Background(), "test", "-e", dropIn); err == nil {
		t.Fatal("--dry-run wrote the drop-in")
	}

	// The first push: plain HTTP to TLS, through the drop-in.
	if out, err := push(ps[0]); err != nil {
		t.Fatalf("first push: %v\n%s", err, out)
	}
	assertServes(t, tlsAddr, ps[0])
	d := labRun(t, lab, "cat", dropIn)
	for _, want := range []string{`Environment="MM_SERVICESETTINGS_LISTENADDRESS=` + tlsAddr + `"`, `Environment="MM_SERVICESETTINGS_CONNECTIONSECURITY=TLS"`,
		`Environment="MM_SERVICESETTINGS_TLSCERTFILE=/opt/mattermost/config/fullchain.pem"`} {
		if !strings.Contains(d, want) {
			t.Errorf("drop-in lacks %s:\n%s", want, d)
		}
	}
	if r := rows(); r != before {
		t.Errorf("the push wrote the Configurations table: %d rows, %d before", r, before)
	}

	// A renewal: files and a restart, no configuration written anywhere.
	if out, err := push(ps[1]); err != nil {
		t.Fatalf("renewal: %v\n%s", err, out)
	}
	assertServes(t, tlsAddr, ps[1])
	if d2 := labRun(t, lab, "cat", dropIn); d2 != d {
		t.Errorf("a renewal changed the drop-in:\n%s", d2)
	}
	if r := rows(); r != before {
		t.Errorf("a renewal wrote the Configurations table: %d rows, %d before", r, before)
	}

	// An unreadable key (root's): 6.7.2 keeps the port and hangs; rolled
	// back through systemctl, verified.
	out, err = push(ps[2], "--owner", "root", "--verify-timeout", "20s")
	if err == nil || !strings.Contains(out, "rolled back") || !strings.Contains(out, "verified: Mattermost serves") {
		t.Fatalf("push with an unreadable key: %v\n%s", err, out)
	}
	assertServes(t, tlsAddr, ps[1])
	if d3 := labRun(t, lab, "cat", dropIn); d3 != d {
		t.Errorf("after the rollback the drop-in is:\n%s", d3)
	}

	// Another value for an owned key in the EnvironmentFile: refused,
	// naming the file and line; nothing changed.
	labRun(t, lab, "sh", "-c", "echo MM_SERVICESETTINGS_LISTENADDRESS=:8443 >> "+envFile)
	out, err = push(ps[0])
	if err == nil || !strings.Contains(out, envFile+":2") || !strings.Contains(out, "differently from mmtls's drop-in") {
		t.Errorf("a conflicting override: %v\n%s", err, out)
	}
	assertServes(t, tlsAddr, ps[1])
	if r := rows(); r != before {
		t.Errorf("the Configurations table has %d rows, %d before", r, before)
	}
}

// seedDatabaseConfig moves the tree's config.json into PostgreSQL the way
// Mattermost does it (mattermost db init, with config.json and extra as
// its custom defaults), removes config.json, and returns a counter of the
// Configurations table's rows.
func seedDatabaseConfig(t *testing.T, pg *fixture.Postgres, tree *fixture.Tree, extra map[string]any) func() int {
	t.Helper()
	if extra != nil {
		var cfg map[string]any
		b, _ := os.ReadFile(tree.ConfigPath)
		if err := json.Unmarshal(b, &cfg); err != nil {
			t.Fatal(err)
		}
		ss := cfg["ServiceSettings"].(map[string]any)
		for k, v := range extra {
			ss[k] = v
		}
		b, _ = json.Marshal(cfg)
		os.WriteFile(tree.ConfigPath, b, 0o600)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	initDB := exec.CommandContext(ctx, "setpriv", "--reuid="+strconv.Itoa(mmUID), "--regid="+strconv.Itoa(mmGID), "--clear-groups",
		filepath.Join(tree.MattermostDir, "bin", "mattermost"), "db", "init", "--config", pg.DSN)
	initDB.Dir = tree.MattermostDir
	initDB.Env = append(os.Environ(), "MM_CUSTOM_DEFAULTS_PATH="+tree.ConfigPath)
	if out, err := initDB.CombinedOutput(); err != nil {
		t.Fatalf("mattermost db init: %v\n%s", err, out)
	}
	os.Remove(tree.ConfigPath) // the database is the only config
	return func() int {
		t.Helper()
		out, err := pg.Psql(context.Background(), "mattermost", "SELECT count(*) FROM configurations")
		if err != nil {
			t.Fatal(err)
		}
		n, err := strconv.Atoi(strings.TrimSpace(out))
		if err != nil {
			t.Fatalf("count: %q", out)
		}
		return n
	}
}

// Without systemd (--restart-command), a node whose config is in the
// database is set through Mattermost's own local-mode API: the first push
// patches the TLS settings (one new Configurations row, written by
// Mattermost); a renewal patches nothing; a failed renewal rolls back,
// verified, with no row either.
func TestDatabaseConfigThroughLocalMode(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: skipping the real Mattermost server")
	}
	pg, _ := clusterPostgres(t)
	tree, listen := newRealTreeOn(t, pg, fixture.Mattermost672)
	sock := filepath.Join(tree.MattermostDir, "local.socket")
	rows := seedDatabaseConfig(t, pg, tree, map[string]any{"EnableLocalMode": true, "LocalModeSocketLocation": sock})
	tree.Env = []string{"MM_CONFIG=" + pg.DSN}
	n := startRealNode(t, tree, listen)
	ps, roots := n.pairs(3)
	before := rows()
	tlsAddr, _ := fixture.PickPort()
	args := func(p *fixture.Pair, extra ...string) []string {
		return n.pushArgs(p, roots, append([]string{"--mm-config", pg.DSN, "--listen", tlsAddr, "--restart-command", tree.StandinCtl(standinBin, "restart"), "--cluster-mode", "off"}, extra...)...)
	}

	if r := runMMTLS(t, args(ps[0], "--dry-run")...); r.code != 0 || !strings.Contains(r.stdout, "set through Mattermost's local-mode API") || !strings.Contains(r.stdout, sock) {
		t.Fatalf("--dry-run:\n%s", r)
	}
	if r := runMMTLS(t, args(ps[0])...); r.code != 0 {
		t.Fatalf("first push:\n%s", r)
	}
	assertServes(t, tlsAddr, ps[0])
	if r := rows(); r != before+1 {
		t.Errorf("the first push: %d Configurations rows, %d before (want one, Mattermost's save of the patch)", r, before)
	}
	enrolled := rows()
	if r := runMMTLS(t, args(ps[1])...); r.code != 0 {
		t.Fatalf("renewal:\n%s", r)
	}
	assertServes(t, tlsAddr, ps[1])
	r := runMMTLS(t, args(ps[2], "--owner", "root", "--verify-timeout", "20s")...)
	if r.code != 4 || !strings.Contains(r.stderr, "verified: Mattermost serves") {
		t.Fatalf("push with an unreadable key:\n%s", r)
	}
	assertServes(t, tlsAddr, ps[1])
	if r := rows(); r != enrolled {
		t.Errorf("a renewal and a rolled-back renewal wrote the Configurations table: %d rows, %d after the enrolment", r, enrolled)
	}
}
