package certs

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// openWatch reports whether anything opened path (IN_OPEN) between its
// creation and the call of the returned function.
func openWatch(t *testing.T, path string) func() bool {
	t.Helper()
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if _, err := unix.InotifyAddWatch(fd, path, unix.IN_OPEN); err != nil {
		t.Fatal(err)
	}
	return func() bool {
		buf := make([]byte, 4096)
		n, err := unix.Read(fd, buf)
		return err == nil && n > 0
	}
}

// A name that is a device node or a FIFO is refused without ever being
// opened: opening /dev/watchdog arms it, opening a FIFO blocks.
func TestReadFileNeverOpensSpecialFiles(t *testing.T) {
	requireRoot(t)
	for _, tt := range []struct {
		name string
		make func(path string) error
		want string
	}{
		{"fifo", func(p string) error { return unix.Mkfifo(p, 0o644) }, "a FIFO"},
		{"char device", func(p string) error { return unix.Mknod(p, unix.S_IFCHR|0o644, int(unix.Mkdev(1, 3))) }, "a character device"},
		{"directory", func(p string) error { return os.Mkdir(p, 0o755) }, "a directory"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := hostileDir(t)
			path := filepath.Join(dir, "cert.pem")
			if err := tt.make(path); err != nil {
				t.Fatal(err)
			}
			opened := openWatch(t, path)
			d, err := OpenDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			_, _, err = d.ReadFile("cert.pem", MaxFileSize)
			if !errors.Is(err, ErrUntrustedFile) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("ReadFile = %v, want ErrUntrustedFile naming %q", err, tt.want)
			}
			if tt.name != "directory" && opened() {
				t.Error("the special file was opened")
			}
			// The same for a file named by the administrator (a source pair).
			if _, err := readLimited(path); !errors.Is(err, ErrUntrustedFile) {
				t.Errorf("readLimited = %v, want ErrUntrustedFile", err)
			}
			if tt.name != "directory" && opened() {
				t.Error("readLimited opened the special file")
			}
		})
	}
}

// What the mattermost user plants at the two names mmtls owns is replaced,
// whatever it is, and the install says so instead of failing.
func TestInstallReplacesPlantedObstacles(t *testing.T) {
	requireRoot(t)
	for _, tt := range []struct {
		name  string
		plant func(t *testing.T, path string)
	}{
		{"file over 1 MiB", func(t *testing.T, p string) {
			if err := os.WriteFile(p, bytes.Repeat([]byte("x"), MaxFileSize+1), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"empty directory", func(t *testing.T, p string) {
			if err := os.Mkdir(p, 0o755); err != nil {
				t.Fatal(err)
			}
		}},
		{"full directory", func(t *testing.T, p string) {
			if err := os.Mkdir(p, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(p, "junk"), []byte("x"), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"fifo", func(t *testing.T, p string) {
			if err := unix.Mkfifo(p, 0o600); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := hostileDir(t)
			tt.plant(t, filepath.Join(dir, "privkey.pem"))
			os.Lchown(filepath.Join(dir, "privkey.pem"), mmUID, mmGID)
			var logs bytes.Buffer
			res, err := Install(context.Background(), InstallRequest{Dir: dir, Files: pairFiles(), UID: mmUID, GID: mmGID,
				BackupDir: t.TempDir(), Logger: testLogger(&logs)})
			if err != nil {
				t.Fatalf("Install: %v", err)
			}
			if res.Files[1].Suspicious == "" || res.Files[1].Previous != nil {
				t.Errorf("privkey.pem: Suspicious=%q Previous=%v, want flagged, not backed up", res.Files[1].Suspicious, res.Files[1].Previous)
			}
			for _, f := range pairFiles() {
				checkInstalled(t, filepath.Join(dir, f.Name), f.Data)
			}
			if !strings.Contains(logs.String(), "privkey.pem") {
				t.Errorf("nothing said about the planted file:\n%s", logs.String())
			}
		})
	}
}

// Restore takes names from a journal: one that climbs out of the directory
// is refused, and nothing outside it is touched.
func TestRestoreRefusesNamesOutsideTheDirectory(t *testing.T) {
	requireRoot(t)
	dir := hostileDir(t)
	victim := filepath.Join(filepath.Dir(dir), "victim")
	if err := os.WriteFile(victim, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := Restore(context.Background(), dir, []FileResult{{Name: "../victim", Action: ActionCreate}})
	if err == nil || !strings.Contains(err.Error(), `"../victim"`) {
		t.Errorf("Restore = %v, want a refusal naming the file", err)
	}
	if data, err := os.ReadFile(victim); err != nil || string(data) != "keep me" {
		t.Errorf("victim: %q %v", data, err)
	}
}

func testLogger(w *bytes.Buffer) *slog.Logger { return slog.New(slog.NewTextHandler(w, nil)) }
