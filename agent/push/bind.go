package push

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
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

// bindPrivilege makes sure Mattermost, running as uid, may listen on the
// port of listen. It returns a note on what it did ("" for nothing) and
// warnings.
func (p *Pusher) bindPrivilege(ctx context.Context, o Options, listen string, uid int, unitFile string) (string, []string, error) {
	ps, err := mmconfig.ListenPort(listen)
	if err != nil {
		return "", nil, nil // Check already refused a bad ListenAddress
	}
	port, err := strconv.Atoi(ps)
	if err != nil || port >= 1024 || uid == 0 {
		return "", nil, nil
	}
	if o.RestartCommand == "" && unitFile != "" {
		return p.bindDropIn(ctx, o.Service)
	}
	bin := filepath.Join(o.MattermostDir, "bin", "mattermost")
	if _, err := os.Stat(bin); err != nil {
		return "", []string{fmt.Sprintf("Mattermost must be allowed to bind port %d, but %s was not found to give it the capability; "+
			"do it yourself (setcap cap_net_bind_service=+ep on the binary, or AmbientCapabilities=CAP_NET_BIND_SERVICE in its service)", port, bin)}, nil
	}
	changed, err := setBindCapability(bin)
	if err != nil {
		return "", nil, fmt.Errorf("give %s the capability to bind port %d: %w", bin, port, err)
	}
	warn := []string{fmt.Sprintf("%s has the file capability cap_net_bind_service to bind port %d; a Mattermost upgrade replaces the binary and drops it "+
		"(run mmtls push again after upgrading), and a nosuid mount or NoNewPrivileges= defeats it", bin, port)}
	if !changed {
		return "", warn, nil
	}
	return "set cap_net_bind_service on " + bin, warn, nil
}

func (p *Pusher) bindDropIn(ctx context.Context, service string) (string, []string, error) {
	dirs := p.UnitDirs
	if dirs == nil {
		dirs = mmconfig.DefaultUnitDirs()
	}
	dir := filepath.Join(dirs[0], service+".service.d")
	if unitGrants(p.UnitDirs, service) {
		return "", nil, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", nil, fmt.Errorf("create drop-in directory: %w", err)
	}
	d, err := certs.OpenDir(dir)
	if err != nil {
		return "", nil, err
	}
	defer d.Close()
	if err := d.WriteFile(bindDropIn, []byte(bindDropInContent), certs.FileAttrs{UID: 0, GID: 0, Mode: 0o644}); err != nil {
		return "", nil, err
	}
	if err := SystemctlDaemonReload(ctx); err != nil {
		return "", nil, err
	}
	return "wrote " + filepath.Join(dir, bindDropIn), nil, nil
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
// anything.
func setBindCapability(path string) (bool, error) {
	// struct vfs_cap_data, revision 2: magic_etc, then permitted and
	// inheritable for capabilities 0-31 and 32-63.
	const (
		revision2 = 0x02000000
		effective = 0x000001
	)
	data := make([]byte, 20)
	n, err := unix.Getxattr(path, "security.capability", data)
	switch {
	case err == nil && n >= 12:
		data = data[:n]
	case err == nil || errors.Is(err, unix.ENODATA):
		data = make([]byte, 20)
	default:
		return false, fmt.Errorf("read security.capability: %w", err)
	}
	magic := binary.LittleEndian.Uint32(data[0:4])
	permitted := binary.LittleEndian.Uint32(data[4:8])
	if magic&effective != 0 && permitted&(1<<capNetBindService) != 0 {
		return false, nil
	}
	out := make([]byte, 20)
	copy(out, data)
	binary.LittleEndian.PutUint32(out[0:4], revision2|effective)
	binary.LittleEndian.PutUint32(out[4:8], permitted|1<<capNetBindService)
	if err := unix.Setxattr(path, "security.capability", out, 0); err != nil {
		return false, fmt.Errorf("write security.capability: %w", err)
	}
	return true, nil
}
