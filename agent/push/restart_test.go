package push

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"
)

func TestShellCommand(t *testing.T) {
	ctx := context.Background()
	if err := (&ShellCommand{Line: "true"}).Restart(ctx); err != nil {
		t.Errorf("true: %v", err)
	}
	err := (&ShellCommand{Line: "echo the unit is masked >&2; exit 3"}).Restart(ctx)
	want := `restart command "echo the unit is masked >&2; exit 3": exit status 3; output: the unit is masked`
	if err == nil || err.Error() != want {
		t.Errorf("failing command: %v\nwant %s", err, want)
	}
}

// A command that hangs is stopped at its timeout, its children too.
func TestShellCommandTimeout(t *testing.T) {
	marker := t.TempDir() + "/child"
	cmd := &ShellCommand{Line: "(sleep 60; touch " + marker + ") & echo started; sleep 60", Timeout: 300 * time.Millisecond, WaitDelay: 50 * time.Millisecond}
	start := time.Now()
	err := cmd.Restart(context.Background())
	if err == nil || !strings.Contains(err.Error(), "timed out after 300ms; output: started") {
		t.Errorf("hanging command: %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("Restart returned after %s", d)
	}
}

// A command that starts a daemon which keeps the output pipe open still
// returns once the command itself has exited.
func TestShellCommandBackgroundChild(t *testing.T) {
	err := (&ShellCommand{Line: "sleep 30 & echo ok", Timeout: time.Minute, WaitDelay: 50 * time.Millisecond}).Restart(context.Background())
	if err != nil {
		t.Errorf("command with a background child: %v", err)
	}
}

func TestTailBuffer(t *testing.T) {
	var b tailBuffer
	b.Write([]byte(strings.Repeat("x", maxOutput)))
	b.Write([]byte("tail"))
	if s := b.String(); len(s) != maxOutput || !strings.HasSuffix(s, "tail") {
		t.Errorf("kept %d bytes ending %q", len(s), s[len(s)-4:])
	}
}

// Systemd clears a failed unit's state before restarting it: a fake
// systemctl on PATH records the calls.
func TestSystemdResetsFailedUnit(t *testing.T) {
	dir := t.TempDir()
	calls := dir + "/calls"
	fake := "#!/bin/sh\necho \"$*\" >> " + calls + "\ncase \"$1\" in show) echo ActiveState=failed; echo Result=start-limit-hit;; esac\n"
	if err := os.WriteFile(dir+"/systemctl", []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+":"+os.Getenv("PATH"))
	if err := (&Systemd{Unit: "mattermost", Timeout: 10 * time.Second}).Restart(context.Background()); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(calls)
	want := "show --property=ActiveState,Result -- mattermost\nreset-failed -- mattermost\nrestart -- mattermost\n"
	if string(got) != want {
		t.Errorf("systemctl calls:\n%s\nwant\n%s", got, want)
	}

	// A restart that fails says so, with systemctl's words.
	fake = "#!/bin/sh\ncase \"$1\" in show) echo ActiveState=active;; restart) echo 'Unit mattermost.service not found.' >&2; exit 5;; esac\n"
	os.WriteFile(dir+"/systemctl", []byte(fake), 0o755)
	err := (&Systemd{Unit: "mattermost", Timeout: 10 * time.Second}).Restart(context.Background())
	if err == nil || !strings.Contains(err.Error(), "systemctl restart mattermost: exit status 5; output: Unit mattermost.service not found.") {
		t.Errorf("failing restart: %v", err)
	}
}
