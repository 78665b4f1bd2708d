// Package systemdlab boots a real systemd, isolated from the host, for the
// tests that need one: the agent's unit, its packages, and Mattermost under
// its documented unit. The lab is a PID, mount, UTS, IPC and cgroup
// namespace (and a network namespace unless HostNetwork), whose root is an
// overlay of the host's / on a private tmpfs: it sees the host's installed
// packages and binaries, and nothing it writes reaches the host.
//
// It needs root, systemd installed, and the cgroup v1 hybrid layout (a
// name=systemd hierarchy and cgroup2 at unified/). Boot reports
// ErrUnavailable where those are missing.
package systemdlab

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrUnavailable is returned by Boot where this machine cannot run a lab.
var ErrUnavailable = errors.New("systemd lab unavailable")

// Options configure a lab.
type Options struct {
	// Binds are host paths made visible inside, read-write: "PATH" at the
	// same path, or "PATH:INSIDE". The lab's /tmp, /var/tmp and /run are
	// its own tmpfs, so what it must see there is bound.
	Binds []string
	// HostNetwork shares the host's network namespace, so that a test on
	// the host reaches services in the lab (and they reach the host's) on
	// loopback. By default the lab has a loopback of its own.
	HostNetwork bool
	// Mask lists more units to mask, beyond those that would waste CPU or
	// take ports (nginx, haproxy, postgresql, gettys, timers).
	Mask []string
	// BootTimeout bounds the boot. 0 means 30s.
	BootTimeout time.Duration
}

// Lab is a running systemd. Its methods are safe for concurrent use.
type Lab struct {
	cmd     *exec.Cmd // unshare: the lab's parent, outside it
	pid1    int       // the lab's PID 1, as the host numbers it
	dir     string    // host directory the lab's tmpfs is mounted on, inside
	cgroup  string    // name of the lab's cgroups, in both hierarchies
	console *os.File  // master end of the lab's /dev/console
	log     bytes.Buffer
	logMu   sync.Mutex
	logDone chan struct{}
	exited  chan struct{}
	// BootTime is how long the boot took, to `running`.
	BootTime time.Duration
}

// masked are the units a lab never starts: they would grab ports or CPU.
var masked = []string{
	"nginx.service", "haproxy.service", "postgresql.service", "postgresql@15-main.service",
	"getty@tty1.service", "console-getty.service", "serial-getty@console.service", "systemd-timesyncd.service",
	"apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer", "fstrim.timer", "e2scrub_all.timer", "logrotate.timer",
}

// caps is the bounding set of the lab: systemd-nspawn's default set,
// without sys_module, sys_time, sys_rawio and syslog; with net_admin for its
// own network namespace.
const caps = "-all,+chown,+dac_override,+dac_read_search,+fowner,+fsetid,+kill,+setgid,+setuid,+setpcap," +
	"+linux_immutable,+net_bind_service,+net_broadcast,+net_raw,+net_admin,+ipc_owner,+sys_chroot,+sys_ptrace," +
	"+sys_admin,+sys_boot,+sys_nice,+sys_resource,+sys_tty_config,+mknod,+lease,+audit_write,+audit_control,+setfcap"

// Available reports why a lab cannot boot here, or nil.
func Available() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: needs root", ErrUnavailable)
	}
	for _, p := range []string{"/lib/systemd/systemd", "/usr/bin/unshare", "/usr/bin/nsenter", "/usr/bin/setpriv",
		"/sys/fs/cgroup/systemd/cgroup.procs", "/sys/fs/cgroup/unified/cgroup.procs"} {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("%w: %v", ErrUnavailable, err)
		}
	}
	return nil
}

