package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/kardianos/service"
	"github.com/spf13/cobra"

	"github.com/mmtls/mmtls/agent"
	"github.com/mmtls/mmtls/agent/push"
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

On systemd the unit is the one the packages ship (Restart=on-failure, a
TimeoutStopSec that covers a push's restart, verification and rollback, and
hardening that still lets the agent write Mattermost's config directory).
install --dry-run prints that unit and changes nothing. Where systemd is
installed but not running (a container, an image being built), pass
--platform systemd to write the unit anyway.`,
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
			unit, err := renderUnit(binary, config)
			if err != nil {
				return err
			}
			if dryRun {
				_, err := fmt.Fprint(cmd.OutOrStdout(), unit)
				return err
			}
			if err := choosePlatform(platform); err != nil {
				return err
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
			if verb == "status" {
				st, err := svc.Status()
				if err != nil {
					return fmt.Errorf("service status: %w", err)
				}
				_, err = fmt.Fprintln(cmd.OutOrStdout(), map[service.Status]string{
					service.StatusRunning: "running", service.StatusStopped: "stopped"}[st])
				return err
			}
			if err := service.Control(svc, verb); err != nil {
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

// renderUnit renders the systemd unit for binary and config, writable for
// the Mattermost directory the config names (default /opt/mattermost).
func renderUnit(binary, config string) (string, error) {
	mmDir := push.DefaultMattermostDir
	if c, err := agent.LoadConfig(config); err == nil && c.Push.MattermostDir != "" {
		mmDir = c.Push.MattermostDir
	}
	abs, err := filepath.Abs(config)
	if err != nil {
		return "", err
	}
	u, err := packaging.Unit{Binary: binary, Config: abs, MattermostDir: mmDir}.Render()
	if err != nil {
		return "", usageError(err)
	}
	return u, nil
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
