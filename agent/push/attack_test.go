package push

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mmtls/mmtls/certs"
	"github.com/mmtls/mmtls/test/fixture"
)

// asMattermost runs a shell command as the tree's mattermost user (uid
// 4242), as an attacker holding that account would.
func asMattermost(t *testing.T, script string) {
	t.Helper()
	cmd := exec.Command("setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", "sh", "-c", script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("as the mattermost user: %s: %v\n%s", script, err, out)
	}
}

// A state directory under a directory the mattermost user can write could
// be swapped for theirs (renameat2 RENAME_EXCHANGE), journal included:
// refused before anything is read from it.
func TestPushRefusesStateDirUnderMattermostsTree(t *testing.T) {
	tr, p := tree(t)
	o := opts(tr, p)
	o.StateDir = filepath.Join(tr.MattermostDir, "mmtls-state") // /opt/mattermost is the mattermost user's
	_, err := (&Pusher{}).Push(context.Background(), o)
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tr.MattermostDir) || !strings.Contains(err.Error(), "owned by uid 4242") {
		t.Errorf("Push = %v, want a refusal naming %s", err, tr.MattermostDir)
	}
	if _, err := os.Stat(o.StateDir); err == nil {
		t.Error("the state directory was created under the mattermost user's tree")
	}
}

// A journal is acted on only if it names what a push may touch.
func TestPushRefusesForgedJournal(t *testing.T) {
	for _, tt := range []struct {
		name  string
		forge func(j *journal, tr *fixture.Tree)
		want  string
	}{
		{"name climbs out", func(j *journal, _ *fixture.Tree) { j.Files[0].Name = "../../../etc/shadow" }, "not a plain name"},
		{"backup elsewhere", func(j *journal, _ *fixture.Tree) { j.BackupDir = "/tmp/evil" }, "is not in"},
		{"config elsewhere", func(j *journal, _ *fixture.Tree) { j.ConfigPath = "/etc/docker/daemon.json" }, "this run's are"},
		{"destination elsewhere", func(j *journal, _ *fixture.Tree) {
			j.DestDir = "/etc/ssl/private"
			j.Files[0].Path = "/etc/ssl/private/privkey.pem"
		}, "this run's are"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tr, p := tree(t)
			o := opts(tr, p)
			if err := os.MkdirAll(filepath.Join(tr.StateDir, "backups", "x"), 0o700); err != nil {
				t.Fatal(err)
			}
			j := &journal{Version: journalVersion, PID: 1, Started: time.Now(), Options: o.WithDefaults(), DestDir: tr.ConfigDir,
				BackupDir: filepath.Join(tr.StateDir, "backups", "x"), ConfigPath: tr.ConfigPath, dir: tr.StateDir,
				Files: []certs.FileResult{{Name: "privkey.pem", Path: filepath.Join(tr.ConfigDir, "privkey.pem"), Action: certs.ActionCreate}}}
			tt.forge(j, tr)
			if err := j.save(stepInstalling); err != nil {
				t.Fatal(err)
			}
			_, err := (&Pusher{}).Push(context.Background(), o)
			if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Push = %v, want a refusal containing %q", err, tt.want)
			}
		})
	}
}

// Mattermost's EnvironmentFile lives in its config directory, which the
// mattermost user owns: a FIFO there must not hang a push (it held the lock
// and ignored SIGTERM), /dev/zero must not exhaust memory, and MM_CONFIG
// there must not make root edit a root-owned JSON file.
func TestPushEnvironmentFileFromMattermost(t *testing.T) {
	tr, p := tree(t)
	// t.TempDir's directories are root's 0700: let the user reach its tree.
	for d := tr.Root; d != "/tmp" && d != "/"; d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	envFile := filepath.Join(tr.ConfigDir, "mattermost.environment")
	unit := "[Service]\nExecStart=/opt/mattermost/bin/mattermost\nEnvironmentFile=" + envFile + "\n"
	if err := os.WriteFile(filepath.Join(tr.UnitDir, "mattermost.service"), []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	pu := &Pusher{UnitDirs: []string{tr.UnitDir}}
	o := opts(tr, p)

	asMattermost(t, "mkfifo "+envFile)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := pu.Push(ctx, o); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "a FIFO") {
		t.Errorf("FIFO EnvironmentFile: %v", err)
	}
	asMattermost(t, "rm "+envFile+" && ln -s /dev/zero "+envFile)
	if _, err := pu.Push(ctx, o); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "a character device") {
		t.Errorf("EnvironmentFile linked to /dev/zero: %v", err)
	}

	victim := filepath.Join(t.TempDir(), "daemon.json")
	orig := []byte(`{"ServiceSettings": {"SiteURL": "https://` + fixture.SiteHost + `"}}` + "\n")
	if err := os.WriteFile(victim, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	asMattermost(t, "rm "+envFile+" && echo MM_CONFIG="+victim+" > "+envFile)
	_, err := pu.Push(ctx, o)
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "owned by uid 0") {
		t.Errorf("MM_CONFIG from the mattermost user's file naming a root file: %v", err)
	}
	if got, _ := os.ReadFile(victim); string(got) != string(orig) {
		t.Errorf("the root-owned file was edited:\n%s", got)
	}
}

// A config that cannot be written (chattr +i) fails the push, which is
// rolled back cleanly: no "rollback failed" for a config never written.
func TestPushConfigWriteFailureRollsBackCleanly(t *testing.T) {
	tr, p := tree(t)
	if out, err := exec.Command("chattr", "+i", tr.ConfigPath).CombinedOutput(); err != nil {
		t.Skipf("chattr +i not available here: %v %s", err, out)
	}
	defer exec.Command("chattr", "-i", tr.ConfigPath).Run()
	_, err := (&Pusher{}).Push(context.Background(), opts(tr, p))
	if !errors.Is(err, ErrRolledBack) || errors.Is(err, ErrRollbackFailed) {
		t.Errorf("Push = %v, want rolled back, not rollback failed", err)
	}
	if _, err := os.Stat(filepath.Join(tr.StateDir, journalName)); err == nil {
		t.Error("the journal was left behind: every later run would try to recover it")
	}
}

// The first push warns about UseLetsEncrypt only where it was on.
func TestPushLetsEncryptWarningOnlyWhenOn(t *testing.T) {
	tr, p := tree(t)
	res, err := (&Pusher{}).Push(context.Background(), opts(tr, p))
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range res.Warnings {
		if w.Code == "letsencrypt-off" {
			t.Errorf("warned %q with UseLetsEncrypt absent", w.Message)
		}
	}
}

// Day one: a missing --key names the flag; --ca-file given gets no hint to
// pass --ca-file.
func TestPushNamesTheFlag(t *testing.T) {
	tr, p := tree(t)
	o := opts(tr, p)
	o.KeyFile = filepath.Join(filepath.Dir(p.KeyFile), "privekey.pem")
	_, err := (&Pusher{}).Push(context.Background(), o)
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), `--key "`+o.KeyFile+`": no such file`) {
		t.Errorf("missing key: %v", err)
	}
	other, err := fixture.WritePair(t.TempDir(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	o = opts(tr, p)
	o.CAFile = other.RootFile // a root that did not issue this chain
	_, err = (&Pusher{}).Push(context.Background(), o)
	if !errors.Is(err, ErrRefused) || strings.Contains(err.Error(), "pass its root certificate with --ca-file") || !strings.Contains(err.Error(), "--ca-file "+`"`+other.RootFile) {
		t.Errorf("untrusted chain with --ca-file given: %v", err)
	}
}
