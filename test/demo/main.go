// Command demo shows mmtls's main job on a throwaway tree, on a machine
// where no Mattermost is installed: run it as root with `go run ./test/demo`.
//
// It builds mmtls and a stand-in Mattermost (which loads its config and
// serves TLS as Mattermost does), lays out /opt/mattermost under a temp
// directory, makes a CA and certificates, and runs mmtls push as an
// administrator would: a dry run, the first push (plain HTTP to verified
// TLS), a repeat that does nothing, a renewal, a refused bad pair, and a
// push whose verification fails and is rolled back. It removes everything
// it created, the demo user included.
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/mmtls/mmtls/test/fixture"
	"github.com/mmtls/mmtls/test/pki"
)

const demoUser = "mmtls-demo"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("run me as root: mmtls installs files owned by the user Mattermost runs as")
	}
	_, lookupErr := user.Lookup(demoUser)
	uid, gid, err := fixture.EnsureUser(ctx, demoUser)
	if err != nil {
		return err
	}
	if lookupErr != nil {
		defer func() {
			out, uerr := exec.Command("userdel", demoUser).CombinedOutput()
			if uerr != nil {
				err = errors.Join(err, fmt.Errorf("userdel %s: %w: %s", demoUser, uerr, out))
			}
		}()
	}
	root, err := os.MkdirTemp("", "mmtls-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(root)
	if err := os.Chmod(root, 0o755); err != nil {
		return err
	}
	d := &demo{root: root}

	d.say("Building mmtls and the stand-in Mattermost")
	mod, err := fixture.ModuleDir()
	if err != nil {
		return err
	}
	binDir := filepath.Join(root, "bin")
	os.Mkdir(binDir, 0o755)
	d.mmtls, d.standin, err = fixture.Build(ctx, mod, binDir)
	if err != nil {
		return err
	}
	plain, err := fixture.PickPort()
	if err != nil {
		return err
	}
	tree, err := fixture.NewTree(root, demoUser, uid, gid, plain, "https://"+fixture.SiteHost)
	if err != nil {
		return err
	}
	d.tree = tree
	now := time.Now()
	p1, err := fixture.WritePair(filepath.Join(root, "etc/letsencrypt/live", fixture.SiteHost), now)
	if err != nil {
		return err
	}
	p2, err := fixture.WritePair(filepath.Join(root, "renewed"), now)
	if err != nil {
		return err
	}
	roots := filepath.Join(root, "etc/ssl/demo-roots.pem")
	os.MkdirAll(filepath.Dir(roots), 0o755)
	if err := fixture.Roots(roots, p1, p2); err != nil {
		return err
	}
	d.say("A Mattermost node under $DEMO/opt/mattermost, running as %q, plain HTTP on %s", demoUser, plain)
	if err := tree.RunCtl(ctx, d.standin, "start"); err != nil {
		return err
	}
	defer tree.RunCtl(context.Background(), d.standin, "stop")
	tlsAddr, err := fixture.PickPort()
	if err != nil {
		return err
	}
	base := func(p *fixture.Pair, extra ...string) []string {
		args := []string{"push", "--cert", p.CertFile, "--key", p.KeyFile, "--mattermost-dir", tree.MattermostDir,
			"--owner", demoUser, "--state-dir", tree.StateDir, "--ca-file", roots, "--listen", tlsAddr,
			"--restart-command", tree.StandinCtl(d.standin, "restart"), "--log-level", "warn"}
		return append(args, extra...)
	}

	d.say("1. What would change? (--dry-run changes nothing)")
	if err := d.mmtlsRun(ctx, 0, base(p1, "--dry-run")...); err != nil {
		return err
	}
	d.say("2. The first push: install, edit config.json, restart, verify TLS 1.2/1.3 and /api/v4/system/ping")
	if err := d.mmtlsRun(ctx, 0, base(p1)...); err != nil {
		return err
	}
	d.shell(ctx, "ls -l "+tree.ConfigDir)
	d.say("3. The same push again: nothing to do, no restart")
	if err := d.mmtlsRun(ctx, 0, base(p1)...); err != nil {
		return err
	}
	d.say("4. A renewal: the new pair is rotated in and verified")
	if err := d.mmtlsRun(ctx, 0, base(p2)...); err != nil {
		return err
	}
	d.say("5. A key that does not match: refused (exit 3), the current certificate keeps serving")
	other, err := pki.NewChain(pki.Leaf{DNSNames: []string{fixture.SiteHost}}, now)
	if err != nil {
		return err
	}
	wrongKey := filepath.Join(root, "privekey.pem")
	os.WriteFile(wrongKey, other.Leaf.KeyPEM, 0o600)
	if err := d.mmtlsRun(ctx, 3, base(&fixture.Pair{CertFile: p1.CertFile, KeyFile: wrongKey})...); err != nil {
		return err
	}
	d.say("6. A push whose verification fails (its new port is held by something that never answers): rolled back (exit 4)")
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer held.Close()
	args := base(p1, "--verify-timeout", "5s")
	for i, a := range args {
		if a == tlsAddr {
			args[i] = held.Addr().String()
		}
	}
	if err := d.mmtlsRun(ctx, 4, args...); err != nil {
		return err
	}
	d.say("7. The renewed pair is what Mattermost serves again: pushing it finds nothing to do")
	if err := d.mmtlsRun(ctx, 0, base(p2)...); err != nil {
		return err
	}
	d.say("Done. Removing $DEMO and the demo user.")
	return nil
}

type demo struct {
	root, mmtls, standin string
	tree                 *fixture.Tree
}

func (d *demo) short(s string) string {
	return strings.ReplaceAll(s, d.root, "$DEMO")
}

func (d *demo) say(format string, args ...any) {
	fmt.Printf("\n==> %s\n", d.short(fmt.Sprintf(format, args...)))
}

// mmtlsRun runs mmtls as an administrator would, shows its output and
// checks its exit code.
func (d *demo) mmtlsRun(ctx context.Context, wantCode int, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	fmt.Printf("$ mmtls %s\n", d.short(strings.Join(args, " ")))
	cmd := exec.CommandContext(ctx, d.mmtls, args...)
	out, err := cmd.CombinedOutput()
	fmt.Print(indent(d.short(string(out))))
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		return err
	}
	fmt.Printf("  (exit %d)\n", code)
	if code != wantCode {
		return fmt.Errorf("mmtls exited %d, want %d", code, wantCode)
	}
	return nil
}

func (d *demo) shell(ctx context.Context, line string) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	fmt.Printf("$ %s\n", d.short(strings.ReplaceAll(line, d.mmtls, "mmtls")))
	out, _ := exec.CommandContext(ctx, "/bin/sh", "-c", line).CombinedOutput()
	fmt.Print(indent(d.short(string(out))))
}

func indent(s string) string {
	if s == "" {
		return ""
	}
	return "  " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n  ") + "\n"
}
