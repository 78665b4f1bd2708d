package push

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mmtls/mmtls/certs"
	"github.com/mmtls/mmtls/test/fixture"
)

// tree makes a throwaway install owned by uid 4242 (no such user needed).
func tree(t *testing.T) (*fixture.Tree, *fixture.Pair) {
	t.Helper()
	fixture.RequireRoot(t)
	tr, err := fixture.NewTree(t.TempDir(), "4242", 4242, 4242, "127.0.0.1:8065", "https://"+fixture.SiteHost)
	if err != nil {
		t.Fatal(err)
	}
	p, err := fixture.WritePair(filepath.Join(tr.Root, "src"), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return tr, p
}

func opts(tr *fixture.Tree, p *fixture.Pair) Options {
	return Options{CertFile: p.CertFile, KeyFile: p.KeyFile, MattermostDir: tr.MattermostDir,
		StateDir: tr.StateDir, CAFile: p.RootFile, Owner: "4242", NoRestart: true, LockTimeout: time.Second}
}

// Overrides of owned keys in the service environment would silently win
// over config.json: refused, naming the variable and the file.
func TestPushRefusesEnvironmentOverrides(t *testing.T) {
	tr, p := tree(t)
	dropin := filepath.Join(tr.UnitDir, "mattermost.service.d", "override.conf")
	os.MkdirAll(filepath.Dir(dropin), 0o755)
	os.WriteFile(filepath.Join(tr.UnitDir, "mattermost.service"), []byte("[Service]\nExecStart=/opt/mattermost/bin/mattermost\n"), 0o644)
	os.WriteFile(dropin, []byte("[Service]\nEnvironment=MM_SERVICESETTINGS_LISTENADDRESS=:8065\n"), 0o644)
	pu := &Pusher{UnitDirs: []string{tr.UnitDir}}
	_, err := pu.Push(context.Background(), opts(tr, p))
	want := `MM_SERVICESETTINGS_LISTENADDRESS=":8065" in Mattermost's service environment (` + dropin + `:2) overrides ServiceSettings.ListenAddress`
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), want) {
		t.Errorf("Push = %v\nwant refusal containing %s", err, want)
	}

	// An unreachable database: refused, naming it without its password.
	os.WriteFile(dropin, []byte("[Service]\nEnvironment=MM_CONFIG=postgres://mmuser:secret@127.0.0.1:1/mattermost\n"), 0o644)
	_, err = pu.Push(context.Background(), opts(tr, p))
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "read Mattermost's config from the database") || strings.Contains(err.Error(), "secret") {
		t.Errorf("unreachable database config: %v", err)
	}
	// MySQL: a plain refusal.
	os.WriteFile(dropin, []byte("[Service]\nEnvironment=MM_CONFIG=mysql://mmuser@tcp(127.0.0.1:1)/mattermost\n"), 0o644)
	if _, err = pu.Push(context.Background(), opts(tr, p)); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "MySQL") {
		t.Errorf("MySQL config: %v", err)
	}
}

// A journal left at the install step (the run was killed while renaming)
// is rolled back by the next run, which says so.
func TestPushRecoversInterruptedInstall(t *testing.T) {
	tr, p := tree(t)
	ctx := context.Background()
	o := opts(tr, p)
	if _, err := (&Pusher{}).Push(ctx, o); err != nil {
		t.Fatal(err)
	}
	key := filepath.Join(tr.ConfigDir, "privkey.pem")
	oldKey, _ := os.ReadFile(key)

	// Simulate the killed run: backups written, one file replaced, journal
	// at "installing".
	backups := filepath.Join(tr.StateDir, "backups", "killed")
	os.MkdirAll(backups, 0o700)
	os.WriteFile(filepath.Join(backups, "privkey.pem"), oldKey, 0o600)
	half := []byte("a key from the killed run\n")
	os.WriteFile(key, half, 0o400)
	j := &journal{Version: 1, PID: 1, Started: time.Now(), Options: o.WithDefaults(), DestDir: tr.ConfigDir, BackupDir: backups,
		Files: []certs.FileResult{{Name: "privkey.pem", Path: key, Action: certs.ActionReplace,
			Previous: &certs.Previous{UID: 4242, GID: 4242, Mode: 0o400}}},
		ConfigPath: tr.ConfigPath, dir: tr.StateDir}
	if err := j.save(stepInstalling); err != nil {
		t.Fatal(err)
	}

	res, err := (&Pusher{}).Push(ctx, o)
	if err != nil {
		t.Fatalf("next run: %v", err)
	}
	if !strings.Contains(res.Recovered, `a push interrupted at step "installing"`) || !strings.Contains(res.Recovered, "rolled back") {
		t.Errorf("Recovered = %q", res.Recovered)
	}
	if got, _ := os.ReadFile(key); string(got) != string(oldKey) {
		t.Errorf("key after recovery = %q, want the previous one", got)
	}
	if res.Status != StatusUnchanged {
		t.Errorf("status after recovery = %s", res.Status)
	}
}

