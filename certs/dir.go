package certs

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// maxLinks bounds symlink resolution in OpenDir, as the kernel's MAXSYMLINKS.
const maxLinks = 40

// tempMarker is part of every temp file name this package creates, so that
// leftovers of a killed run can be recognised and removed.
const tempMarker = ".mmtls-tmp-"

// Dir is a directory opened once, without following links that someone other
// than root could have planted, and then used only through its descriptor:
// names inside it are never followed as links. Methods are not safe for
// concurrent use. Close releases the descriptor.
type Dir struct {
	path string // as given by the caller, for messages and for the paths we report
	fd   int
}

// FileAttrs are the owner, mode and extended attributes to give a file.
type FileAttrs struct {
	UID, GID int
	Mode     fs.FileMode // permission bits only
	// Xattrs are set on the new file before it is renamed into place, so
	// ACLs and SELinux labels survive a rewrite. Nil sets none.
	Xattrs map[string][]byte
}

// FileState describes a regular file read through a Dir.
type FileState struct {
	FileAttrs
	Dev, Ino uint64
}

// OpenDir opens the absolute directory path. A symlink on the way is followed
// only if root owns it and root alone can write the directory holding it (an
// administrator's /opt/mattermost -> /srv/mattermost-11); any other symlink
// is refused with an error naming it and wrapping ErrUnsafePath.
func OpenDir(path string) (*Dir, error) {
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("open directory %q: path is not absolute", path)
	}
	fd, err := walk(path)
	if err != nil {
		return nil, err
	}
	return &Dir{path: filepath.Clean(path), fd: fd}, nil
}

