package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/kardianos/service"
	"github.com/spf13/cobra"

	"github.com/mmtls/mmtls/agent"
	"github.com/mmtls/mmtls/packaging"
)

const serviceName = "mmtls"

func newServiceCmd(a *app) *cobra.Command {
	var (
		config, binary, platform string
		dryRun                   bool
	)
	cmd := &cobra.Command{
		Use:   "service install|uninstall|start|stop|restart|status",
		Short: "Install and control the mmtls agent as an OS service",
		Long: `service installs the agent as an OS service running "mmtls run --config
FILE", and starts, stops, restarts, uninstalls it or shows its status.

On systemd the unit is the one the packages ship: Type=notify (start
returns once the agent runs, or fails with its reasons), Restart=on-failure
but not for a bad config (exit 2 or 3), a TimeoutStopSec that covers a
push's restart, verification and rollback, and hardening. install reads
--config first and refuses a missing or invalid one; the unit may write
exactly the paths that config names (Mattermost's config directory or
dest_dir, the directory of mm_config, state_dir, the systemd drop-ins).
Where the package already installed the unit, install writes a drop-in for
this config instead of a second unit. install --dry-run prints the unit and
changes nothing. Where systemd is installed but not running (a container,
an image being built), pass --platform systemd to write the unit anyway.`,
		Example: `  mmtls service install --config /etc/mmtls/mmtls.toml --dry-run
  mmtls service install --config /etc/mmtls/mmtls.toml
  mmtls service start
  mmtls service status`,
		Args:      usageArgs(cobra.ExactArgs(1)),
		ValidArgs: []string{"install", "uninstall", "start", "stop", "restart", "status"},
		RunE: func(cmd *cobra.Command, args []string) error {
			verb := args[0]
			switch verb {
			case "install", "uninstall", "start", "stop", "restart", "status":
			default:
				return usageError(fmt.Errorf("unknown action %q: want install, uninstall, start, stop, restart or status", verb))
			}
			if dryRun && verb != "install" {
				return usageError(errors.New("--dry-run goes with install"))
			}
			if binary == "" {
				exe, err := os.Executable()
				if err != nil {
					return err
				}
				binary = exe
			}
			var unit string
			if verb == "install" {
				u, err := renderUnit(binary, config, dryRun)
				if err != nil {
					return err
				}
				unit = u
			}
			if dryRun {
				_, err := fmt.Fprint(cmd.OutOrStdout(), unit)
				return err
			}
			if err := choosePlatform(platform); err != nil {
				return err
			}
			if packaged := packagedUnit(); packaged != "" && (verb == "install" || verb == "uninstall") {
				return packagedInstall(cmd.Context(), a, verb, packaged, binary, config)
			}
			svc, err := service.New(&agent.Program{}, &service.Config{
				Name:        serviceName,
				DisplayName: "mmtls agent",
				Description: "mmtls agent: TLS for Mattermost, renewed, verified, rolled back",
				Executable:  binary,
				Arguments:   []string{"run", "--config", config},
				Option:      service.KeyValue{"SystemdScript": unit},
			})
			if err != nil {
				return fmt.Errorf("service: %w", err)
			}
			if verb == "status" && service.ChosenSystem().String() == "linux-systemd" {
				return serviceStatus(cmd.Context(), cmd.OutOrStdout())
			}
			if verb == "status" {
				st, err := svc.Status()
				if err != nil {
					return fmt.Errorf("service status: the service manager here is %s, not a running systemd, and it says %w: is the service installed?", service.ChosenSystem(), err)
				}
				_, err = fmt.Fprintln(cmd.OutOrStdout(), map[service.Status]string{
					service.StatusRunning: "running", service.StatusStopped: "stopped"}[st])
				return err
			}
			if err := service.Control(svc, verb); err != nil {
				if verb == "start" || verb == "restart" {
					// Type=notify: the start failed because the agent did;
					// say why, in its own words.
					return fmt.Errorf("service %s: %w; the agent's last log lines:\n%s", verb, err, journalTail(cmd.Context()))
				}
				return fmt.Errorf("service %s: %w", verb, err)
			}
			a.log.Info("service "+verb+" done", "platform", service.ChosenSystem().String())
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&config, "config", agent.DefaultConfigFile, "the agent's config file the service runs with")
	f.StringVar(&binary, "binary", "", "the mmtls binary the service runs (default: this one)")
	f.StringVar(&platform, "platform", "auto", "service manager: auto (what runs here) or systemd")
	f.BoolVar(&dryRun, "dry-run", false, "with install: print the systemd unit and change nothing")
	return cmd
}

// renderUnit renders the systemd unit for binary and config. The config is
// read first: a missing or invalid one is refused before anything is
// written, and its paths (Mattermost's config directory or dest_dir, the
// directory of mm_config, state_dir) become the unit's writable paths. A dry
// run without the file renders the generic unit the packages ship.
func renderUnit(binary, config string, dryRun bool) (string, error) {
	abs, err := filepath.Abs(config)
	if err != nil {
		return "", err
	}
	c, err := agent.LoadConfig(config)
	switch {
	case err != nil && dryRun && errors.Is(err, fs.ErrNotExist):
		c = &agent.Config{} // the packaged unit: defaults
	case err != nil:
		return "", usageError(fmt.Errorf("--config: %w; write the agent's config first (see /usr/share/doc or `mmtls config check`)", err))
	case !c.Balance.Enabled():
		if err := c.RequireSource(config); err != nil {
			return "", usageError(err)
		}
	}
	u, err := packaging.Unit{Binary: binary, Config: abs, WritablePaths: c.WritablePaths(nil)}.Render()
	if err != nil {
		return "", usageError(err)
	}
	return u, nil
}

// packagedUnit returns the unit file the .deb or .rpm installed, or "".
func packagedUnit() string {
	for _, d := range []string{"/lib/systemd/system", "/usr/lib/systemd/system"} {
		p := filepath.Join(d, serviceName+".service")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

// installDropIn is the drop-in `service install` writes over a packaged
// unit; the package's purge removes it.
var installDropIn = filepath.Join(packaging.DropInDir, serviceName+".service.d", "50-mmtls-install.conf")

// packagedInstall handles install and uninstall where the package already
// ships the unit: rather than a second unit shadowing it (which a purge
// would leave behind), a drop-in points the packaged unit at this binary
// and config and makes the config's paths writable.
func packagedInstall(ctx context.Context, a *app, verb, packaged, binary, config string) error {
	if verb == "uninstall" {
		if err := os.Remove(installDropIn); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("service uninstall: %w", err)
		}
		a.log.Info("removed the drop-in; the packaged unit is as shipped", "unit", packaged)
		return systemctl(ctx, "daemon-reload")
	}
	c, err := agent.LoadConfig(config)
	if err != nil {
		return usageError(err)
	}
	abs, _ := filepath.Abs(config)
	var b strings.Builder
	b.WriteString("# Written by `mmtls service install`: the packaged unit, run with this\n# config and allowed to write the paths it names.\n[Service]\nExecStart=\n")
	fmt.Fprintf(&b, "ExecStart=%s run --config %s\n", binary, abs)
	for _, p := range c.WritablePaths(nil) {
		fmt.Fprintf(&b, "ReadWritePaths=-%s\n", p)
	}
	if err := os.MkdirAll(filepath.Dir(installDropIn), 0o755); err != nil {
		return fmt.Errorf("service install: %w", err)
	}
	if err := os.WriteFile(installDropIn, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("service install: %w", err)
	}
	a.log.Info("the package's unit is installed already: wrote a drop-in for this config instead of a second unit", "unit", packaged, "drop_in", installDropIn)
	if err := systemctl(ctx, "daemon-reload"); err != nil {
		return err
	}
	return systemctl(ctx, "enable", serviceName+".service")
}

// systemctl runs systemctl with a timeout.
func systemctl(ctx context.Context, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "systemctl", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("systemctl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// journalTail returns the agent unit's last log lines, or why it cannot.
// serviceStatus prints the agent's service state as systemd has it, one
// line, and fails (exit 1) unless it runs: a failed one with its reason and
// its last log lines.
func serviceStatus(ctx context.Context, w io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "systemctl", "show", serviceName+".service", "--property", "LoadState,ActiveState,SubState,Result,ExecMainStatus,ActiveEnterTimestamp").CombinedOutput()
	if err != nil {
		return fmt.Errorf("service status: systemctl show %s.service: %w: %s", serviceName, err, strings.TrimSpace(string(out)))
	}
	p := map[string]string{}
	for _, line := range strings.Split(string(out), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			p[k] = v
		}
	}
	switch {
	case p["LoadState"] == "not-found":
		fmt.Fprintln(w, "not installed")
		return fmt.Errorf("the %s service is not installed (mmtls service install --config FILE, or the .deb/.rpm)", serviceName)
	case p["ActiveState"] == "active" || p["ActiveState"] == "reloading":
		_, err := fmt.Fprintf(w, "%s (%s) since %s\n", p["ActiveState"], p["SubState"], p["ActiveEnterTimestamp"])
		return err
	case p["ActiveState"] == "failed":
		fmt.Fprintf(w, "failed (%s, exit status %s)\n", p["Result"], p["ExecMainStatus"])
		return fmt.Errorf("the %s service failed (%s, exit status %s); its last log lines:\n%s", serviceName, p["Result"], p["ExecMainStatus"], journalTail(ctx))
	}
	fmt.Fprintf(w, "%s (%s)\n", p["ActiveState"], p["SubState"])
	return fmt.Errorf("the %s service is not running (%s); mmtls service start", serviceName, p["ActiveState"])
}

func journalTail(ctx context.Context) string {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "journalctl", "-u", serviceName+".service", "-n", "15", "--no-pager", "-o", "cat").CombinedOutput()
	if err != nil {
		return fmt.Sprintf("(journalctl: %v)", err)
	}
	return strings.TrimSpace(string(out))
}

// choosePlatform selects kardianos's systemd support explicitly when asked:
// without a running systemd it would pick SysV.
func choosePlatform(p string) error {
	switch p {
	case "auto":
		return nil
	case "systemd":
		for _, s := range service.AvailableSystems() {
			if s.String() == "linux-systemd" {
				service.ChooseSystem(s)
				return nil
			}
		}
		return errors.New("--platform systemd: not available on this system")
	}
	return usageError(fmt.Errorf("--platform %q: want auto or systemd", p))
}
