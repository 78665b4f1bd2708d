package systemdlab

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// boot boots a lab for t, skipping where none can boot (failing under CI,
// which must run these tests).
func boot(t *testing.T, o Options) *Lab {
	t.Helper()
	if err := Available(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	l, err := Boot(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("lab teardown: %v", err)
		}
	})
	return l
}

func TestLabBootsRunsAndLeavesNothing(t *testing.T) {
	l := boot(t, Options{})
	t.Logf("boot to running: %s", l.BootTime)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := l.Run(ctx, "systemctl", "is-system-running")
	if err != nil || strings.TrimSpace(out) != "running" {
		t.Fatalf("is-system-running: %q %v\n%s", out, err, l.Log())
	}
	// Writes stay in the lab.
	marker := filepath.Join("/etc", "mmtls-lab-marker-"+filepath.Base(l.dir))
	if _, err := l.Run(ctx, "touch", marker); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(marker); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a file written in the lab reached the host: %v", err)
	}
	dir, cg := l.dir, l.cgroup
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{dir, "/sys/fs/cgroup/systemd/" + cg, "/sys/fs/cgroup/unified/" + cg} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind: %v", p, err)
		}
	}
}

func BenchmarkLabBoot(b *testing.B) {
	if err := Available(); err != nil {
		b.Skip(err)
	}
	for b.Loop() {
		l, err := Boot(context.Background(), Options{})
		if err != nil {
			b.Fatal(err)
		}
		if err := l.Close(); err != nil {
			b.Fatal(err)
		}
	}
}
