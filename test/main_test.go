// Package test holds mmtls's end-to-end tests: the real mmtls binary against
// real files, real ownership and a stand-in Mattermost (or a real one)
// listening on loopback. They need root, as mmtls does.
package test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/mmtls/mmtls/test/fixture"
)

// Built once for the whole package by TestMain.
var (
	mmtlsBin   string
	standinBin string
	mmUID      int
	mmGID      int
)

const mmUser = "mattermost"

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			fmt.Fprintln(os.Stderr, "end-to-end tests need root; CI runs as root")
			return 1
		}
		fmt.Fprintln(os.Stderr, "skipping end-to-end tests: they need root (chown, a mattermost user)")
		return 0
	}
	ctx := context.Background()
	var err error
	if mmUID, mmGID, err = fixture.EnsureUser(ctx, mmUser); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	dir, err := os.MkdirTemp("", "mmtls-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	mod, err := fixture.ModuleDir()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if mmtlsBin, standinBin, err = fixture.Build(ctx, mod, dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	mmtlsBin, _ = filepath.Abs(mmtlsBin)
	return m.Run()
}