func walk(path string) (int, error) {
	fd, err := unix.Open("/", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open directory %q: open /: %w", path, err)
	}
	cur := "/"
	comps := splitPath(path)
	links := 0
	fail := func(err error) (int, error) {
		unix.Close(fd)
		return -1, fmt.Errorf("open directory %q: %w", path, err)
	}
	for len(comps) > 0 {
		c := comps[0]
		comps = comps[1:]
		if c == ".." {
			nfd, err := unix.Openat(fd, "..", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if err != nil {
				return fail(&fs.PathError{Op: "open", Path: filepath.Dir(cur), Err: err})
			}
			unix.Close(fd)
			fd, cur = nfd, filepath.Dir(cur)
			continue
		}
		name := filepath.Join(cur, c)
		var st unix.Stat_t
		if err := unix.Fstatat(fd, c, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fail(&fs.PathError{Op: "stat", Path: name, Err: err})
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFLNK:
			if links++; links > maxLinks {
				return fail(&fs.PathError{Op: "resolve", Path: name, Err: unix.ELOOP})
			}
			var parent unix.Stat_t
			if err := unix.Fstat(fd, &parent); err != nil {
				return fail(&fs.PathError{Op: "stat", Path: cur, Err: err})
			}
			if st.Uid != 0 {
				return fail(fmt.Errorf("symlink %q is owned by uid %d, not root, so that user could point it anywhere: %w", name, st.Uid, ErrUnsafePath))
			}
			if parent.Uid != 0 || parent.Mode&0o022 != 0 {
				return fail(fmt.Errorf("symlink %q lies in directory %q, which someone other than root can write (owner uid %d, mode %04o), so it could be replaced: %w",
					name, cur, parent.Uid, parent.Mode&0o7777, ErrUnsafePath))
			}
			target, err := readlinkat(fd, c)
			if err != nil {
				return fail(&fs.PathError{Op: "readlink", Path: name, Err: err})
			}
			if filepath.IsAbs(target) {
				nfd, err := unix.Open("/", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
				if err != nil {
					return fail(err)
				}
				unix.Close(fd)
				fd, cur = nfd, "/"
			}
			comps = append(splitPath(target), comps...)
		case unix.S_IFDIR:
			nfd, err := openBeneath(fd, c, unix.O_RDONLY|unix.O_DIRECTORY, 0)
			if err != nil {
				return fail(&fs.PathError{Op: "open", Path: name, Err: err})
			}
			unix.Close(fd)
			fd, cur = nfd, name
		default:
			return fail(&fs.PathError{Op: "open", Path: name, Err: unix.ENOTDIR})
		}
	}
	return fd, nil
}

func splitPath(p string) []string {
	var out []string
	for _, c := range strings.Split(p, "/") {
		if c != "" && c != "." {
			out = append(out, c)
		}
	}
	return out
}

func readlinkat(fd int, name string) (string, error) {
	for size := 256; size <= 1<<16; size *= 4 {
		buf := make([]byte, size)
		n, err := unix.Readlinkat(fd, name, buf)
		if err != nil {
			return "", err
		}
		if n < size {
			return string(buf[:n]), nil
		}
	}
	return "", unix.ENAMETOOLONG
}

// openat2Missing records that the kernel lacks openat2(2) (before Linux
// 5.6), so the O_NOFOLLOW fallback is used without asking again.
var openat2Missing atomic.Bool

// openBeneath opens a single name in the directory dirfd without following
// any symlink: openat2 with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS where the
// kernel has it, openat with O_NOFOLLOW otherwise.
func openBeneath(dirfd int, name string, flags int, mode uint32) (int, error) {
	flags |= unix.O_CLOEXEC | unix.O_NOFOLLOW
	if !openat2Missing.Load() {
		how := &unix.OpenHow{
			Flags:   uint64(flags),
			Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
		}
		if flags&unix.O_CREAT != 0 {
			how.Mode = uint64(mode)
		}
		fd, err := unix.Openat2(dirfd, name, how)
		if err != unix.ENOSYS {
			return fd, err
		}
		openat2Missing.Store(true)
	}
	return unix.Openat(dirfd, name, flags, mode)
}

// Path returns the directory's path as given to OpenDir, cleaned.
func (d *Dir) Path() string { return d.path }

// Join returns the path of name inside the directory, for messages.
func (d *Dir) Join(name string) string { return filepath.Join(d.path, name) }

// Close releases the directory descriptor.
func (d *Dir) Close() error {
	if d.fd < 0 {
		return nil
	}
	err := unix.Close(d.fd)
	d.fd = -1
	return err
}

// Lstat describes name without following it. A missing name returns an error
// satisfying errors.Is(err, fs.ErrNotExist).
func (d *Dir) Lstat(name string) (unix.Stat_t, error) {
	var st unix.Stat_t
	if err := unix.Fstatat(d.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return st, &fs.PathError{Op: "stat", Path: d.Join(name), Err: err}
	}
	return st, nil
}

// openRegular opens name for reading only once it is known to be a
// regular file: an O_PATH descriptor is checked first (opening it opens
// nothing), then reopened through /proc/self/fd, which reaches the same
// inode, so the check cannot be raced. Without /proc, the name is opened
// again and the two are compared; a swap in between is refused.
func (d *Dir) openRegular(name string) (int, error) {
	path := d.Join(name)
	pfd, err := openBeneath(d.fd, name, unix.O_PATH, 0)
	if err != nil {
		if err == unix.ELOOP {
			return -1, fmt.Errorf("read %q: symlink: %w", path, ErrUntrustedFile)
		}
		return -1, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(pfd)
	return reopenRegular(pfd, path, func(flags int) (int, error) { return openBeneath(d.fd, name, flags, 0) })
}

// reopenRegular checks that the O_PATH descriptor pfd is a regular file and
// opens it for reading: through /proc/self/fd, or else with open, checking
// that it still is the same file.
func reopenRegular(pfd int, path string, open func(flags int) (int, error)) (int, error) {
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		return -1, &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return -1, fmt.Errorf("read %q: not a regular file (%s): %w", path, fileType(st.Mode), ErrUntrustedFile)
	}
	const flags = unix.O_RDONLY | unix.O_NONBLOCK | unix.O_NOCTTY | unix.O_CLOEXEC
	fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", pfd), flags, 0)
	if err != nil {
		if fd, err = open(flags); err != nil {
			return -1, &fs.PathError{Op: "open", Path: path, Err: err}
		}
	}
	var st2 unix.Stat_t
	if err := unix.Fstat(fd, &st2); err != nil || st2.Dev != st.Dev || st2.Ino != st.Ino {
		unix.Close(fd)
		return -1, fmt.Errorf("read %q: changed while opened: %w", path, ErrUntrustedFile)
	}
	return fd, nil
}

// fileType names the file type bits of mode, for messages.
func fileType(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFIFO:
		return "a FIFO"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFLNK:
		return "a symlink"
	}
	return "not a regular file"
}

// suspicion says why the entry described by st must not be trusted, or "".
func suspicion(st *unix.Stat_t) string {
	switch {
	case st.Mode&unix.S_IFMT == unix.S_IFLNK:
		return "symlink"
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return fileType(st.Mode)
	case st.Nlink > 1:
		return fmt.Sprintf("hard link (%d links)", st.Nlink)
	}
	return ""
}

// ErrUntrustedFile is returned by ReadFile for a name that is a symlink, a
// hard link or not a regular file.
var ErrUntrustedFile = errors.New("not a plain file")

// OpenFile opens name for reading if it is a regular file with a single
// link, never following a symlink: a file root then acts on by descriptor
// (fsetxattr), so that a swap after the check cannot redirect it.
func (d *Dir) OpenFile(name string) (*os.File, error) {
	fd, err := d.openRegular(name)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), d.Join(name))
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		f.Close()
		return nil, &fs.PathError{Op: "stat", Path: d.Join(name), Err: err}
	}
	if why := suspicion(&st); why != "" {
		f.Close()
		return nil, fmt.Errorf("open %q: %s: %w", d.Join(name), why, ErrUntrustedFile)
	}
	return f, nil
}

