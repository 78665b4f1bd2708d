package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mmtls/mmtls/packaging"
)

func writeConfig(t *testing.T, content string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the config file must be root's: needs root")
	}
	path := filepath.Join(t.TempDir(), "mmtls.toml")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestConfigCheck(t *testing.T) {
	path := writeConfig(t, packaging.ExampleConfig)
	// The example names paths this machine does not have: each is named.
	code, out, stderr := runArgs("config", "check", "--config", path)
	if code != exitUsage || !strings.Contains(stderr, path+": source.cert: \"/etc/letsencrypt/live/chat.example.com/fullchain.pem\": no such file") ||
		!strings.Contains(stderr, "push.mattermost_dir") {
		t.Errorf("config check with missing paths: exit %d: %s", code, stderr)
	}
	// With the paths in place, it passes.
	root := t.TempDir()
	for _, d := range []string{"mm/config", "le"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	for _, f := range []string{"mm/config/config.json", "le/fullchain.pem", "le/privkey.pem"} {
		os.WriteFile(filepath.Join(root, f), []byte("{}"), 0o600)
	}
	good := writeConfig(t, fmt.Sprintf("[source]\ncert = %q\nkey = %q\n[push]\nmattermost_dir = %q\n",
		filepath.Join(root, "le/fullchain.pem"), filepath.Join(root, "le/privkey.pem"), filepath.Join(root, "mm")))
	if code, _, stderr := runArgs("config", "check", "--config", good); code != 0 {
		t.Errorf("config check with every path in place: exit %d: %s", code, stderr)
	}
	for _, want := range []string{`owner = "mattermost"`, `quiet = "5s"`, `mode = "auto"`, `lock_wait = "15m0s"`} {
		if !strings.Contains(out, want) {
			t.Errorf("effective settings lack %s:\n%s", want, out)
		}
	}

	bad := writeConfig(t, strings.Replace(packaging.ExampleConfig, "# quiet = \"5s\"", "quiet = \"soon\"", 1))
	code, _, stderr = runArgs("config", "check", "--config", bad)
	if code != exitUsage || !strings.Contains(stderr, bad+":") || !strings.Contains(stderr, `watch.quiet: "soon" is not a duration`) {
		t.Errorf("bad value: exit %d, %s", code, stderr)
	}
}

// install reads the config first: a missing or invalid one is refused and
// nothing is written; the unit makes the config's own paths writable.
func TestServiceInstallChecksConfig(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "mmtls.toml")
	code, _, stderr := runArgs("service", "install", "--config", missing, "--platform", "systemd", "--binary", "/usr/bin/mmtls")
	if code != exitUsage || !strings.Contains(stderr, missing) {
		t.Errorf("missing config: exit %d: %s", code, stderr)
	}
	if _, err := os.Stat("/etc/systemd/system/mmtls.service"); err == nil {
		t.Log("note: a unit exists on this machine already")
	}
	noSource := writeConfig(t, "[push]\nmattermost_dir = \"/srv/mm\"\n")
	if code, _, stderr := runArgs("service", "install", "--dry-run", "--config", noSource); code != exitUsage || !strings.Contains(stderr, "source.cert") {
		t.Errorf("config without a source: exit %d: %s", code, stderr)
	}
	elsewhere := writeConfig(t, "[source]\ncert = \"/etc/le/c.pem\"\nkey = \"/etc/le/k.pem\"\n[push]\nmattermost_dir = \"/srv/mm\"\nstate_dir = \"/srv/mmtls-state\"\nmm_config = \"/etc/mattermost/config.json\"\n")
	code, out, stderr := runArgs("service", "install", "--dry-run", "--config", elsewhere, "--binary", "/usr/bin/mmtls")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{"ReadWritePaths=-/srv/mm/config\n", "ReadWritePaths=-/etc/mattermost\n", "ReadWritePaths=-/srv/mmtls-state\n",
		"ReadWritePaths=-/etc/systemd/system\n", "Type=notify\n", "RestartPreventExitStatus=2 3\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("unit lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "ReadWritePaths=-/opt/mattermost") {
		t.Errorf("unit names /opt/mattermost for a config that does not:\n%s", out)
	}
}

func TestServiceInstallDryRun(t *testing.T) {
	path := writeConfig(t, packaging.ExampleConfig+"\n")
	code, out, stderr := runArgs("service", "install", "--dry-run", "--config", path, "--binary", "/usr/bin/mmtls")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if !strings.Contains(out, "ExecStart=/usr/bin/mmtls run --config "+path+"\n") || !strings.Contains(out, "ReadWritePaths=-/opt/mattermost/config\n") {
		t.Errorf("unit:\n%s", out)
	}
	if code, _, stderr := runArgs("service", "stop", "--dry-run"); code != exitUsage || !strings.Contains(stderr, "--dry-run goes with install") {
		t.Errorf("stop --dry-run: %d %s", code, stderr)
	}
	if code, _, stderr := runArgs("service", "frobnicate"); code != exitUsage || !strings.Contains(stderr, `unknown action "frobnicate"`) {
		t.Errorf("unknown action: %d %s", code, stderr)
	}
}
