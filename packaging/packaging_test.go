package packaging

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/mmtls/mmtls/agent"
)

func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is not installed; .ci/run installs it", name)
		}
		t.Skipf("%s is not installed", name)
	}
	return p
}

func TestUnitRenders(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	unit, err := Unit{Binary: exe, Config: "/etc/mmtls/mmtls.toml", WritablePaths: []string{"/srv/mattermost/config"}}.Render()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"ExecStart=" + exe + " run --config /etc/mmtls/mmtls.toml\n",
		"Restart=on-failure\n", "RestartSec=5s\n", "TimeoutStopSec=12min\n",
		"After=network-online.target\n", "ReadWritePaths=-/srv/mattermost/config\n", "Type=notify\n", "RestartPreventExitStatus=2 3\n", "StateDirectory=mmtls\n", "RuntimeDirectory=mmtls\n", " CAP_NET_BIND_SERVICE\n",
	} {
		if !strings.Contains(unit, want) {
			t.Errorf("unit lacks %q:\n%s", want, unit)
		}
	}
	// TimeoutStopSec must cover the agent's own stop deadline.
	if agent.DefaultStopTimeout >= 12*time.Minute {
		t.Errorf("TimeoutStopSec=12min does not cover agent.DefaultStopTimeout %s", agent.DefaultStopTimeout)
	}
	if _, err := (Unit{Binary: "mmtls", Config: "/etc/mmtls/mmtls.toml", WritablePaths: []string{"/opt/mattermost/config"}}).Render(); err == nil {
		t.Error("relative binary accepted")
	}

	analyze := needTool(t, "systemd-analyze")
	path := filepath.Join(t.TempDir(), "mmtls.service")
	if err := os.WriteFile(path, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, analyze, "verify", path).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// The example config parses, and with every commented default uncommented
// it still parses and mentions every key the agent knows.
func TestExampleConfigDocumentsEveryKey(t *testing.T) {
	if _, err := agent.ParseConfig("mmtls.toml", []byte(ExampleConfig)); err != nil {
		t.Fatalf("example config: %v", err)
	}
	uncommented := regexp.MustCompile(`(?m)^# ([a-z_]+ = )`).ReplaceAllString(ExampleConfig, "$1")
	if _, err := agent.ParseConfig("mmtls.toml (uncommented)", []byte(uncommented)); err != nil {
		t.Fatalf("example config with the defaults uncommented: %v", err)
	}
	var missing []string
	walkKeys(reflect.TypeOf(agent.Config{}), "", func(key string) {
		table, name, _ := strings.Cut(key, ".")
		if !regexp.MustCompile(`(?m)^` + name + ` = `).MatchString(section(uncommented, table)) {
			missing = append(missing, key)
		}
	})
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("example config does not document: %v", missing)
	}
}

func section(doc, table string) string {
	i := strings.Index(doc, "["+table+"]")
	if i < 0 {
		return ""
	}
	rest := doc[i+len(table)+2:]
	if j := strings.Index(rest, "\n["); j >= 0 {
		rest = rest[:j]
	}
	return rest
}

func walkKeys(t reflect.Type, prefix string, f func(string)) {
	for i := range t.NumField() {
		fld := t.Field(i)
		tag := strings.Split(fld.Tag.Get("toml"), ",")[0]
		if tag == "" || tag == "-" {
			continue
		}
		if fld.Type.Kind() == reflect.Struct {
			walkKeys(fld.Type, prefix+tag+".", f)
			continue
		}
		f(prefix + tag)
	}
}

// The packages build, hold the binary, the unit and the config (as a
// conffile), and their scripts start nothing.
func TestPackages(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: not building packages")
	}
	dpkgDeb := needTool(t, "dpkg-deb")
	rpm := needTool(t, "rpm")
	out := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "build.sh", out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build.sh: %v\n%s", err, b)
	}
	debs, _ := filepath.Glob(filepath.Join(out, "*.deb"))
	rpms, _ := filepath.Glob(filepath.Join(out, "*.rpm"))
	if len(debs) != 1 || len(rpms) != 1 {
		t.Fatalf("packages built: %v %v", debs, rpms)
	}
	run := func(name string, args ...string) string {
		b, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, b)
		}
		return string(b)
	}
	contents := run(dpkgDeb, "-c", debs[0])
	for _, want := range []string{"-rwxr-xr-x root/root", "./usr/bin/mmtls", "./lib/systemd/system/mmtls.service", "-rw------- root/root", "./etc/mmtls/mmtls.toml", "drwx------ root/root",
		"./usr/share/mmtls/monitoring/mmtls-alerts.yml", "./usr/share/mmtls/monitoring/mmtls-dashboard.json"} {
		if !strings.Contains(contents, want) {
			t.Errorf("deb contents lack %q:\n%s", want, contents)
		}
	}
	info := run(dpkgDeb, "-I", debs[0])
	if !strings.Contains(info, "Package: mmtls") || !strings.Contains(info, "conffiles") {
		t.Errorf("deb info:\n%s", info)
	}
	if conf := run(dpkgDeb, "--ctrl-tarfile", debs[0]); conf == "" {
		t.Error("no control archive")
	}
	list := run(rpm, "-qlp", rpms[0])
	for _, want := range []string{"/usr/bin/mmtls", "/lib/systemd/system/mmtls.service", "/etc/mmtls/mmtls.toml", "/var/lib/mmtls", "/usr/share/mmtls/monitoring/mmtls-alerts.yml"} {
		if !strings.Contains(list, want) {
			t.Errorf("rpm file list lacks %s:\n%s", want, list)
		}
	}
	configs := run(rpm, "-qcp", rpms[0])
	if strings.TrimSpace(configs) != "/etc/mmtls/mmtls.toml" {
		t.Errorf("rpm config files = %q", configs)
	}
	scripts := run(rpm, "-qp", "--scripts", rpms[0])
	for _, bad := range []string{"systemctl start", "systemctl restart", "enable --now mmtls.service >/dev/null 2>&1 || true\n\t;;\nesac\nexit 0\npostinstall"} {
		if strings.Contains(scripts, bad) {
			t.Errorf("package scripts contain %q:\n%s", bad, scripts)
		}
	}
}

// Purge removes the state directory (backups of earlier keys); a plain
// remove keeps it. The script is run with the directory moved to a
// scratch place.
func TestPostremovePurgesState(t *testing.T) {
	script, err := os.ReadFile("scripts/postremove.sh")
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		arg  string
		kept bool
	}{{"remove", true}, {"upgrade", true}, {"purge", false}} {
		state := filepath.Join(t.TempDir(), "mmtls")
		if err := os.MkdirAll(filepath.Join(state, "backups"), 0o700); err != nil {
			t.Fatal(err)
		}
		body := strings.ReplaceAll(string(script), "/var/lib/mmtls", state)
		body = strings.ReplaceAll(body, "/run/systemd/system", filepath.Join(state, "no-systemd"))
		if out, err := exec.Command("sh", "-c", body, "postremove", tt.arg).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v %s", tt.arg, err, out)
		}
		if _, err := os.Stat(state); (err == nil) != tt.kept {
			t.Errorf("postremove %s: state kept = %v, want %v", tt.arg, err == nil, tt.kept)
		}
	}
}