// ReadFile reads name if it is a regular file with a single link, never
// following a symlink and never opening anything else (a device node, a
// FIFO) for reading, and reports its owner, mode and extended attributes.
// Reads are limited to max bytes.
func (d *Dir) ReadFile(name string, max int64) ([]byte, *FileState, error) {
	path := d.Join(name)
	fd, err := d.openRegular(name)
	if err != nil {
		return nil, nil, err
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, nil, &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	if why := suspicion(&st); why != "" {
		return nil, nil, fmt.Errorf("read %q: %s: %w", path, why, ErrUntrustedFile)
	}
	data, err := readBounded(f, path, max)
	if err != nil {
		return nil, nil, err
	}
	xattrs, err := readXattrs(fd)
	if err != nil {
		return nil, nil, fmt.Errorf("read extended attributes of %q: %w", path, err)
	}
	return data, &FileState{
		FileAttrs: FileAttrs{UID: int(st.Uid), GID: int(st.Gid), Mode: fs.FileMode(st.Mode & 0o777), Xattrs: xattrs},
		Dev:       st.Dev,
		Ino:       st.Ino,
	}, nil
}

func readXattrs(fd int) (map[string][]byte, error) {
	size, err := unix.Flistxattr(fd, nil)
	if err == unix.ENOTSUP || size == 0 {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	buf := make([]byte, size)
	size, err = unix.Flistxattr(fd, buf)
	if err != nil {
		return nil, err
	}
	out := map[string][]byte{}
	for _, name := range strings.Split(strings.TrimRight(string(buf[:size]), "\x00"), "\x00") {
		if name == "" {
			continue
		}
		n, err := unix.Fgetxattr(fd, name, nil)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		val := make([]byte, n)
		if n, err = unix.Fgetxattr(fd, name, val); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out[name] = val[:n]
	}
	return out, nil
}

// staged is a complete temp file in the directory, waiting to be renamed
// over its destination name.
type staged struct {
	dir  *Dir
	tmp  string
	name string
	ino  uint64
}

// stage writes data to a new temp file that only root can read, gives it
// attrs through its descriptor and syncs it. observe, if not nil, is called
// with the temp name after each step (for tests).
func (d *Dir) stage(name string, data []byte, a FileAttrs, observe func(step, tmp string)) (*staged, error) {
	path := d.Join(name)
	var (
		fd  int
		tmp string
		err error
	)
	for range 10 {
		tmp = "." + name + tempMarker + randomHex()
		fd, err = openBeneath(d.fd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL, 0o600)
		if err != unix.EEXIST {
			break
		}
	}
	if err != nil {
		return nil, &fs.PathError{Op: "create temp file for", Path: path, Err: err}
	}
	s := &staged{dir: d, tmp: tmp, name: name}
	f := os.NewFile(uintptr(fd), d.Join(tmp))
	fail := func(op string, err error) (*staged, error) {
		f.Close()
		s.abort()
		return nil, fmt.Errorf("stage %q: %s: %w", path, op, err)
	}
	step := func(st string) {
		if observe != nil {
			observe(st, tmp)
		}
	}
	step("created")
	if _, err := f.Write(data); err != nil {
		return fail("write", err)
	}
	step("written")
	for k, v := range a.Xattrs {
		if err := unix.Fsetxattr(fd, k, v, 0); err != nil {
			return fail("set extended attribute "+k, err)
		}
	}
	if err := unix.Fchown(fd, a.UID, a.GID); err != nil {
		return fail("chown", err)
	}
	step("chowned")
	if err := unix.Fchmod(fd, uint32(a.Mode.Perm())); err != nil {
		return fail("chmod", err)
	}
	step("chmodded")
	if err := f.Sync(); err != nil {
		return fail("fsync", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fail("stat", err)
	}
	s.ino = st.Ino
	if err := f.Close(); err != nil {
		s.abort()
		return nil, fmt.Errorf("stage %q: close: %w", path, err)
	}
	return s, nil
}

// commit renames the temp file over the destination name. Whatever was at
// the name (a symlink or hard link included) is replaced, never followed.
func (s *staged) commit() error {
	d := s.dir
	if err := unix.Renameat(d.fd, s.tmp, d.fd, s.name); err != nil {
		s.abort()
		return &fs.PathError{Op: "rename into place", Path: d.Join(s.name), Err: err}
	}
	// The directory is writable by others: make sure what landed is ours.
	var st unix.Stat_t
	if err := unix.Fstatat(d.fd, s.name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return &fs.PathError{Op: "stat", Path: d.Join(s.name), Err: err}
	}
	if st.Ino != s.ino {
		return fmt.Errorf("install %q: the file was swapped by someone else while it was written: %w", d.Join(s.name), ErrUnsafePath)
	}
	return nil
}

// abort removes the temp file, if it is still there.
func (s *staged) abort() {
	unix.Unlinkat(s.dir.fd, s.tmp, 0)
}

// Sync flushes the directory, making renames durable.
func (d *Dir) Sync() error {
	if err := unix.Fsync(d.fd); err != nil {
		return &fs.PathError{Op: "fsync", Path: d.path, Err: err}
	}
	return nil
}

// WriteFile atomically replaces name with data and attrs: temp file, owner
// and mode set through its descriptor, fsync, rename, fsync of the directory.
func (d *Dir) WriteFile(name string, data []byte, a FileAttrs) error {
	return d.ReplaceFile(name, data, a, nil)
}

// ReplaceFile is WriteFile with a last check: precondition, if not nil, runs
// once the new file is staged, just before the rename, and an error from it
// cancels the write (the temp file is removed and the error returned). It
// narrows the window in which a concurrent writer's change could be lost to
// the rename itself.
func (d *Dir) ReplaceFile(name string, data []byte, a FileAttrs, precondition func() error) error {
	if err := checkName(name); err != nil {
		return err
	}
	s, err := d.stage(name, data, a, nil)
	if err != nil {
		return err
	}
	if precondition != nil {
		if err := precondition(); err != nil {
			s.abort()
			return err
		}
	}
	if err := s.commit(); err != nil {
		return err
	}
	return d.Sync()
}

// Remove unlinks name (never following it). A missing name is not an error.
func (d *Dir) Remove(name string) error {
	if err := unix.Unlinkat(d.fd, name, 0); err != nil && err != unix.ENOENT {
		return &fs.PathError{Op: "remove", Path: d.Join(name), Err: err}
	}
	return nil
}

// clearPlanted makes way for a rename onto name, where something that is
// not a file mmtls wrote was found: a directory cannot be renamed over, so
// an empty one is removed and a full one moved aside under a name that
// says what it is (its content is the mattermost user's, not mmtls's, and
// is kept for the administrator to look at). Anything else is left for the
// rename to replace.
func (d *Dir) clearPlanted(name string, log *slog.Logger) error {
	st, err := d.Lstat(name)
	if err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil
	}
	if err := unix.Unlinkat(d.fd, name, unix.AT_REMOVEDIR); err == nil {
		log.Warn("removed an empty directory planted where mmtls installs a file", "path", d.Join(name))
		return nil
	}
	aside := name + ".planted-" + randomHex()
	if err := unix.Renameat(d.fd, name, d.fd, aside); err != nil {
		return &fs.PathError{Op: "move aside", Path: d.Join(name), Err: err}
	}
	log.Warn("moved a directory planted where mmtls installs a file out of the way", "path", d.Join(name), "moved_to", d.Join(aside))
	return nil
}

// RemoveStale deletes temp files that a killed run of this package left
// behind, and returns their names.
func (d *Dir) RemoveStale() ([]string, error) {
	dup, err := unix.Dup(d.fd)
	if err != nil {
		return nil, fmt.Errorf("list %q: %w", d.path, err)
	}
	f := os.NewFile(uintptr(dup), d.path)
	defer f.Close()
	entries, err := f.ReadDir(-1)
	if err != nil {
		return nil, fmt.Errorf("list %q: %w", d.path, err)
	}
	var removed []string
	for _, e := range entries {
		if !strings.Contains(e.Name(), tempMarker) || !e.Type().IsRegular() {
			continue
		}
		if err := d.Remove(e.Name()); err != nil {
			return removed, err
		}
		removed = append(removed, e.Name())
	}
	return removed, nil
}

func checkName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsRune(name, '/') || strings.Contains(name, tempMarker) {
		return fmt.Errorf("file name %q: must be a plain name without slashes", name)
	}
	return nil
}

func randomHex() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// errTooLarge is readBounded's error for a file over its bound.
var errTooLarge = errors.New("file too large")

// readBounded reads all of f, refusing more than max bytes.
func readBounded(f io.Reader, path string, max int64) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, fmt.Errorf("read %q: %w", path, err)
	}
	if int64(len(data)) > max {
		return nil, fmt.Errorf("read %q: larger than %d bytes: %w", path, max, errTooLarge)
	}
	return data, nil
}
