package test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mmtls/mmtls/test/fixture"
	"github.com/mmtls/mmtls/test/systemdlab"
)

// Paths inside the lab. The agent's unit has PrivateTmp=, so nothing it
// reads may sit under /tmp: host directories are bound elsewhere.
const (
	labBin  = "/opt/mmtls-test/bin" // mmtls and the stand-in
	labTree = "/srv/mmtls-lab-tree" // the test's tree
)

// bootLab boots a systemd lab for t with the test binaries at labBin,
// skipping where no lab can boot (failing under CI, which must run these).
func bootLab(t *testing.T, o systemdlab.Options) *systemdlab.Lab {
	t.Helper()
	if err := systemdlab.Available(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	o.Binds = append(o.Binds, filepath.Dir(mmtlsBin)+":"+labBin)
	lab, err := systemdlab.Boot(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("systemd lab booted in %s", lab.BootTime.Round(time.Millisecond))
	t.Cleanup(func() {
		if t.Failed() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			out, _ := lab.Run(ctx, "journalctl", "--no-pager", "-n", "80", "-o", "short-monotonic")
			cancel()
			t.Logf("lab journal (tail):\n%s", out)
		}
		if err := lab.Close(); err != nil {
			t.Errorf("lab teardown: %v", err)
		}
	})
	return lab
}

// labRun runs a command in the lab that must succeed.
func labRun(t *testing.T, lab *systemdlab.Lab, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := lab.Run(ctx, name, args...)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return out
}

// The agent's own unit, as `mmtls service install` writes it: a missing
// config is refused before anything is written; a config with Mattermost
// elsewhere than /opt/mattermost starts (Type=notify: start returns once it
// runs); a broken config fails `service start` with the agent's own words,
// and is not restarted in a loop.
func TestAgentServiceUnderSystemd(t *testing.T) {
	src := t.TempDir()
	os.Chmod(src, 0o755)
	pair, err := fixture.WritePair(src, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if err := fixture.Roots(filepath.Join(src, "roots.pem"), pair); err != nil {
		t.Fatal(err)
	}
	lab := bootLab(t, systemdlab.Options{Binds: []string{src + ":/srv/src"}})
	mmtls := labBin + "/mmtls"
	ctx := context.Background()

	out, err := lab.Run(ctx, mmtls, "service", "install", "--config", "/etc/mmtls/missing.toml")
	if err == nil || !strings.Contains(out, "missing.toml") {
		t.Errorf("install with a missing config: %v\n%s", err, out)
	}
	if _, err := lab.Run(ctx, "test", "-e", "/etc/systemd/system/mmtls.service"); err == nil {
		t.Fatal("a unit was written for a missing config")
	}

	// Mattermost elsewhere than /opt/mattermost; nothing answers there, so
	// the push installs, fails verification and rolls back: what matters
	// is that the hardened unit lets it write there.
	labRun(t, lab, "sh", "-c", `mkdir -p /srv/mm/config && echo '{"ServiceSettings": {"SiteURL": "https://`+fixture.SiteHost+`", "ListenAddress": "127.0.0.1:1"}}' > /srv/mm/config/config.json`)
	conf := fmt.Sprintf("[source]\ncert = \"/srv/src/%s\"\nkey = \"/srv/src/%s\"\n\n", filepath.Base(pair.CertFile), filepath.Base(pair.KeyFile)) +
		"[push]\nmattermost_dir = \"/srv/mm\"\nca_file = \"/srv/src/roots.pem\"\nlisten = \"127.0.0.1:1\"\nrestart_command = \"true\"\nverify_timeout = \"1s\"\n\n[cluster]\nmode = \"off\"\n"
	labRun(t, lab, "sh", "-c", "mkdir -p /etc/mmtls && printf '%s' \"$1\" > /etc/mmtls/mmtls.toml && chmod 600 /etc/mmtls/mmtls.toml", "sh", conf)
	labRun(t, lab, mmtls, "service", "install", "--config", "/etc/mmtls/mmtls.toml")
	unit := labRun(t, lab, "cat", "/etc/systemd/system/mmtls.service")
	if !strings.Contains(unit, "ReadWritePaths=-/srv/mm/config\n") || strings.Contains(unit, "ReadWritePaths=-/opt/mattermost") {
		t.Errorf("unit for /srv/mm:\n%s", unit)
	}
	start := time.Now()
	labRun(t, lab, mmtls, "service", "start")
	t.Logf("service start returned after %s", time.Since(start).Round(time.Millisecond))
	if st := labRun(t, lab, "systemctl", "is-active", "mmtls"); strings.TrimSpace(st) != "active" {
		t.Fatalf("after start: %s", st)
	}
	if st := labRun(t, lab, mmtls, "service", "status"); !strings.HasPrefix(st, "active (running) since ") {
		t.Errorf("service status after start: %q", st)
	}
	waitFor(t, time.Minute, func() error {
		j := labRun(t, lab, "journalctl", "-u", "mmtls", "--no-pager", "-o", "cat")
		if !strings.Contains(j, "installed certificate and key") || !strings.Contains(j, "rolled back") {
			return fmt.Errorf("the agent has not installed and rolled back yet:\n%s", j)
		}
		return nil
	})

	// Break the config: start must fail and say why; no restart loop.
	labRun(t, lab, "sh", "-c", "echo 'quiet = \"soon\"' >> /etc/mmtls/mmtls.toml")
	out, err = lab.Run(ctx, mmtls, "service", "restart")
	if err == nil || !strings.Contains(out, "unknown key") && !strings.Contains(out, "quiet") {
		t.Errorf("restart with a broken config: %v\n%s", err, out)
	}
	show := labRun(t, lab, "systemctl", "show", "mmtls", "-p", "ActiveState,NRestarts,ExecMainStatus")
	if !strings.Contains(show, "ActiveState=failed") || !strings.Contains(show, "NRestarts=0") || !strings.Contains(show, "ExecMainStatus=2") {
		t.Errorf("after a failed start: %s", show)
	}
	out, err = lab.Run(ctx, mmtls, "service", "status")
	if err == nil || !strings.Contains(out, "failed (exit-code, exit status 2)") || !strings.Contains(out, "quiet") {
		t.Errorf("service status after a failed start: %v\n%s", err, out)
	}
}

// Mattermost 6.7.2 under the unit from its documentation (Type=notify,
// User=mattermost, WorkingDirectory=/opt/mattermost, Restart=always), and
// the agent from the .deb under its packaged, hardened unit, with the
// default restart path: from plain HTTP to TLS on :443 through the
// AmbientCapabilities drop-in and systemctl, a certbot-style renewal, a
// push whose verification fails rolled back through systemctl; then
// `service install` over the package, remove and purge.
func TestRealMattermostUnderSystemd(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: skipping the real Mattermost server")
	}
	deb := buildDeb(t)
	tree, listen := newRealTree(t)
	n := &node{t: t, tree: tree, listen: listen}
	ps, roots := n.pairs(3)
	srv, err := fixture.MattermostServer(context.Background(), t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	lab := bootLab(t, systemdlab.Options{HostNetwork: true, Binds: []string{
		tree.Root + ":" + labTree, tree.MattermostDir + ":/opt/mattermost", filepath.Dir(srv), filepath.Dir(deb) + ":/opt/mmtls-test/dist"}})
	in := func(p string) string { return labTree + strings.TrimPrefix(p, tree.Root) }
	const mmtls = "/usr/bin/mmtls" // from the package

	// The unit from Mattermost's documentation.
	startMattermostUnit(t, lab, "")
	waitForReal(t, n, listen)

	// The source pair, where certbot keeps it, and the agent's config.
	src := filepath.Join(tree.Root, "etc", "letsencrypt", "live", fixture.SiteHost)
	install := func(p *fixture.Pair) {
		t.Helper()
		for from, to := range map[string]string{p.CertFile: "fullchain.pem", p.KeyFile: "privkey.pem"} {
			data, err := os.ReadFile(from)
			if err != nil {
				t.Fatal(err)
			}
			tmp := filepath.Join(src, "."+to)
			if err := os.WriteFile(tmp, data, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, filepath.Join(src, to)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := os.MkdirAll(src, 0o700); err != nil {
		t.Fatal(err)
	}
	install(ps[0])
	conf := fmt.Sprintf("[source]\ncert = %q\nkey = %q\n\n[push]\nca_file = %q\nverify_timeout = \"3m\"\n\n[watch]\nquiet = \"500ms\"\nmax_wait = \"5s\"\n\n[cluster]\nmode = \"off\"\n",
		in(filepath.Join(src, "fullchain.pem")), in(filepath.Join(src, "privkey.pem")), in(roots))
	labRun(t, lab, "dpkg", "-i", "/opt/mmtls-test/dist/"+filepath.Base(deb))
	if st, _ := lab.Run(context.Background(), "systemctl", "is-enabled", "mmtls"); strings.TrimSpace(st) != "disabled" {
		t.Errorf("after dpkg -i the unit is %q, want disabled until configured", st)
	}
	labRun(t, lab, "sh", "-c", "printf '%s' \"$1\" > /etc/mmtls/mmtls.toml", "sh", conf)
	start := time.Now()
	labRun(t, lab, "systemctl", "enable", "--now", "mmtls")

	const tlsAddr = "127.0.0.1:443"
	waitServing := func(p *fixture.Pair) {
		t.Helper()
		want := fingerprint(p)
		waitFor(t, 4*time.Minute, func() error {
			got, err := served(tlsAddr)
			if err != nil {
				return err
			}
			if got != want {
				return fmt.Errorf("serves %s, want %s", got, want)
			}
			return nil
		})
	}
	waitServing(ps[0])
	t.Logf("plain HTTP to TLS on :443 by the agent's service: %s", time.Since(start).Round(time.Millisecond))
	dropIn := labRun(t, lab, "cat", "/etc/systemd/system/mattermost.service.d/10-mmtls-bind.conf")
	if !strings.Contains(dropIn, "AmbientCapabilities=CAP_NET_BIND_SERVICE") {
		t.Errorf("bind drop-in:\n%s", dropIn)
	}
	if st := labRun(t, lab, "systemctl", "show", "mattermost", "-p", "User,ActiveState"); !strings.Contains(st, "User=mattermost") || !strings.Contains(st, "ActiveState=active") {
		t.Errorf("mattermost unit: %s", st)
	}

	t.Run("renewal", func(t *testing.T) {
		start := time.Now()
		install(ps[1])
		waitServing(ps[1])
		t.Logf("renewal through the agent: %s", time.Since(start).Round(time.Millisecond))
	})
	t.Run("failed verification rolled back through systemctl", func(t *testing.T) {
		// An unreadable key (owned by root): 6.7.2 keeps the port and hangs.
		out, err := lab.Run(context.Background(), mmtls, "push", "--cert", in(ps[2].CertFile), "--key", in(ps[2].KeyFile),
			"--ca-file", in(roots), "--owner", "root", "--verify-timeout", "20s", "--lock-timeout", "2m")
		if err == nil || !strings.Contains(out, "rolled back") {
			t.Fatalf("push with an unreadable key: %v\n%s", err, out)
		}
		waitServing(ps[1])
	})
	if show := labRun(t, lab, "systemctl", "show", "mmtls", "-p", "ActiveState,NRestarts"); !strings.Contains(show, "ActiveState=active") || !strings.Contains(show, "NRestarts=0") {
		t.Errorf("the agent's unit: %s", show)
	}

	t.Run("service install over the package writes a drop-in", func(t *testing.T) {
		labRun(t, lab, mmtls, "service", "install", "--config", "/etc/mmtls/mmtls.toml")
		if _, err := lab.Run(context.Background(), "test", "-e", "/etc/systemd/system/mmtls.service"); err == nil {
			t.Error("a second unit shadows the package's")
		}
		dropIn := labRun(t, lab, "cat", "/etc/systemd/system/mmtls.service.d/50-mmtls-install.conf")
		if !strings.Contains(dropIn, "ExecStart=/usr/bin/mmtls run --config /etc/mmtls/mmtls.toml\n") {
			t.Errorf("drop-in:\n%s", dropIn)
		}
		labRun(t, lab, "systemctl", "restart", "mmtls")
	})
	t.Run("remove and purge", func(t *testing.T) {
		labRun(t, lab, "dpkg", "-r", "mmtls")
		if st, _ := lab.Run(context.Background(), "systemctl", "is-active", "mmtls"); strings.TrimSpace(st) == "active" {
			t.Error("the agent still runs after dpkg -r")
		}
		labRun(t, lab, "dpkg", "-P", "mmtls")
		for _, p := range []string{"/etc/systemd/system/mmtls.service.d", "/etc/systemd/system/mmtls.service", "/lib/systemd/system/mmtls.service",
			"/var/lib/mmtls", "/etc/mmtls", "/usr/bin/mmtls"} {
			if _, err := lab.Run(context.Background(), "test", "-e", p); err == nil {
				t.Errorf("%s left after purge", p)
			}
		}
		waitServing(ps[1]) // Mattermost keeps serving what it had
	})
}

// buildDeb builds the .deb once per test binary, with packaging/build.sh.
func buildDeb(t *testing.T) string {
	t.Helper()
	debOnce.Do(func() {
		dir, err := os.MkdirTemp("", "mmtls-dist-")
		if err != nil {
			debErr = err
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "bash", "packaging/build.sh", dir)
		cmd.Dir = ".."
		if out, err := cmd.CombinedOutput(); err != nil {
			debErr = fmt.Errorf("build.sh: %w\n%s", err, out)
			return
		}
		debs, _ := filepath.Glob(filepath.Join(dir, "*.deb"))
		if len(debs) != 1 {
			debErr = fmt.Errorf("build.sh made %v", debs)
			return
		}
		debPath = debs[0]
	})
	if debErr != nil {
		t.Fatal(debErr)
	}
	return debPath
}

var (
	debOnce sync.Once
	debPath string
	debErr  error
)

// startMattermostUnit installs the unit from Mattermost's documentation in
// the lab, with extra lines in [Service], and starts it (Type=notify:
// start returns once Mattermost serves).
func startMattermostUnit(t *testing.T, lab *systemdlab.Lab, extra string) {
	t.Helper()
	unit := "[Unit]\nDescription=Mattermost\nAfter=network.target\n\n[Service]\nType=notify\nExecStart=/opt/mattermost/bin/mattermost\n" + extra +
		"TimeoutStartSec=3600\nKillMode=mixed\nRestart=always\nRestartSec=10\nWorkingDirectory=/opt/mattermost\nUser=mattermost\nGroup=mattermost\nLimitNOFILE=49152\n\n" +
		"[Install]\nWantedBy=multi-user.target\n"
	labRun(t, lab, "sh", "-c", "printf '%s' \"$1\" > /lib/systemd/system/mattermost.service && systemctl daemon-reload && systemctl start mattermost", "sh", unit)
}
