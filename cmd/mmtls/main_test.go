package main

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/mmtls/mmtls/agent/push"
	"github.com/spf13/cobra"
)

func runArgs(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestUsageErrors(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"unknown flag", []string{"push", "--bogus"}, "unknown flag: --bogus (see --help)"},
		{"missing cert", []string{"push", "--key", "k.pem"}, "--cert is required"},
		{"service and restart command", []string{"push", "--cert", "c", "--key", "k", "--service", "mm", "--restart-command", "x"}, "--service and --restart-command are mutually exclusive"},
		{"bad log level", []string{"--log-level", "loud", "version"}, `--log-level "loud": want debug, info, warn or error`},
		{"bad log format", []string{"--log-format", "xml", "version"}, `--log-format "xml": want text or json`},
		{"stray argument", []string{"push", "extra"}, `unknown command "extra"`},
		{"bad duration", []string{"push", "--lock-timeout", "soon"}, `invalid argument "soon" for "--lock-timeout"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, _, stderr := runArgs(tt.args...)
			if code != exitUsage || !strings.Contains(stderr, tt.want) {
				t.Errorf("exit %d, stderr %q; want %d with %q", code, stderr, exitUsage, tt.want)
			}
		})
	}
}

func TestExitCodes(t *testing.T) {
	wrap := func(kind error) error { return fmt.Errorf("context: %w", kind) }
	tests := []struct {
		err  error
		want int
	}{
		{nil, exitOK},
		{errors.New("disk on fire"), exitFailed},
		{wrap(push.ErrUsage), exitUsage},
		{wrap(push.ErrRefused), exitRefused},
		{wrap(push.ErrRolledBack), exitRolledBack},
		{wrap(push.ErrRollbackFailed), exitRollbackFailed},
		{wrap(push.ErrBusy), exitBusy},
	}
	for _, tt := range tests {
		if got := exitCode(tt.err); got != tt.want {
			t.Errorf("exitCode(%v) = %d, want %d", tt.err, got, tt.want)
		}
	}
}

func TestVersion(t *testing.T) {
	code, out, _ := runArgs("version")
	if code != 0 || !strings.HasPrefix(out, "mmtls ") {
		t.Errorf("version: %d %q", code, out)
	}
}

// Every command documents itself: Short, Long and Example.
func TestCommandsAreDocumented(t *testing.T) {
	var walk func(*cobra.Command)
	walk = func(c *cobra.Command) {
		if c.Name() != "help" && c.Name() != "completion" && c.HasParent() {
			if c.Short == "" || c.Long == "" || c.Example == "" {
				t.Errorf("%q lacks Short, Long or Example", c.CommandPath())
			}
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(newRootCmd(&app{}))
}
