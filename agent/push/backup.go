package push

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/mmtls/mmtls/certs"
	"github.com/mmtls/mmtls/mmconfig"
)

// Backup is one push's before-state, kept in the state directory: the pair
// that was installed (if there was one) and Mattermost's config as it was.
type Backup struct {
	Name string    `json:"name"`
	Dir  string    `json:"dir"`
	Time time.Time `json:"time"`
	// Certificate is the backed-up pair's leaf; nil when there was no pair
	// (the state before the first push: Mattermost on plain HTTP).
	Certificate *CertInfo `json:"certificate,omitempty"`
	CertFile    string    `json:"cert_file,omitempty"`
	KeyFile     string    `json:"key_file,omitempty"`
	// ListenAddress and ConnectionSecurity are the backed-up config's.
	ListenAddress      string `json:"listen_address,omitempty"`
	ConnectionSecurity string `json:"connection_security"`
	// Problem says why the backup cannot be restored, if it cannot.
	Problem string `json:"problem,omitempty"`
}

// ListBackups returns the backups in the state directory, oldest first.
func ListBackups(o Options) ([]Backup, error) {
	o = o.WithDefaults()
	root := filepath.Join(o.StateDir, "backups")
	entries, err := os.ReadDir(root)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("--state-dir: %w", err)
	}
	var out []Backup
	for _, e := range entries {
		if e.IsDir() {
			out = append(out, readBackup(o, filepath.Join(root, e.Name())))
		}
	}
	return out, nil
}

// FindBackup returns the backup named name (a name from ListBackups, or
// its directory), or the newest one when name is "": the state before the
// last push.
func FindBackup(o Options, name string) (Backup, error) {
	all, err := ListBackups(o)
	if err != nil {
		return Backup{}, err
	}
	if len(all) == 0 {
		return Backup{}, refused(fmt.Errorf("no backups in %s: a push keeps its before-state there", filepath.Join(o.WithDefaults().StateDir, "backups")))
	}
	if name == "" {
		return all[len(all)-1], nil
	}
	for _, b := range all {
		if b.Name == name || b.Dir == filepath.Clean(name) {
			return b, nil
		}
	}
	return Backup{}, usageErr(fmt.Errorf("backup %q: not in %s (mmtls restore --list shows them)", name, filepath.Dir(all[0].Dir)))
}

// readBackup describes the backup in dir.
func readBackup(o Options, dir string) Backup {
	b := Backup{Name: filepath.Base(dir), Dir: dir}
	stamp, _, _ := strings.Cut(b.Name, "-")
	b.Time, _ = time.Parse("20060102T150405.000000000Z", stamp)
	doc, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		b.Problem = "no config.json (made before backups held the whole state)"
	} else if ss, err := mmconfig.Effective(doc); err != nil {
		b.Problem = fmt.Sprintf("config.json: %v", err)
	} else {
		b.ListenAddress, b.ConnectionSecurity = *ss.ListenAddress, *ss.ConnectionSecurity
	}
	certFile, keyFile := filepath.Join(dir, o.CertName), filepath.Join(dir, o.KeyName)
	_, certErr := os.Stat(certFile)
	_, keyErr := os.Stat(keyFile)
	switch {
	case certErr != nil && keyErr != nil:
		if b.Problem == "" {
			b.Problem = "no certificate and key: the state before the first push, Mattermost on plain HTTP; restore does not turn TLS off"
		}
	case certErr != nil || keyErr != nil:
		b.Problem = "holds only one of " + o.CertName + " and " + o.KeyName
	default:
		pair, err := certs.LoadPair(certFile, keyFile)
		if err != nil {
			b.Problem = err.Error()
			break
		}
		info := CertInfoOf(pair)
		b.Certificate, b.CertFile, b.KeyFile = &info, certFile, keyFile
	}
	return b
}

// PushOptions returns o set to put the backup's pair and listen address
// back through an ordinary push: validated, installed, restarted, verified
// and rolled back on failure like any other.
func (b Backup) PushOptions(o Options) (Options, error) {
	if b.Problem != "" {
		return o, refused(fmt.Errorf("backup %s cannot be restored: %s", b.Name, b.Problem))
	}
	o.CertFile, o.KeyFile = b.CertFile, b.KeyFile
	if b.ConnectionSecurity == "TLS" && b.ListenAddress != "" {
		o.Listen = b.ListenAddress
	}
	return o, nil
}
