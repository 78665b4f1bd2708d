package push

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// ServiceManager restarts Mattermost. Implementations must return only
// once the restart command has finished (not once Mattermost is ready:
// that is the Verifier's job), and must honour ctx.
type ServiceManager interface {
	Restart(ctx context.Context) error
	// String names the manager in logs and messages.
	String() string
}

// Systemd restarts a systemd unit with systemctl.
type Systemd struct {
	Unit    string        // such as "mattermost"
	Timeout time.Duration // per systemctl call; 0 means DefaultRestartTimeout
	Logger  *slog.Logger  // nil discards
}

func (s *Systemd) String() string { return "systemctl restart " + s.Unit }

// Restart runs `systemctl reset-failed` first when the unit has failed (a
// crash loop under Restart=always ends in start-limit-hit, which refuses
// further starts), then `systemctl restart`.
func (s *Systemd) Restart(ctx context.Context) error {
	timeout := orDefault(s.Timeout, DefaultRestartTimeout)
	out, err := runCommand(ctx, timeout, DefaultWaitDelay, "systemctl", "show", "--property=ActiveState,Result", "--", s.Unit)
	if err != nil {
		return fmt.Errorf("systemctl show %s: %w", s.Unit, err)
	}
	if strings.Contains(out, "ActiveState=failed") || strings.Contains(out, "Result=start-limit-hit") {
		logger(s.Logger).Info("clearing the unit's failed state before restarting", "unit", s.Unit, "state", strings.Fields(out))
		if _, err := runCommand(ctx, timeout, DefaultWaitDelay, "systemctl", "reset-failed", "--", s.Unit); err != nil {
			return fmt.Errorf("systemctl reset-failed %s: %w", s.Unit, err)
		}
	}
	if _, err := runCommand(ctx, timeout, DefaultWaitDelay, "systemctl", "restart", "--", s.Unit); err != nil {
		return fmt.Errorf("systemctl restart %s: %w", s.Unit, err)
	}
	return nil
}

// daemonReloadTimeout bounds systemctl daemon-reload, which re-reads every
// unit: seconds on a busy host, never minutes.
const daemonReloadTimeout = 30 * time.Second

// SystemctlDaemonReload makes systemd re-read unit files and drop-ins.
func SystemctlDaemonReload(ctx context.Context) error {
	if _, err := runCommand(ctx, daemonReloadTimeout, DefaultWaitDelay, "systemctl", "daemon-reload"); err != nil {
		return fmt.Errorf("systemctl daemon-reload: %w", err)
	}
	return nil
}

// ShellCommand restarts Mattermost with an administrator's command line,
// run by /bin/sh -c as certbot and acme.sh run their hooks.
type ShellCommand struct {
	Line      string
	Timeout   time.Duration // 0 means DefaultRestartTimeout
	WaitDelay time.Duration // 0 means DefaultWaitDelay
}

func (c *ShellCommand) String() string { return c.Line }

// Restart runs the command and waits for it.
func (c *ShellCommand) Restart(ctx context.Context) error {
	if _, err := runCommand(ctx, orDefault(c.Timeout, DefaultRestartTimeout), orDefault(c.WaitDelay, DefaultWaitDelay), "/bin/sh", "-c", c.Line); err != nil {
		return fmt.Errorf("restart command %q: %w", c.Line, err)
	}
	return nil
}

// DefaultWaitDelay is how long a command's output is still read after it
// was cancelled, or after it exited while a child it left behind (systemctl's
// agents, a daemon started by a restart script) still holds the pipe.
// Long enough for a SIGTERMed group to print why it stopped.
const DefaultWaitDelay = 5 * time.Second

// maxOutput is how much of a command's output is kept for its error.
const maxOutput = 4 << 10

// runCommand runs name with args in its own process group, with a timeout,
// and returns its combined output. On timeout the whole group gets SIGTERM,
// then SIGKILL. A failure's error carries the tail of the output.
func runCommand(ctx context.Context, timeout, waitDelay time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var out tailBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }
	cmd.WaitDelay = waitDelay
	err := cmd.Run()
	if cmd.Process != nil && ctx.Err() != nil {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	text := strings.TrimSpace(out.String())
	switch {
	case ctx.Err() == context.DeadlineExceeded:
		err = fmt.Errorf("timed out after %s", timeout)
	case errors.Is(err, exec.ErrWaitDelay):
		err = nil // it finished; a background child kept the pipe
	}
	if err != nil {
		if text != "" {
			return text, fmt.Errorf("%w; output: %s", err, text)
		}
		return text, err
	}
	return text, nil
}

// tailBuffer keeps the last maxOutput bytes written to it.
type tailBuffer struct{ b bytes.Buffer }

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.b.Write(p)
	if over := t.b.Len() - maxOutput; over > 0 {
		t.b.Next(over)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string { return t.b.String() }

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

func logger(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}
