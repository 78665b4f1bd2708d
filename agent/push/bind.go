package push

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/mmtls/mmtls/certs"
	"github.com/mmtls/mmtls/mmconfig"
)

// bindDropIn is the systemd drop-in mmtls writes so that Mattermost may bind
// ports below 1024 without running as root. Unlike a file capability on the
// binary, it survives Mattermost upgrades.
const bindDropIn = "10-mmtls-bind.conf"

const bindDropInContent = `# Written by mmtls: lets Mattermost bind ports below 1024 (such as 443)
# without running as root. Remove it only if Mattermost no longer listens there.
[Service]
AmbientCapabilities=CAP_NET_BIND_SERVICE
`

// capNetBindService is CAP_NET_BIND_SERVICE's bit number.
const capNetBindService = 10

// bindPlan is what Mattermost, running as its own user, needs to listen on
// a port below 1024: nothing (the zero value), the systemd drop-in, or the
// file capability on its binary.
type bindPlan struct {
	port   int
	dropIn string // the drop-in's path, under systemd
	binary string // the binary, with --restart-command
}

// planBind works out the bind privilege for listen, changing nothing.
func (p *Pusher) planBind(o Options, listen string, uid int, unitFile string) bindPlan {
	ps, err := mmconfig.ListenPort(listen)
	if err != nil {
		return bindPlan{} // Check already refused a bad ListenAddress
	}
	port, err := strconv.Atoi(ps)
	if err != nil || port >= 1024 || uid == 0 {
		return bindPlan{}
	}
	if o.RestartCommand == "" && unitFile != "" {
		if unitGrants(p.UnitDirs, o.Service) {
			return bindPlan{}
		}
		dirs := p.UnitDirs
		if dirs == nil {
			dirs = mmconfig.DefaultUnitDirs()
		}
		return bindPlan{port: port, dropIn: filepath.Join(dirs[0], o.Service+".service.d", bindDropIn)}
	}
	return bindPlan{port: port, binary: filepath.Join(o.MattermostDir, "bin", "mattermost")}
}

// String says what the plan does, for --dry-run and --no-restart.
func (b bindPlan) String() string {
	switch {
	case b.dropIn != "":
		return fmt.Sprintf("write %s (AmbientCapabilities=CAP_NET_BIND_SERVICE) and reload systemd, so Mattermost may bind port %d", b.dropIn, b.port)
	case b.binary != "":
		return fmt.Sprintf("give %s the file capability cap_net_bind_service, if it lacks it, so Mattermost may bind port %d", b.binary, b.port)
	}
	return ""
}

// bindPrivilege makes sure Mattermost, running as uid, may listen on the
// port of listen. It returns a note on what it did ("" for nothing), how
// to undo it (nil for nothing to undo) and warnings.
func (p *Pusher) bindPrivilege(ctx context.Context, o Options, listen string, uid int, unitFile string) (string, func() error, []string, error) {
	plan := p.planBind(o, listen, uid, unitFile)
	switch {
	case plan.dropIn != "":
		note, err := writeBindDropIn(ctx, plan.dropIn)
		return note, nil, nil, err
	case plan.binary == "":
		return "", nil, nil, nil
	}
	bin, port := plan.binary, plan.port
	undo, changed, err := setBindCapability(bin)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil, []string{fmt.Sprintf("Mattermost must be allowed to bind port %d, but %s was not found to give it the capability; "+
			"do it yourself (setcap cap_net_bind_service=+ep on the binary, or AmbientCapabilities=CAP_NET_BIND_SERVICE in its service)", port, bin)}, nil
	}
	if err != nil {
		return "", nil, nil, fmt.Errorf("give %s the capability to bind port %d: %w", bin, port, err)
	}
	warn := []string{fmt.Sprintf("%s has the file capability cap_net_bind_service to bind port %d; a Mattermost upgrade replaces the binary and drops it "+
		"(run mmtls push again after upgrading), and a nosuid mount or NoNewPrivileges= defeats it", bin, port)}
	if !changed {
		return "", nil, warn, nil
	}
	return "set cap_net_bind_service on " + bin, undo, warn, nil
}

// writeBindDropIn writes the drop-in at path and reloads systemd.
func writeBindDropIn(ctx context.Context, path string) (string, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create drop-in directory: %w", err)
	}
	d, err := certs.OpenDir(dir)
	if err != nil {
		return "", err
	}
	defer d.Close()
	if err := d.WriteFile(filepath.Base(path), []byte(bindDropInContent), certs.FileAttrs{UID: 0, GID: 0, Mode: 0o644}); err != nil {
		return "", err
	}
	if err := SystemctlDaemonReload(ctx); err != nil {
		return "", err
	}
	return "wrote " + path, nil
}

// unitGrants reports whether the service's unit or a drop-in already grants
// CAP_NET_BIND_SERVICE as an ambient capability.
func unitGrants(dirs []string, service string) bool {
	if dirs == nil {
		dirs = mmconfig.DefaultUnitDirs()
	}
	var files []string
	for _, d := range dirs {
		files = append(files, filepath.Join(d, service+".service"))
		m, _ := filepath.Glob(filepath.Join(d, service+".service.d", "*.conf"))
		files = append(files, m...)
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(bytes.NewReader(data))
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			if strings.HasPrefix(line, "AmbientCapabilities=") && strings.Contains(strings.ToUpper(line), "CAP_NET_BIND_SERVICE") {
				return true
			}
		}
	}
	return false
}

