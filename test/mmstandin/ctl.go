package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ctl is a minimal service manager: it keeps one detached server per
// directory, as systemd keeps one per unit.
func ctl(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: ctl start|stop|restart --dir D [--user U] [--workdir W] [--exec PROGRAM] [--env K=V]... -- [server flags]")
	}
	verb := args[0]
	fs := flag.NewFlagSet("ctl", flag.ContinueOnError)
	dir := fs.String("dir", "", "state directory: pid, log, args")
	runAs := fs.String("user", "", "run the server as this user")
	workdir := fs.String("workdir", "", "the server's working directory")
	execPath := fs.String("exec", "", "run this program instead of the stand-in (a real Mattermost)")
	var env multi
	fs.Var(&env, "env", "K=V for the server's environment (repeatable)")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if *dir == "" {
		return errors.New("--dir is required")
	}
	switch verb {
	case "start":
		return start(*dir, *runAs, *workdir, *execPath, env, fs.Args())
	case "stop":
		return stopServer(*dir)
	case "restart":
		if err := stopServer(*dir); err != nil {
			return err
		}
		return start(*dir, *runAs, *workdir, *execPath, env, fs.Args())
	}
	return fmt.Errorf("unknown verb %q", verb)
}

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

func start(dir, runAs, workdir, self string, env, args []string) error {
	if self == "" {
		var err error
		if self, err = os.Executable(); err != nil {
			return err
		}
	}
	logf, err := os.OpenFile(filepath.Join(dir, "log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(self, args...)
	cmd.Dir = workdir
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if runAs != "" {
		u, err := user.Lookup(runAs)
		if err != nil {
			return err
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	pid := cmd.Process.Pid
	cmd.Process.Release()
	return os.WriteFile(filepath.Join(dir, "pid"), []byte(strconv.Itoa(pid)+"\n"), 0o644)
}

// stopServer sends SIGTERM to the recorded server and waits for it to be
// gone, then SIGKILL after ten seconds.
func stopServer(dir string) error {
	b, err := os.ReadFile(filepath.Join(dir, "pid"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return fmt.Errorf("pid file: %w", err)
	}
	os.Remove(filepath.Join(dir, "pid"))
	if syscall.Kill(pid, syscall.SIGTERM) != nil {
		return nil // already gone
	}
	deadline := time.Now().Add(10 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			syscall.Kill(pid, syscall.SIGKILL)
			deadline = time.Now().Add(10 * time.Second)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// alive reports whether pid still runs. The server is not our child (it
// was detached), so it is reaped by init: a zombie counts as gone.
func alive(pid int) bool {
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	fields := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	return len(fields) > 0 && fields[0] != "Z"
}
