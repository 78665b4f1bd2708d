package test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mmtls/mmtls/agent/push"
	"github.com/mmtls/mmtls/test/fixture"
)

// Every backup is the whole before-state (pair and config.json), whatever
// the push changed; `mmtls restore` lists them and puts one back through a
// push (restart, verify), refusing the one from before TLS.
func TestBackupsAndRestore(t *testing.T) {
	n := newNode(t)
	ps, roots := n.pairs(2)
	addr, _ := fixture.PickPort()
	addr2, _ := fixture.PickPort()
	restart := n.restartCmd()
	n.mustPush(ps[0], roots, "--listen", addr, "--restart-command", restart)  // backup 1: plain HTTP, no pair
	n.mustPush(ps[1], roots, "--listen", addr, "--restart-command", restart)  // backup 2: pair 1, config unchanged by the push
	n.mustPush(ps[1], roots, "--listen", addr2, "--restart-command", restart) // backup 3: pair 2 unchanged, config changed
	assertServes(t, addr2, ps[1])

	r := runMMTLS(t, "restore", "--list", "--json", "--state-dir", n.tree.StateDir)
	var backups []push.Backup
	if err := json.Unmarshal([]byte(r.stdout), &backups); r.code != 0 || err != nil || len(backups) != 3 {
		t.Fatalf("restore --list --json: %v\n%s", err, r)
	}
	for i, b := range backups {
		names := map[string]bool{}
		entries, _ := os.ReadDir(b.Dir)
		for _, e := range entries {
			names[e.Name()] = true
		}
		wantPair := i > 0
		if !names["config.json"] || names["fullchain.pem"] != wantPair || names["privkey.pem"] != wantPair {
			t.Errorf("backup %d holds %v", i+1, names)
		}
	}
	if backups[0].Certificate != nil || !strings.Contains(backups[0].Problem, "plain HTTP") {
		t.Errorf("the first backup: %+v", backups[0])
	}
	if c := backups[1].Certificate; c == nil || c.Fingerprint != fingerprint(ps[0]) || backups[1].ListenAddress != addr {
		t.Errorf("the second backup: %+v", backups[1])
	}
	if r := runMMTLS(t, "restore", "--list", "--state-dir", n.tree.StateDir); r.code != 0 || !strings.Contains(r.stdout, backups[2].Name) {
		t.Errorf("restore --list:\n%s", r)
	}

	args := []string{"--mattermost-dir", n.tree.MattermostDir, "--state-dir", n.tree.StateDir, "--ca-file", roots,
		"--owner", mmUser, "--verify-timeout", "20s", "--restart-command", restart}
	// The one from before TLS: refused, nothing changed.
	before := stateOf(t, n.tree.ConfigPath)
	if r := runMMTLS(t, append([]string{"restore", backups[0].Name}, args...)...); r.code != 3 || !strings.Contains(r.stderr, "plain HTTP") {
		t.Errorf("restoring the plain-HTTP backup:\n%s", r)
	}
	if stateOf(t, n.tree.ConfigPath) != before {
		t.Error("a refused restore changed config.json")
	}
	if r := runMMTLS(t, append([]string{"restore", "no-such-backup"}, args...)...); r.code != 2 {
		t.Errorf("restoring an unknown backup:\n%s", r)
	}

	// The second: pair 1 on its listen address, restarted and verified.
	if r := runMMTLS(t, append([]string{"restore", backups[1].Name}, args...)...); r.code != 0 || !strings.Contains(r.stdout, "verified") {
		t.Fatalf("restore:\n%s", r)
	}
	assertServes(t, addr, ps[0])
	// Restore made a backup in turn: the newest is the state it replaced.
	r = runMMTLS(t, "restore", "--list", "--json", "--state-dir", n.tree.StateDir)
	backups = nil
	json.Unmarshal([]byte(r.stdout), &backups)
	if last := backups[len(backups)-1]; last.Certificate == nil || last.Certificate.Fingerprint != fingerprint(ps[1]) || last.ListenAddress != addr2 {
		t.Errorf("the backup of the restore: %+v", last)
	}
	// And without a name, restore undoes the restore.
	if r := runMMTLS(t, append([]string{"restore"}, args...)...); r.code != 0 {
		t.Fatalf("restore the newest:\n%s", r)
	}
	assertServes(t, addr2, ps[1])
	if _, err := os.Stat(filepath.Join(n.tree.StateDir, "journal.json")); err == nil {
		t.Error("a journal is left behind")
	}
}
