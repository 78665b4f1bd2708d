package push

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// lockPoll is how often a waiting run retries the lock.
const lockPoll = 100 * time.Millisecond

// fileLock is an exclusive flock on a file in the state directory. The
// kernel drops it when the process dies, so a killed run never wedges the
// next one.
type fileLock struct {
	f *os.File
}

// acquireLock takes the lock at path, waiting up to timeout. The holder's
// PID is written into the file, for the message another run prints.
func acquireLock(ctx context.Context, path string, timeout time.Duration, log *slog.Logger) (*fileLock, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	t := time.NewTicker(lockPoll)
	defer t.Stop()
	waiting := false
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			break
		}
		if err != unix.EWOULDBLOCK {
			f.Close()
			return nil, fmt.Errorf("lock %q: %w", path, err)
		}
		if !waiting {
			waiting = true
			log.Info("waiting for another mmtls run to finish", "lock", path, "holder_pid", holderPID(path), "timeout", timeout)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, &outcome{kind: ErrBusy, err: fmt.Errorf("lock %q is held by another mmtls run (pid %s); gave up after %s (--lock-timeout): %w",
				path, holderPID(path), timeout, ErrBusy)}
		case <-t.C:
		}
	}
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return &fileLock{f: f}, nil
}

func holderPID(path string) string {
	b, err := os.ReadFile(path)
	if err != nil || len(strings.TrimSpace(string(b))) == 0 {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}

// release drops the lock.
func (l *fileLock) release() error {
	return l.f.Close()
}

// stateDir makes sure dir exists and is root's alone, and so is every
// directory on its path: created 0700 if missing; refused if a symlink, not
// a directory, or writable by anyone but its root owner. The backups, the
// journal and the lock live there: a user who could rename any directory
// on the way (a state dir under the mattermost user's tree) could swap in
// a journal of their own, which root would act on.
func stateDir(dir string) error {
	if !filepath.IsAbs(dir) {
		return usageErr(fmt.Errorf("--state-dir %q: must be an absolute path", dir))
	}
	if err := trustedPath(filepath.Dir(dir), "--state-dir "+dir); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create state directory: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFDIR:
		return refused(fmt.Errorf("state directory %q is not a directory (a symlink?); mmtls keeps its backups there and needs a real root-owned directory", dir))
	case int(st.Uid) != os.Geteuid():
		return refused(fmt.Errorf("state directory %q is owned by uid %d; it must be owned by uid %d (the user running mmtls)", dir, st.Uid, os.Geteuid()))
	case st.Mode&0o022 != 0:
		return refused(fmt.Errorf("state directory %q has mode %04o; it must not be writable by group or others (chmod 700 %s)", dir, st.Mode&0o7777, dir))
	}
	return nil
}

// trustedPath checks that no one but root can change what path names: each
// existing directory on it, from /, is root's and writable by no one else
// (or sticky, as /tmp, where others cannot rename root's entries), and each
// symlink on it is root's and leads to such a path. Missing components are
// fine: root creates them.
func trustedPath(path, what string) error {
	cur := "/"
	for _, part := range strings.Split(strings.Trim(filepath.Clean(path), "/"), "/") {
		if part == "" {
			continue
		}
		next := filepath.Join(cur, part)
		var st unix.Stat_t
		if err := unix.Lstat(next, &st); err != nil {
			if err == unix.ENOENT {
				return nil
			}
			return fmt.Errorf("%s: %w", what, &os.PathError{Op: "lstat", Path: next, Err: err})
		}
		if st.Uid != 0 {
			return refused(fmt.Errorf("%s: %q is owned by uid %d; every directory on the path of mmtls's state must be root's, "+
				"or that user could swap in a journal root acts on", what, next, st.Uid))
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFLNK:
			target, err := filepath.EvalSymlinks(next)
			if err != nil {
				return fmt.Errorf("%s: %w", what, err)
			}
			if err := trustedPath(target, what); err != nil {
				return err
			}
			next = target
		case unix.S_IFDIR:
			if st.Mode&0o022 != 0 && st.Mode&unix.S_ISVTX == 0 {
				return refused(fmt.Errorf("%s: %q has mode %04o: others can rename what is in it; put mmtls's state under a directory only root can write",
					what, next, st.Mode&0o7777))
			}
		default:
			return refused(fmt.Errorf("%s: %q is not a directory", what, next))
		}
		cur = next
	}
	return nil
}
