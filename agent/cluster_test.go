package agent

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mmtls/mmtls/agent/clusterdb"
	"github.com/mmtls/mmtls/agent/push"
	"golang.org/x/sys/unix"
)

// A node that cannot reach the cluster database waits, then restarts after
// a random splay instead of blocking forever.
func TestPostgresLockFallsBackToSplay(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now: connection refused
	l := &PostgresLock{DSN: "postgres://mmuser@" + addr + "/mattermost?connect_timeout=1", Wait: 300 * time.Millisecond, Splay: 50 * time.Millisecond}
	start := time.Now()
	release, err := l.Acquire(context.Background())
	if err != nil {
		t.Fatalf("Acquire: %v", err)
	}
	release()
	if d := time.Since(start); d < 300*time.Millisecond || d > 10*time.Second {
		t.Errorf("fell back after %s, want after the 300ms wait", d)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := l.Acquire(ctx); err == nil {
		t.Error("Acquire with a cancelled context succeeded")
	}
}

func TestNewRestartLockModes(t *testing.T) {
	for mode, want := range map[string]string{"splay": "random splay", "off": "", "postgres": "postgres advisory lock"} {
		l, err := NewRestartLock(ClusterConfig{Mode: mode, DSN: "postgres://x@127.0.0.1:1/mm"}, push.Options{}, nil, nil, nil)
		if err != nil {
			t.Fatalf("%s: %v", mode, err)
		}
		got := ""
		if l != nil {
			got = l.String()
		}
		if got != want {
			t.Errorf("mode %s: %q, want %q", mode, got, want)
		}
	}
	if l, err := NewRestartLock(ClusterConfig{Mode: "auto", DSN: "mysql://u@tcp(db)/mm"}, push.Options{}, nil, nil, nil); err != nil || l.String() != "random splay" {
		t.Errorf("MySQL: %v %v", l, err)
	}
	if _, err := NewRestartLock(ClusterConfig{Mode: "raft"}, push.Options{}, nil, nil, nil); err == nil {
		t.Error("unknown mode accepted")
	}
	if got := clusterdb.NormalizeDSN("postgres://u@h/db?sslmode=disable&binary_parameters=yes"); got != "postgres://u@h/db?sslmode=disable" {
		t.Errorf("NormalizeDSN = %q", got)
	}
}

// A DSN from Mattermost's config (the mattermost user's file) that names a
// FIFO for the driver to read is not used: the connection would hang with
// the state lock held. Auto mode falls back to the splay; postgres refuses.
func TestNewRestartLockRefusesDSNFiles(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "root.crt")
	if err := unix.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	dsn := "postgres://mmuser@127.0.0.1:1/mm?sslmode=verify-full&sslrootcert=" + fifo
	l, err := NewRestartLock(ClusterConfig{Mode: "auto", DSN: dsn}, push.Options{}, nil, nil, nil)
	if err != nil || l.String() != "random splay" {
		t.Errorf("auto with a FIFO in the DSN: %v %v, want the splay", l, err)
	}
	if _, err := NewRestartLock(ClusterConfig{Mode: "postgres", DSN: dsn}, push.Options{}, nil, nil, nil); err == nil || !strings.Contains(err.Error(), "sslrootcert") {
		t.Errorf("postgres with a FIFO in the DSN: %v", err)
	}
	// Bounded even if the driver is handed one.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := clusterdb.Connect(ctx, dsn); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("connect = %v, want the deadline", err)
	}
}

// "auto" coordinates only a node that Mattermost runs as part of a cluster
// (ClusterSettings.Enable): a single node's config names a database too,
// often an unreachable default, and waiting for a lock there would only
// delay its restart.
func TestNewRestartLockAutoFollowsClusterSettings(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "config"), 0o755)
	o := push.Options{MattermostDir: dir, RestartCommand: "true"}
	for _, tt := range []struct {
		cfg  string
		want string
	}{
		{`{"SqlSettings": {"DriverName": "postgres", "DataSource": "postgres://mmuser:mostest@localhost/mattermost_test"}}`, ""},
		{`{"SqlSettings": {"DriverName": "postgres", "DataSource": "postgres://mmuser@db/mm"}, "ClusterSettings": {"Enable": true}}`, "postgres advisory lock"},
	} {
		os.WriteFile(filepath.Join(dir, "config", "config.json"), []byte(tt.cfg), 0o600)
		l, err := NewRestartLock(ClusterConfig{Mode: "auto"}, o, []string{dir}, nil, nil)
		got := ""
		if l != nil {
			got = l.String()
		}
		if err != nil || got != tt.want {
			t.Errorf("auto with %s: %q %v, want %q", tt.cfg, got, err, tt.want)
		}
	}
}