// Boot starts a lab and waits until systemd reports `running`.
func Boot(ctx context.Context, o Options) (*Lab, error) {
	if err := Available(); err != nil {
		return nil, err
	}
	start := time.Now()
	timeout := o.BootTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	dir, err := os.MkdirTemp("", "mmtls-lab-")
	if err != nil {
		return nil, err
	}
	l := &Lab{dir: dir, cgroup: filepath.Base(dir), logDone: make(chan struct{}), exited: make(chan struct{})}
	ok := false
	defer func() {
		if !ok {
			l.Close()
		}
	}()
	for _, h := range []string{"systemd", "unified"} {
		if err := os.Mkdir(filepath.Join("/sys/fs/cgroup", h, l.cgroup), 0o755); err != nil {
			return nil, fmt.Errorf("lab cgroup: %w", err)
		}
	}
	master, slave, err := openPTY()
	if err != nil {
		return nil, fmt.Errorf("lab console: %w", err)
	}
	l.console = master
	go func() {
		defer close(l.logDone)
		buf := make([]byte, 4096)
		for {
			n, err := master.Read(buf)
			logWriter{l}.Write(buf[:n])
			if err != nil {
				return
			}
		}
	}()

	ns := "--pid --fork --kill-child=SIGKILL --mount --uts --ipc --cgroup --propagation private"
	if !o.HostNetwork {
		ns += " --net"
	}
	// The wrapper moves itself into the lab's cgroups, so that unshare's
	// child (the lab's PID 1) starts there and the new cgroup namespace is
	// rooted there.
	wrapper := fmt.Sprintf("echo $$ > /sys/fs/cgroup/systemd/%[1]s/cgroup.procs && echo $$ > /sys/fs/cgroup/unified/%[1]s/cgroup.procs && exec unshare %[2]s sh -c \"$0\"",
		l.cgroup, ns)
	l.cmd = exec.Command("sh", "-c", wrapper, l.setupScript(o, slave.Name()))
	l.cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	stdin, err := l.cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := l.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	l.cmd.Stderr = logWriter{l} // setup errors; systemd logs to the console
	if err := l.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start lab: %w", err)
	}
	slave.Close()
	go func() { l.cmd.Wait(); close(l.exited) }()

	// The setup says "ready" before it execs systemd: unshare (outside the
	// lab) goes back to the root cgroups first, so that no process outside
	// the lab's PID namespace sits in its cgroups.
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err == nil && strings.TrimSpace(line) != "ready" {
			err = fmt.Errorf("lab setup said %q", line)
		}
		ready <- err
	}()
	select {
	case err := <-ready:
		if err != nil {
			return nil, fmt.Errorf("lab setup: %w\n%s", err, l.Log())
		}
	case <-l.exited:
		return nil, fmt.Errorf("lab setup failed:\n%s", l.Log())
	case <-ctx.Done():
		return nil, fmt.Errorf("lab setup: %w\n%s", ctx.Err(), l.Log())
	}
	for _, h := range []string{"systemd", "unified"} {
		if err := os.WriteFile(filepath.Join("/sys/fs/cgroup", h, "cgroup.procs"), []byte(strconv.Itoa(l.cmd.Process.Pid)), 0); err != nil {
			return nil, fmt.Errorf("move unshare out of the lab cgroup: %w", err)
		}
	}
	if l.pid1, err = childOf(l.cmd.Process.Pid); err != nil {
		return nil, err
	}
	if _, err := io.WriteString(stdin, "go\n"); err != nil {
		return nil, fmt.Errorf("start systemd: %w", err)
	}
	stdin.Close()

	// Wait for the bus, then for the boot to finish.
	for {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/root/run/systemd/private", l.pid1)); err == nil {
			break
		}
		select {
		case <-l.exited:
			return nil, fmt.Errorf("systemd exited during boot:\n%s", l.Log())
		case <-ctx.Done():
			return nil, fmt.Errorf("lab boot: no systemd bus: %w\n%s", ctx.Err(), l.Log())
		case <-time.After(10 * time.Millisecond):
		}
	}
	if _, err := l.Run(ctx, "mkdir", "-p", "/sys/fs/cgroup/systemd/lab-exec", "/sys/fs/cgroup/unified/lab-exec"); err != nil {
		return nil, err
	}
	state, err := l.Run(ctx, "systemctl", "is-system-running", "--wait")
	if err != nil && !strings.Contains(state, "degraded") {
		return nil, fmt.Errorf("lab boot: %s: %w\n%s", state, err, l.Log())
	}
	l.BootTime = time.Since(start)
	ok = true
	return l, nil
}

// setupScript is the lab's PID 1 until it execs systemd: it builds the
// root (an overlay of / on a private tmpfs), its /proc, /sys, /dev and
// cgroups, masks units, pivots into it, and waits for the word to start.
func (l *Lab) setupScript(o Options, consolePath string) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	r := l.dir + "/root"
	w("set -e")
	w("mount -t tmpfs -o mode=755 lab %s", l.dir)
	w("mkdir -p %[1]s/upper %[1]s/work %[2]s", l.dir, r)
	w("mount -t overlay overlay -o lowerdir=/,upperdir=%[1]s/upper,workdir=%[1]s/work %[2]s", l.dir, r)
	w("cd %s", r)
	w("mount -t proc proc proc")
	w("mount --bind proc/sys proc/sys && mount -o remount,bind,ro proc/sys")
	if !o.HostNetwork {
		w("mount --bind proc/sys/net proc/sys/net && mount -o remount,bind,rw proc/sys/net")
	}
	w("mount -t sysfs -o ro sysfs sys")
	w("mount -t tmpfs -o mode=755 cgroup sys/fs/cgroup")
	w("mkdir sys/fs/cgroup/systemd sys/fs/cgroup/unified")
	w("mount -t cgroup -o none,name=systemd cgroup sys/fs/cgroup/systemd")
	w("mount -t cgroup2 cgroup2 sys/fs/cgroup/unified")
	w("mount -t tmpfs -o mode=755 dev dev")
	w("for n in null zero full random urandom tty; do touch dev/$n; mount --bind /dev/$n dev/$n; done")
	w("mkdir dev/pts dev/shm && mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts dev/pts && ln -s pts/ptmx dev/ptmx")
	w("mount -t tmpfs tmpfs dev/shm")
	w("ln -s /proc/self/fd dev/fd && ln -s /proc/self/fd/0 dev/stdin && ln -s /proc/self/fd/1 dev/stdout && ln -s /proc/self/fd/2 dev/stderr")
	w("touch dev/console && mount --bind %s dev/console", consolePath)
	for _, d := range []string{"run", "tmp", "var/tmp"} {
		w("mount -t tmpfs -o mode=%s tmpfs %s", map[bool]string{true: "1777", false: "755"}[d != "run"], d)
	}
	for _, p := range o.Binds {
		src, dst, ok := strings.Cut(p, ":")
		if !ok {
			dst = src
		}
		w("mkdir -p .%[2]s && mount --bind %[1]s .%[2]s", src, dst)
	}
	w("mkdir -p etc/systemd/system")
	for _, u := range append(append([]string{}, masked...), o.Mask...) {
		w("ln -sf /dev/null etc/systemd/system/%s", u)
	}
	w("mkdir .oldroot && pivot_root . .oldroot && cd / && umount -l /.oldroot && rmdir /.oldroot")
	w("echo ready")
	w("read go")
	w("exec env -i container=other PATH=/usr/sbin:/usr/bin:/sbin:/bin setpriv --bounding-set %s --inh-caps -all /lib/systemd/systemd --system --unit=multi-user.target </dev/console >/dev/console 2>&1", caps)
	return b.String()
}

