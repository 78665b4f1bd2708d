package certs

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// Arbitrary ids for the destination's owner; as root we can chown to them
// without the user existing.
const (
	mmUID = 4242
	mmGID = 4243
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("installer tests need root (chown); CI runs as root")
		}
		t.Skip("installer tests need root (chown)")
	}
}

// hostileDir makes a destination directory owned by the "mattermost" ids,
// as /opt/mattermost/config is.
func hostileDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "config")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, mmUID, mmGID); err != nil {
		t.Fatal(err)
	}
	return dir
}

func pairFiles() []File {
	return []File{{Name: "fullchain.pem", Data: []byte("CERT v1\n")}, {Name: "privkey.pem", Data: []byte("KEY v1\n")}}
}

func statOf(t *testing.T, path string) *syscall.Stat_t {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t)
}

func checkInstalled(t *testing.T, path string, data []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Errorf("%s holds %q, want %q", path, got, data)
	}
	st := statOf(t, path)
	if st.Mode&syscall.S_IFMT != syscall.S_IFREG || st.Nlink != 1 {
		t.Errorf("%s: mode %o nlink %d, want a regular file with one link", path, st.Mode, st.Nlink)
	}
	if st.Uid != mmUID || st.Gid != mmGID || st.Mode&0o7777 != 0o400 {
		t.Errorf("%s: owner %d:%d mode %04o, want %d:%d 0400", path, st.Uid, st.Gid, st.Mode&0o7777, mmUID, mmGID)
	}
}

