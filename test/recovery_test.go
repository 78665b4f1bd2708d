package test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mmtls/mmtls/test/fixture"
)

// A push killed with SIGKILL between install and restart is completed by
// the next run, which says so.
func TestPushKilledBeforeRestartIsCompletedByNextRun(t *testing.T) {
	n := newNode(t)
	ps, roots := n.pairs(2)
	p1, p2 := ps[0], ps[1]
	addr, _ := fixture.PickPort()
	restart := n.restartCmd()
	n.mustPush(p1, roots, "--listen", addr, "--restart-command", restart)

	// This push's restart command announces itself and blocks; the push is
	// killed right there, with the new files and config on disk.
	marker := filepath.Join(n.tree.Root, "restart-started")
	blocking := "echo $$ > " + marker + "; exec sleep 120"
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, mmtlsBin, n.pushArgs(p2, roots, "--listen", addr, "--restart-command", blocking)...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var shellPID int
	waitFor(t, 20*time.Second, func() error {
		b, err := os.ReadFile(marker)
		if err != nil {
			return err
		}
		shellPID, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err
	})
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	syscall.Kill(shellPID, syscall.SIGKILL) // the orphaned restart command
	if _, err := os.Stat(filepath.Join(n.tree.StateDir, "journal.json")); err != nil {
		t.Fatalf("no journal after the kill: %v", err)
	}
	assertServes(t, addr, p1) // not restarted yet

	r, res := pushJSON(t, n.pushArgs(p2, roots, "--listen", addr, "--restart-command", restart)...)
	if r.code != 0 {
		t.Fatalf("next run:\n%s", r)
	}
	rec, _ := res["recovered"].(string)
	if !strings.Contains(rec, `a push interrupted at step "restarting"`) || !strings.Contains(rec, "was completed") {
		t.Errorf("recovered = %q", rec)
	}
	if res["status"] != "unchanged" {
		t.Errorf("after recovery, status = %v, want unchanged", res["status"])
	}
	assertServes(t, addr, p2)
	if _, err := os.Stat(filepath.Join(n.tree.StateDir, "journal.json")); !os.IsNotExist(err) {
		t.Errorf("journal still there after recovery: %v", err)
	}
}

// A second push waits for the lock, then gives up with exit code 6.
func TestPushLockBusy(t *testing.T) {
	n := newNode(t)
	p1, _ := fixture.WritePair(filepath.Join(n.tree.Root, "src1"), time.Now())
	if err := os.MkdirAll(n.tree.StateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(n.tree.StateDir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	f.WriteString("4242\n")
	r := runMMTLS(t, n.pushArgs(p1, p1.RootFile, "--no-restart", "--lock-timeout", "300ms")...)
	if r.code != 6 || !strings.Contains(r.stderr, "is held by another mmtls run (pid 4242); gave up after 300ms (--lock-timeout)") {
		t.Errorf("want exit 6 naming the holder, got:\n%s", r)
	}
	unix.Flock(int(f.Fd()), unix.LOCK_UN)
	if r := runMMTLS(t, n.pushArgs(p1, p1.RootFile, "--no-restart", "--lock-timeout", "300ms")...); r.code != 0 {
		t.Errorf("after the lock was released:\n%s", r)
	}
}

// --dry-run changes nothing, and says what it would do.
func TestPushDryRun(t *testing.T) {
	n := newNode(t)
	p1, _ := fixture.WritePair(filepath.Join(n.tree.Root, "src1"), time.Now())
	before := stateOf(t, n.tree.ConfigPath)
	r, res := pushJSON(t, n.pushArgs(p1, p1.RootFile, "--dry-run")...)
	if r.code != 0 || res["status"] != "planned" {
		t.Fatalf("dry run:\n%s", r)
	}
	changes, _ := res["config"].(map[string]any)["changes"].([]any)
	if len(changes) != 4 {
		t.Errorf("planned %d config changes, want 4: %v", len(changes), changes)
	}
	if got := stateOf(t, n.tree.ConfigPath); got != before {
		t.Error("dry run changed config.json")
	}
	entries, _ := os.ReadDir(n.tree.ConfigDir)
	if len(entries) != 1 {
		t.Errorf("dry run left files in %s: %v", n.tree.ConfigDir, entries)
	}
	if _, err := os.Stat(n.tree.StateDir); !os.IsNotExist(err) {
		t.Errorf("dry run created the state directory: %v", err)
	}
}

// A config directory replaced by a symlink the mattermost user owns is
// refused, and nothing is written through it.
func TestPushRefusesUserOwnedSymlink(t *testing.T) {
	n := newNode(t)
	p1, _ := fixture.WritePair(filepath.Join(n.tree.Root, "src1"), time.Now())
	target := filepath.Join(n.tree.Root, "elsewhere")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(n.tree.MattermostDir, "certs")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(link, mmUID, mmGID); err != nil {
		t.Fatal(err)
	}
	r := runMMTLS(t, n.pushArgs(p1, p1.RootFile, "--no-restart", "--dest-dir", link)...)
	if r.code != 3 || !strings.Contains(r.stderr, `symlink "`+link+`" is owned by uid`) {
		t.Errorf("want exit 3 naming the link, got:\n%s", r)
	}
	if entries, _ := os.ReadDir(target); len(entries) != 0 {
		t.Errorf("files written through the refused link: %v", entries)
	}
}

// An http SiteURL is refused with the reason; --site-url fixes it in the
// same push.
func TestPushSiteURL(t *testing.T) {
	n := newNode(t)
	p1, _ := fixture.WritePair(filepath.Join(n.tree.Root, "src1"), time.Now())
	b, _ := os.ReadFile(n.tree.ConfigPath)
	os.WriteFile(n.tree.ConfigPath, []byte(strings.Replace(string(b), `"https://`+fixture.SiteHost, `"http://`+fixture.SiteHost, 1)), 0o600)
	r := runMMTLS(t, n.pushArgs(p1, p1.RootFile, "--no-restart")...)
	if r.code != 3 || !strings.Contains(r.stderr, "is not https: Office 365 / Entra ID accepts only an https redirect URI") {
		t.Errorf("http SiteURL: want exit 3 with the reason, got:\n%s", r)
	}
	r, res := pushJSON(t, n.pushArgs(p1, p1.RootFile, "--no-restart", "--site-url", "https://"+fixture.SiteHost+"/mm")...)
	if r.code != 0 {
		t.Fatalf("--site-url push:\n%s", r)
	}
	if res["site_url"] != "https://"+fixture.SiteHost+"/mm" || res["site_url_origin"] != "--site-url" {
		t.Errorf("site url %v from %v", res["site_url"], res["site_url_origin"])
	}
}