// Run runs a command inside the lab, in all its namespaces, and returns its
// combined output. It stops at ctx's end.
func (l *Lab) Run(ctx context.Context, name string, args ...string) (string, error) {
	// Join a cgroup of the lab first: a process from outside its PID
	// namespace in its cgroups confuses systemd.
	inner := "echo $$ > /sys/fs/cgroup/systemd/lab-exec/cgroup.procs 2>/dev/null; echo $$ > /sys/fs/cgroup/unified/lab-exec/cgroup.procs 2>/dev/null; exec \"$0\" \"$@\""
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"-t", strconv.Itoa(l.pid1), "-a", "env", "-i",
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "sh", "-c", inner, name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("lab: %s %s: %w", name, strings.Join(args, " "), err)
	}
	return string(out), nil
}

// logWriter appends to the lab's log.
type logWriter struct{ l *Lab }

func (w logWriter) Write(p []byte) (int, error) {
	w.l.logMu.Lock()
	defer w.l.logMu.Unlock()
	return w.l.log.Write(p)
}

// Log returns what the lab printed: its setup's errors and systemd's boot
// and status messages on its console.
func (l *Lab) Log() string {
	l.logMu.Lock()
	defer l.logMu.Unlock()
	return l.log.String()
}

// Close powers the lab off (SIGKILL after 10 s), and removes its cgroups and
// directory. Nothing is left behind.
func (l *Lab) Close() error {
	var errs []error
	if l.cmd != nil && l.cmd.Process != nil {
		if l.pid1 > 0 {
			syscall.Kill(l.pid1, sigPoweroff)
		} else {
			l.cmd.Process.Kill()
		}
		select {
		case <-l.exited:
		case <-time.After(10 * time.Second):
			if l.pid1 > 0 {
				syscall.Kill(l.pid1, syscall.SIGKILL)
			}
			l.cmd.Process.Kill()
			<-l.exited
		}
	}
	if l.console != nil {
		l.console.Close()
		<-l.logDone
	}
	for _, h := range []string{"systemd", "unified"} {
		if err := removeCgroup(filepath.Join("/sys/fs/cgroup", h, l.cgroup)); err != nil {
			errs = append(errs, err)
		}
	}
	if l.dir != "" {
		if err := os.Remove(l.dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// removeCgroup removes a cgroup and those below it, deepest first, waiting
// briefly for the kernel to empty them after their processes died.
func removeCgroup(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := removeCgroup(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	var last error
	for range 100 {
		if last = unix.Rmdir(dir); last == nil || last == unix.ENOENT {
			return nil
		}
		time.Sleep(10 * time.Millisecond) // EBUSY until the last dying process is reaped
	}
	return fmt.Errorf("remove cgroup %s: %w", dir, last)
}

// childOf returns the one child process of pid.
func childOf(pid int) (int, error) {
	for range 500 {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
		if err != nil {
			return 0, err
		}
		if f := strings.Fields(string(data)); len(f) > 0 {
			return strconv.Atoi(f[0])
		}
		time.Sleep(time.Millisecond)
	}
	return 0, fmt.Errorf("lab: unshare (pid %d) has no child", pid)
}

// openPTY opens a pseudo-terminal pair: the master for the host to read,
// the slave to become the lab's /dev/console.
func openPTY() (master, slave *os.File, err error) {
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		return nil, nil, err
	}
	fd := int(m.Fd())
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		m.Close()
		return nil, nil, err
	}
	n, err := unix.IoctlGetUint32(fd, unix.TIOCGPTN)
	if err != nil {
		m.Close()
		return nil, nil, err
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		m.Close()
		return nil, nil, err
	}
	return m, s, nil
}

// sigPoweroff is SIGRTMIN+4, which systemd takes as "power off" (Linux's
// SIGRTMIN is 34).
const sigPoweroff = syscall.Signal(34 + 4)