// setBindCapability adds cap_net_bind_service to the binary's permitted and
// effective file capabilities, as `setcap cap_net_bind_service=+ep` does,
// keeping any capability it already has. It reports whether it changed
// anything and returns how to put the previous value back.
//
// The binary's directory is the mattermost user's: a symlink or a hard link
// planted there in place of the binary (to python3, say) is refused, never
// followed, and the attribute is read and written through the descriptor
// that was checked.
func setBindCapability(path string) (undo func() error, changed bool, err error) {
	// struct vfs_cap_data, revision 2: magic_etc, then permitted and
	// inheritable for capabilities 0-31 and 32-63.
	const (
		revision2 = 0x02000000
		effective = 0x000001
		attr      = "security.capability"
	)
	d, err := certs.OpenDir(filepath.Dir(path))
	if err != nil {
		return nil, false, err
	}
	defer d.Close()
	f, err := d.OpenFile(filepath.Base(path))
	if err != nil {
		return nil, false, err
	}
	defer f.Close()
	fd := int(f.Fd())
	data := make([]byte, 20)
	n, err := unix.Fgetxattr(fd, attr, data)
	var prev []byte // nil: there was none
	switch {
	case err == nil && n >= 12:
		data = data[:n]
		prev = append([]byte(nil), data...)
	case err == nil || errors.Is(err, unix.ENODATA):
		data = make([]byte, 20)
	default:
		return nil, false, fmt.Errorf("read %s: %w", attr, err)
	}
	magic := binary.LittleEndian.Uint32(data[0:4])
	permitted := binary.LittleEndian.Uint32(data[4:8])
	if magic&effective != 0 && permitted&(1<<capNetBindService) != 0 {
		return nil, false, nil
	}
	out := make([]byte, 20)
	copy(out, data)
	binary.LittleEndian.PutUint32(out[0:4], revision2|effective)
	binary.LittleEndian.PutUint32(out[4:8], permitted|1<<capNetBindService)
	if err := unix.Fsetxattr(fd, attr, out, 0); err != nil {
		return nil, false, fmt.Errorf("write %s: %w", attr, err)
	}
	ino := fileID(f)
	undo = func() error {
		d, err := certs.OpenDir(filepath.Dir(path))
		if err != nil {
			return err
		}
		defer d.Close()
		f, err := d.OpenFile(filepath.Base(path))
		if err != nil {
			return err
		}
		defer f.Close()
		if fileID(f) != ino {
			return nil // replaced since: the capability went with the old file
		}
		if prev == nil {
			err = unix.Fremovexattr(int(f.Fd()), attr)
		} else {
			err = unix.Fsetxattr(int(f.Fd()), attr, prev, 0)
		}
		if err != nil {
			return fmt.Errorf("put back %s of %s: %w", attr, path, err)
		}
		return nil
	}
	return undo, true, nil
}

// fileID identifies an open file by device and inode.
func fileID(f *os.File) [2]uint64 {
	var st unix.Stat_t
	if unix.Fstat(int(f.Fd()), &st) != nil {
		return [2]uint64{}
	}
	return [2]uint64{st.Dev, st.Ino}
}

// BindStatus says, changing nothing, whether Mattermost running as uid may
// listen on listen's port: needed is false above 1023 (or as root); how
// says what grants it, and fileCap that it is the binary's file capability,
// which a Mattermost upgrade drops.
func BindStatus(o Options, unitDirs []string, listen string, uid int, unitFile string) (needed bool, port int, granted, fileCap bool, how string) {
	o = o.WithDefaults()
	ps, err := mmconfig.ListenPort(listen)
	if err != nil {
		return false, 0, false, false, ""
	}
	port, err = strconv.Atoi(ps)
	if err != nil || port >= 1024 || uid == 0 {
		return false, port, false, false, ""
	}
	if unitFile != "" && unitGrants(unitDirs, o.Service) {
		return true, port, true, false, "AmbientCapabilities=CAP_NET_BIND_SERVICE in the " + o.Service + " unit or a drop-in"
	}
	bin := filepath.Join(o.MattermostDir, "bin", "mattermost")
	data := make([]byte, 24)
	n, err := unix.Getxattr(bin, "security.capability", data)
	if err == nil && n >= 8 && binary.LittleEndian.Uint32(data[0:4])&0x1 != 0 && binary.LittleEndian.Uint32(data[4:8])&(1<<capNetBindService) != 0 {
		return true, port, true, true, "the file capability cap_net_bind_service on " + bin
	}
	return true, port, false, false, ""
}

// DialAddr is where to connect to reach a ListenAddress: loopback for a
// wildcard host.
func DialAddr(listen string) string { return dialAddr(listen) }

// PingPath is SiteURL's path followed by /api/v4/system/ping.
func PingPath(siteURL string) string { return pingPath(siteURL) }
