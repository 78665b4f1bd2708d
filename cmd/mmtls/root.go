package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/mmtls/mmtls/agent/balance"
	"github.com/mmtls/mmtls/agent/push"
	"github.com/spf13/cobra"
)

// Exit codes. They are part of mmtls's interface: scripts and the service
// manager branch on them.
const (
	exitOK             = 0 // done, or nothing to do
	exitFailed         = 1 // an unexpected failure; see the message
	exitUsage          = 2 // bad flags or arguments; nothing was touched
	exitRefused        = 3 // input refused (pair, config, environment); nothing was changed
	exitRolledBack     = 4 // the new state failed verification and the old one was put back
	exitRollbackFailed = 5 // rollback failed too; the message says what is on disk
	exitBusy           = 6 // another mmtls run held the lock past --lock-timeout
)

const exitCodeHelp = `Exit codes:
  0  done, or nothing to do
  1  unexpected failure
  2  usage error; nothing was touched
  3  input refused; nothing was changed
  4  rolled back: the new state failed verification, the previous one is in force
  5  rollback failed: the message says what is on disk now
  6  busy: another mmtls run held the lock past --lock-timeout`

// app holds what every command shares. It is built per run, never global.
type app struct {
	logFormat string
	logLevel  string
	log       *slog.Logger
}

func run(args []string, stdout, stderr io.Writer) int {
	// SIGINT or SIGTERM cancels the run's context: a push in flight stops
	// waiting and rolls back (the rollback has its own deadline).
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	a := &app{}
	root := newRootCmd(a)
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return exitOK
	}
	code := exitCode(err)
	if a.log != nil && strings.EqualFold(a.logFormat, "json") {
		a.log.Error("mmtls failed", "error", err.Error(), "exit_code", code)
	} else {
		fmt.Fprintf(stderr, "mmtls: %v\n", err)
	}
	return code
}

func exitCode(err error) int {
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, push.ErrUsage), errors.Is(err, balance.ErrInvalid):
		return exitUsage
	case errors.Is(err, push.ErrRefused):
		return exitRefused
	case errors.Is(err, push.ErrRollbackFailed):
		return exitRollbackFailed
	case errors.Is(err, push.ErrRolledBack):
		return exitRolledBack
	case errors.Is(err, push.ErrBusy):
		return exitBusy
	}
	return exitFailed
}

// usageErr is a usage error found by the command layer itself.
type usageErr struct{ err error }

func (e usageErr) Error() string        { return e.err.Error() + " (see --help)" }
func (e usageErr) Unwrap() error        { return e.err }
func (e usageErr) Is(target error) bool { return target == push.ErrUsage }

// usageError marks err as a usage error: exit code 2.
func usageError(err error) error { return usageErr{err} }

// usageArgs makes an argument check's errors usage errors.
func usageArgs(check cobra.PositionalArgs) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if err := check(cmd, args); err != nil {
			return usageError(err)
		}
		return nil
	}
}

func newRootCmd(a *app) *cobra.Command {
	root := &cobra.Command{
		Use:   "mmtls",
		Short: "TLS for Mattermost app servers, installed, checked and rolled back by one command",
		Long: `mmtls installs a TLS certificate on a Mattermost app server so that
single sign-on through Office 365 / Entra ID (which needs an https SiteURL)
works without a TLS-terminating proxy. It validates the pair, installs it
symlink-safely, edits only the config keys it owns, and checks its work.

Logs go to stderr; --json results go to stdout.

` + exitCodeHelp,
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       versionString(),
		Args:          usageArgs(cobra.NoArgs),
		RunE:          func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(cmd.ErrOrStderr(), a.logFormat, a.logLevel)
			if err != nil {
				return err
			}
			a.log = log
			return nil
		},
	}
	root.PersistentFlags().StringVar(&a.logFormat, "log-format", "text", "log format: text or json")
	root.PersistentFlags().StringVar(&a.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError(err) })
	root.AddCommand(newPushCmd(a), newRestoreCmd(a), newDoctorCmd(a), newPublishCmd(a), newClusterCmd(a), newWatchCmd(a), newRunCmd(a), newServiceCmd(a), newBalanceCmd(a), newConfigCmd(), newVersionCmd())
	return root
}

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, usageError(fmt.Errorf("--log-level %q: want debug, info, warn or error", level))
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch strings.ToLower(format) {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, usageError(fmt.Errorf("--log-format %q: want text or json", format))
}