// A corrupt journal stops pushes with a message saying what to do.
func TestPushCorruptJournal(t *testing.T) {
	tr, p := tree(t)
	os.MkdirAll(tr.StateDir, 0o700)
	os.WriteFile(filepath.Join(tr.StateDir, journalName), []byte("{"), 0o600)
	_, err := (&Pusher{}).Push(context.Background(), opts(tr, p))
	if err == nil || !strings.Contains(err.Error(), "is corrupt") || !strings.Contains(err.Error(), "remove it to continue") {
		t.Errorf("corrupt journal: %v", err)
	}
}

// The state directory holds backups of keys: it must be root's alone.
func TestPushRefusesLooseStateDir(t *testing.T) {
	tr, p := tree(t)
	os.MkdirAll(tr.StateDir, 0o777)
	os.Chmod(tr.StateDir, 0o777)
	_, err := (&Pusher{}).Push(context.Background(), opts(tr, p))
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "must not be writable by group or others") {
		t.Errorf("world-writable state dir: %v", err)
	}
}

func TestPushResultJSON(t *testing.T) {
	tr, p := tree(t)
	o := opts(tr, p)
	o.DryRun = true
	res, err := (&Pusher{}).Push(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(res)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{`"status":"planned"`, `"fingerprint":"sha256:`, `"action":"create"`, `"key":"ServiceSettings.ListenAddress"`} {
		if !strings.Contains(string(b), key) {
			t.Errorf("JSON lacks %s:\n%s", key, b)
		}
	}
}

func TestSetBindCapability(t *testing.T) {
	fixture.RequireRoot(t)
	bin := filepath.Join(t.TempDir(), "mattermost")
	os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755)
	undo, changed, err := setBindCapability(bin)
	if errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.EOPNOTSUPP) {
		t.Skipf("file system has no file capabilities: %v", err)
	}
	if err != nil || !changed {
		t.Fatalf("setBindCapability = %v, %v", changed, err)
	}
	buf := make([]byte, 64)
	n, err := unix.Getxattr(bin, "security.capability", buf)
	if err != nil {
		t.Fatal(err)
	}
	// revision 2 with the effective bit; permitted has bit 10.
	if n != 20 || buf[3] != 0x02 || buf[0]&1 != 1 || buf[5]&(1<<2) == 0 {
		t.Errorf("security.capability = % x", buf[:n])
	}
	if _, changed, err := setBindCapability(bin); err != nil || changed {
		t.Errorf("second call = %v, %v; want no change", changed, err)
	}
	// A rollback takes it back.
	if err := undo(); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Getxattr(bin, "security.capability", buf); !errors.Is(err, unix.ENODATA) {
		t.Errorf("after undo: %v, want no capability", err)
	}
}

// The mattermost user owns bin/: a link planted in place of the binary must
// not make root give another program (python3, here) the capability.
func TestSetBindCapabilityRefusesPlantedLinks(t *testing.T) {
	fixture.RequireRoot(t)
	victim := filepath.Join(t.TempDir(), "python3")
	if err := os.WriteFile(victim, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{"symlink", "hardlink"} {
		t.Run(kind, func(t *testing.T) {
			bin := filepath.Join(t.TempDir(), "mattermost")
			link := os.Symlink
			if kind == "hardlink" {
				link = os.Link
			}
			if err := link(victim, bin); err != nil {
				t.Fatal(err)
			}
			if _, _, err := setBindCapability(bin); !errors.Is(err, certs.ErrUntrustedFile) {
				t.Errorf("setBindCapability through a %s = %v, want ErrUntrustedFile", kind, err)
			}
			if _, err := unix.Getxattr(victim, "security.capability", make([]byte, 64)); !errors.Is(err, unix.ENODATA) {
				t.Errorf("the link's target got a capability (%v)", err)
			}
		})
	}
}

func TestUnitGrants(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "mattermost.service"), []byte("[Service]\nUser=mattermost\n"), 0o644)
	if unitGrants([]string{dir}, "mattermost") {
		t.Error("unit without AmbientCapabilities reported as granting")
	}
	os.MkdirAll(filepath.Join(dir, "mattermost.service.d"), 0o755)
	os.WriteFile(filepath.Join(dir, "mattermost.service.d", "cap.conf"), []byte("[Service]\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n"), 0o644)
	if !unitGrants([]string{dir}, "mattermost") {
		t.Error("drop-in with AmbientCapabilities not seen")
	}
}