func TestInstallCreatesReplacesAndNoOps(t *testing.T) {
	requireRoot(t)
	dir := hostileDir(t)
	backups := t.TempDir()
	req := InstallRequest{Dir: dir, Files: pairFiles(), UID: mmUID, GID: mmGID, BackupDir: backups}

	res, err := Install(context.Background(), req)
	if err != nil {
		t.Fatalf("first install: %v", err)
	}
	if !res.Changed || res.Files[0].Action != ActionCreate || res.Files[1].Action != ActionCreate {
		t.Errorf("first install = %+v, want two creates", res)
	}
	for _, f := range req.Files {
		checkInstalled(t, filepath.Join(dir, f.Name), f.Data)
	}

	res, err = Install(context.Background(), req)
	if err != nil {
		t.Fatalf("second install: %v", err)
	}
	if res.Changed || res.Files[0].Action != ActionUnchanged {
		t.Errorf("identical install = %+v, want nothing changed", res)
	}

	// Drift: someone chmods the key. Content is the same; the mode is fixed.
	if err := os.Chmod(filepath.Join(dir, "privkey.pem"), 0o644); err != nil {
		t.Fatal(err)
	}
	res, err = Install(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if got := res.Files[1].Action; got != ActionFixAttrs {
		t.Errorf("after chmod, action = %s, want %s", got, ActionFixAttrs)
	}
	checkInstalled(t, filepath.Join(dir, "privkey.pem"), []byte("KEY v1\n"))

	// New content: replaced, and the previous file backed up.
	req.Files = []File{{Name: "fullchain.pem", Data: []byte("CERT v2\n")}, {Name: "privkey.pem", Data: []byte("KEY v2\n")}}
	res, err = Install(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if res.Files[0].Action != ActionReplace || len(res.Backups) != 2 {
		t.Errorf("replace = %+v, want replace with two backups", res)
	}
	if got, _ := os.ReadFile(filepath.Join(backups, "privkey.pem")); string(got) != "KEY v1\n" {
		t.Errorf("backup holds %q, want the previous key", got)
	}
	if st := statOf(t, filepath.Join(backups, "privkey.pem")); st.Uid != 0 || st.Mode&0o777 != 0o600 {
		t.Errorf("backup owner %d mode %o, want root 0600", st.Uid, st.Mode&0o777)
	}
	checkInstalled(t, filepath.Join(dir, "privkey.pem"), []byte("KEY v2\n"))

	// And Restore puts v1 back with its owner and mode.
	if err := Restore(context.Background(), dir, res.Files); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	checkInstalled(t, filepath.Join(dir, "privkey.pem"), []byte("KEY v1\n"))
}

func TestInstallDryRunWritesNothing(t *testing.T) {
	requireRoot(t)
	dir := hostileDir(t)
	res, err := Install(context.Background(), InstallRequest{Dir: dir, Files: pairFiles(), UID: mmUID, GID: mmGID, DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Changed {
		t.Error("dry run reports no change for an empty directory")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 0 {
		t.Errorf("dry run left %d entries in %s", len(entries), dir)
	}
}

// A symlink or hard link planted at a destination name is replaced, never
// followed: the root-owned file it points at stays as it was.
func TestInstallPlantedLinks(t *testing.T) {
	requireRoot(t)
	for _, kind := range []string{"symlink", "hardlink"} {
		for _, name := range []string{"fullchain.pem", "privkey.pem"} {
			t.Run(kind+"/"+name, func(t *testing.T) {
				dir := hostileDir(t)
				victim := filepath.Join(t.TempDir(), "shadow")
				if err := os.WriteFile(victim, []byte("root's secret\n"), 0o640); err != nil {
					t.Fatal(err)
				}
				var err error
				if kind == "symlink" {
					err = os.Symlink(victim, filepath.Join(dir, name))
				} else {
					err = os.Link(victim, filepath.Join(dir, name))
				}
				if err != nil {
					t.Fatal(err)
				}
				res, err := Install(context.Background(), InstallRequest{Dir: dir, Files: pairFiles(), UID: mmUID, GID: mmGID, BackupDir: t.TempDir()})
				if err != nil {
					t.Fatalf("Install: %v", err)
				}
				got, _ := os.ReadFile(victim)
				st := statOf(t, victim)
				if string(got) != "root's secret\n" || st.Uid != 0 || st.Mode&0o777 != 0o640 || st.Nlink != 1 {
					t.Errorf("victim changed: %q owner %d mode %o nlink %d", got, st.Uid, st.Mode&0o777, st.Nlink)
				}
				for _, fr := range res.Files {
					if fr.Name == name && (fr.Suspicious == "" || fr.Previous != nil) {
						t.Errorf("%s: Suspicious=%q Previous=%v, want flagged and not backed up", name, fr.Suspicious, fr.Previous)
					}
				}
				for _, f := range pairFiles() {
					checkInstalled(t, filepath.Join(dir, f.Name), f.Data)
				}
			})
		}
	}
}

// At no step of an install may anything in the directory be readable by
// anyone but root and the final owner.
func TestInstallNeverExposesKey(t *testing.T) {
	requireRoot(t)
	dir := hostileDir(t)
	var steps []string
	req := InstallRequest{Dir: dir, Files: pairFiles(), UID: mmUID, GID: mmGID}
	req.observe = func(step, tmp string) {
		steps = append(steps, step)
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Errorf("%s: %v", step, err)
			return
		}
		for _, e := range entries {
			st := statOf(t, filepath.Join(dir, e.Name()))
			if st.Mode&0o077 != 0 {
				t.Errorf("step %s: %s has mode %04o", step, e.Name(), st.Mode&0o7777)
			}
			if st.Uid != 0 && st.Uid != mmUID {
				t.Errorf("step %s: %s owned by uid %d", step, e.Name(), st.Uid)
			}
		}
	}
	if _, err := Install(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if len(steps) != 8 {
		t.Errorf("observed steps %v, want 4 per file", steps)
	}
}

func TestInstallRemovesStaleTempFiles(t *testing.T) {
	requireRoot(t)
	dir := hostileDir(t)
	stale := filepath.Join(dir, ".privkey.pem"+tempMarker+"0123456789abcdef")
	if err := os.WriteFile(stale, []byte("half"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Install(context.Background(), InstallRequest{Dir: dir, Files: pairFiles(), UID: mmUID, GID: mmGID}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(stale); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("stale temp file still there: %v", err)
	}
}

func TestOpenDirSymlinks(t *testing.T) {
	requireRoot(t)
	base := t.TempDir() // root-owned, 0700
	real := filepath.Join(base, "mattermost-11")
	if err := os.MkdirAll(filepath.Join(real, "config"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("mattermost-11", filepath.Join(base, "mattermost")); err != nil {
		t.Fatal(err)
	}
	// The admin's link: root's, in a directory only root writes.
	d, err := OpenDir(filepath.Join(base, "mattermost", "config"))
	if err != nil {
		t.Fatalf("root-owned link refused: %v", err)
	}
	d.Close()

	// A link the mattermost user owns.
	userLink := filepath.Join(base, "userlink")
	if err := os.Symlink(real, userLink); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(userLink, mmUID, mmGID); err != nil {
		t.Fatal(err)
	}
	_, err = OpenDir(filepath.Join(userLink, "config"))
	want := `symlink "` + userLink + `" is owned by uid 4242, not root`
	if !errors.Is(err, ErrUnsafePath) || !strings.Contains(err.Error(), want) {
		t.Errorf("user-owned link: %v, want %q", err, want)
	}

	// A root-owned link inside a directory the mattermost user can write.
	if err := os.Chown(real, mmUID, mmGID); err != nil {
		t.Fatal(err)
	}
	inner := filepath.Join(real, "cfg")
	if err := os.Symlink("config", inner); err != nil {
		t.Fatal(err)
	}
	_, err = OpenDir(inner)
	if !errors.Is(err, ErrUnsafePath) || !strings.Contains(err.Error(), "which someone other than root can write") {
		t.Errorf("link in user-writable dir: %v", err)
	}

	// Install through the refused link writes nothing at its target.
	_, err = Install(context.Background(), InstallRequest{Dir: filepath.Join(userLink, "config"), Files: pairFiles(), UID: mmUID, GID: mmGID})
	if !errors.Is(err, ErrUnsafePath) {
		t.Errorf("install through user link: %v", err)
	}
	if entries, _ := os.ReadDir(filepath.Join(real, "config")); len(entries) != 0 {
		t.Errorf("install through a refused link wrote %d files", len(entries))
	}

	if _, err := OpenDir("relative/dir"); err == nil {
		t.Error("relative path accepted")
	}
	if _, err := OpenDir(filepath.Join(base, "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing dir: %v", err)
	}
}

func TestInstallRejectsBadNames(t *testing.T) {
	for _, name := range []string{"", ".", "..", "a/b", "x" + tempMarker} {
		_, err := Install(context.Background(), InstallRequest{Dir: "/nonexistent", Files: []File{{Name: name}}})
		if err == nil || !strings.Contains(err.Error(), "must be a plain name without slashes") {
			t.Errorf("name %q: %v", name, err)
		}
	}
}

func TestDirPreservesXattrs(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	d, err := OpenDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	attrs := FileAttrs{UID: 0, GID: 0, Mode: 0o600, Xattrs: map[string][]byte{"user.mmtls.test": []byte("label")}}
	if err := d.WriteFile("config.json", []byte("{}"), attrs); err != nil {
		if errors.Is(err, syscall.ENOTSUP) || errors.Is(err, syscall.EOPNOTSUPP) {
			t.Skipf("file system has no user xattrs: %v", err)
		}
		t.Fatal(err)
	}
	_, st, err := d.ReadFile("config.json", 1024)
	if err != nil {
		t.Fatal(err)
	}
	if string(st.Xattrs["user.mmtls.test"]) != "label" || st.Mode != 0o600 {
		t.Errorf("read back %+v", st)
	}
}