// Backups are kept for the last keepBackups pushes, the newest included.
func TestBackupRetention(t *testing.T) {
	fixture.RequireRoot(t)
	state := t.TempDir()
	var last string
	for range keepBackups + 3 {
		dir, err := newBackupDir(state, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		last = dir
	}
	entries, _ := os.ReadDir(filepath.Join(state, "backups"))
	if len(entries) != keepBackups {
		t.Errorf("%d backup directories kept, want %d", len(entries), keepBackups)
	}
	if _, err := os.Stat(last); err != nil {
		t.Errorf("newest backup directory pruned: %v", err)
	}
}

// A dry run says every step: the restart, the bind privilege it would set
// up, and what the verification checks; it writes none of them. With
// --no-restart to a port below 1024 the push warns that nothing was set up
// for Mattermost to bind it.
func TestPushPlanSaysEveryStep(t *testing.T) {
	tr, p := tree(t)
	os.WriteFile(filepath.Join(tr.UnitDir, "mattermost.service"), []byte("[Service]\nExecStart=/opt/mattermost/bin/mattermost\n"), 0o644)
	pusher := &Pusher{UnitDirs: []string{tr.UnitDir}}
	o := opts(tr, p)
	o.Listen, o.NoRestart, o.DryRun = ":443", false, true
	res, err := pusher.Push(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	dropIn := filepath.Join(tr.UnitDir, "mattermost.service.d", bindDropIn)
	if res.Restart != "systemctl restart mattermost" {
		t.Errorf("restart = %q", res.Restart)
	}
	fp := certs.Fingerprint(p.Chain.Leaf.Cert)
	for _, want := range []string{"127.0.0.1:443", fixture.SiteHost, fp, "/api/v4/system/ping"} {
		if !strings.Contains(res.Verify, want) {
			t.Errorf("verify %q lacks %q", res.Verify, want)
		}
	}
	if !strings.Contains(res.BindPrivilege, dropIn) || !strings.Contains(res.BindPrivilege, "port 443") {
		t.Errorf("bind privilege = %q", res.BindPrivilege)
	}
	if _, err := os.Stat(dropIn); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a dry run wrote the drop-in: %v", err)
	}

	o.RestartCommand = "true"
	if res, _ = pusher.Push(context.Background(), o); res.Restart != "true" || !strings.Contains(res.BindPrivilege, "cap_net_bind_service") {
		t.Errorf("with --restart-command: restart %q, bind %q", res.Restart, res.BindPrivilege)
	}

	o.RestartCommand, o.NoRestart, o.DryRun = "", true, false
	if res, err = pusher.Push(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, w := range res.Warnings {
		found = found || w.Code == "bind-privilege" && strings.Contains(w.Message, "--no-restart") && strings.Contains(w.Message, dropIn)
	}
	if !found || res.Restart != "" {
		t.Errorf("--no-restart to :443: warnings %v, restart %q", res.Warnings, res.Restart)
	}
}

// The local-mode socket's path comes from a config the mattermost user can
// change: a socket that user does not own (another service's), a link or
// a plain file is refused before anything is sent.
func TestOwnedSocket(t *testing.T) {
	dir := t.TempDir()
	mmDir := filepath.Join(dir, "mattermost")
	os.Mkdir(mmDir, 0o755)
	sock := filepath.Join(dir, "mm.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := ownedSocket(sock, mmDir); err != nil {
		t.Errorf("a socket of the directory's owner: %v", err)
	}
	os.Chown(mmDir, 4242, 4242)
	if err := ownedSocket(sock, mmDir); err == nil || !strings.Contains(err.Error(), "not Mattermost's socket") {
		t.Errorf("another user's socket: %v", err)
	}
	os.Chown(mmDir, 0, 0)
	link := filepath.Join(dir, "link.sock")
	os.Symlink(sock, link)
	if err := ownedSocket(link, mmDir); err == nil {
		t.Error("a link to a socket was accepted")
	}
	plain := filepath.Join(dir, "plain")
	os.WriteFile(plain, nil, 0o600)
	if err := ownedSocket(plain, mmDir); err == nil {
		t.Error("a plain file was accepted")
	}
}
