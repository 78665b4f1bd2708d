package push

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/mmtls/mmtls/mmconfig"
)

// Defaults of Options. Each is defined here once; the flags, the example
// config file, `mmtls config check` and the pipeline all read them from here.
const (
	// DefaultMattermostDir is where Mattermost's install guide unpacks it.
	DefaultMattermostDir = "/opt/mattermost"
	// DefaultStateDir is root's own directory for backups, the journal and
	// the lock: outside the tree the mattermost user owns.
	DefaultStateDir = "/var/lib/mmtls"
	// DefaultCertName and DefaultKeyName are certbot's names, which admins
	// recognise when they look in Mattermost's config directory.
	DefaultCertName = "fullchain.pem"
	DefaultKeyName  = "privkey.pem"
	// DefaultOwner is the user Mattermost's install guide runs it as.
	DefaultOwner = "mattermost"
	// DefaultService is the unit name of Mattermost's install guide.
	DefaultService = "mattermost"
	// DefaultListen is the https port: Office 365 / Entra ID redirect URIs
	// carry no port, so SiteURL is https://host, which is port 443.
	DefaultListen = mmconfig.DefaultListenAddress
	// DefaultLockTimeout covers another run's restart, verification and
	// rollback (DefaultRestartTimeout plus DefaultVerifyTimeout).
	DefaultLockTimeout = 5 * time.Minute
	// DefaultRestartTimeout covers Mattermost's graceful stop (which waits
	// for its own shutdown timeout) and a cold start.
	DefaultRestartTimeout = 2 * time.Minute
	// DefaultVerifyTimeout covers a large Mattermost's start: migrations,
	// plugins, the search index.
	DefaultVerifyTimeout = 3 * time.Minute
)

// Options are the inputs of one push. Each field is one `mmtls push` flag
// (the flag tag) and, except the source pair and the per-run switches, one
// key of the agent's config file's [push] section (the toml tag). Zero
// values take the documented defaults (see WithDefaults).
type Options struct {
	// CertFile and KeyFile are the source pair; required. The agent's
	// config names them in [source].
	CertFile string `toml:"-" flag:"cert" help:"certificate file: the leaf and its intermediates, PEM, any order (required)"`
	KeyFile  string `toml:"-" flag:"key" help:"private key file, PEM: PKCS#1, PKCS#8 or SEC1, unencrypted (required)"`

	// MattermostDir: "" means DefaultMattermostDir.
	MattermostDir string `toml:"mattermost_dir" flag:"mattermost-dir" help:"Mattermost's install directory"`
	// MMConfig: "" means found as Mattermost finds it.
	MMConfig string `toml:"mm_config" flag:"mm-config" help:"Mattermost's config.json (default: MM_CONFIG from its service, else <mattermost-dir>/config/config.json)"`
	// DestDir: "" means MattermostDir/config.
	DestDir string `toml:"dest_dir" flag:"dest-dir" help:"where to install the pair (default <mattermost-dir>/config)"`
	// CertName and KeyName: "" means DefaultCertName and DefaultKeyName.
	CertName string `toml:"cert_name" flag:"cert-name" help:"installed certificate file name"`
	KeyName  string `toml:"key_name" flag:"key-name" help:"installed key file name"`
	// Owner: "" means DefaultOwner. Group: "" means the owner's primary group.
	Owner string `toml:"owner" flag:"owner" help:"user that owns the installed files (the user Mattermost runs as)"`
	Group string `toml:"group" flag:"group" help:"group that owns the installed files (default: the owner's primary group)"`

	// Listen is ServiceSettings.ListenAddress; "" means DefaultListen.
	Listen string `toml:"listen" flag:"listen" help:"ServiceSettings.ListenAddress to set"`
	// SiteURL: "" leaves SiteURL as it is.
	SiteURL string `toml:"site_url" flag:"site-url" help:"set ServiceSettings.SiteURL too (must be https://)"`
	// CAFile: "" means the system roots.
	CAFile            string `toml:"ca_file" flag:"ca-file" help:"verify the chain against the roots in this PEM file instead of the system roots"`
	AllowHostMismatch bool   `toml:"allow_host_mismatch" flag:"allow-host-mismatch" help:"install even if the certificate does not cover SiteURL's host"`

	// StateDir: "" means DefaultStateDir.
	StateDir string `toml:"state_dir" flag:"state-dir" help:"mmtls's own root-owned directory for backups and the lock"`
	// LockTimeout: 0 means DefaultLockTimeout.
	LockTimeout time.Duration `toml:"lock_timeout" flag:"lock-timeout" help:"how long to wait for another mmtls run to finish"`

	// Service is the systemd unit Mattermost runs as: its environment is
	// what Mattermost sees, and it is what gets restarted (unless
	// RestartCommand is set). "" means DefaultService.
	Service string `toml:"service" flag:"service" help:"systemd unit Mattermost runs as: restarted with systemctl, and its environment read"`
	// RestartCommand, if set, restarts Mattermost instead of systemctl:
	// run with /bin/sh -c. Mutually exclusive with Service.
	RestartCommand string `toml:"restart_command" flag:"restart-command" help:"restart Mattermost with this command (run by /bin/sh -c) instead of systemctl"`
	// RestartTimeout bounds the restart. 0 means DefaultRestartTimeout.
	RestartTimeout time.Duration `toml:"restart_timeout" flag:"restart-timeout" help:"how long the restart may take"`
	// VerifyAddress is where to connect to verify (host:port). "" means
	// the listen address, with 127.0.0.1 for an empty or wildcard host.
	VerifyAddress string `toml:"verify_address" flag:"verify-address" help:"where to connect to verify, host:port (default: the listen address, on loopback)"`
	// VerifyTimeout bounds verification. 0 means DefaultVerifyTimeout.
	VerifyTimeout time.Duration `toml:"verify_timeout" flag:"verify-timeout" help:"how long Mattermost may take to serve the new certificate"`

	// NoRestart and DryRun are per run, never in the config file; the push
	// command declares their flags.
	NoRestart bool `toml:"-"`
	DryRun    bool `toml:"-"`
}

// WithDefaults returns o with every zero field set to its default.
func (o Options) WithDefaults() Options {
	def := func(s *string, v string) {
		if *s == "" {
			*s = v
		}
	}
	def(&o.MattermostDir, DefaultMattermostDir)
	def(&o.DestDir, filepath.Join(o.MattermostDir, "config"))
	def(&o.CertName, DefaultCertName)
	def(&o.KeyName, DefaultKeyName)
	def(&o.Owner, DefaultOwner)
	def(&o.Listen, DefaultListen)
	def(&o.StateDir, DefaultStateDir)
	if o.RestartCommand == "" {
		def(&o.Service, DefaultService)
	}
	setDefault(&o.LockTimeout, DefaultLockTimeout)
	setDefault(&o.RestartTimeout, DefaultRestartTimeout)
	setDefault(&o.VerifyTimeout, DefaultVerifyTimeout)
	return o
}

// setDefault sets *d to def when it is zero. Negative durations are refused
// by Validate before defaults apply, so zero is the only "unset".
func setDefault(d *time.Duration, def time.Duration) {
	if *d == 0 {
		*d = def
	}
}

// Validate checks the options on their own, before anything is read or
// touched. Every error names the flag and wraps ErrUsage.
func (o Options) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if o.CertFile == "" {
		bad("--cert is required: the certificate file (such as certbot's fullchain.pem)")
	}
	if o.KeyFile == "" {
		bad("--key is required: the private key file (such as certbot's privkey.pem)")
	}
	if o.CertFile != "" && o.CertFile == o.KeyFile {
		bad("--cert and --key name the same file %q; give the certificate and the key separately", o.CertFile)
	}
	for _, p := range []struct{ flag, path string }{{"--mattermost-dir", o.MattermostDir}, {"--dest-dir", o.DestDir}, {"--state-dir", o.StateDir}} {
		if p.path != "" && !filepath.IsAbs(p.path) {
			bad("%s %q: must be an absolute path", p.flag, p.path)
		}
	}
	for _, n := range []struct{ flag, name string }{{"--cert-name", o.CertName}, {"--key-name", o.KeyName}} {
		if n.name != "" && !plainName(n.name) {
			bad("%s %q: must be a plain file name, without slashes or a leading dot", n.flag, n.name)
		}
	}
	if o.CertName != "" && o.CertName == o.KeyName {
		bad("--cert-name and --key-name are both %q", o.CertName)
	}
	if o.SiteURL != "" && !strings.HasPrefix(o.SiteURL, "https://") {
		bad("--site-url %q: must start with https:// (Office 365 / Entra ID accepts only https redirect URIs)", o.SiteURL)
	}
	for _, d := range []struct {
		flag string
		d    time.Duration
	}{{"--lock-timeout", o.LockTimeout}, {"--restart-timeout", o.RestartTimeout}, {"--verify-timeout", o.VerifyTimeout}} {
		if d.d < 0 {
			bad("%s %s: must not be negative", d.flag, d.d)
		}
	}
	if o.Service != "" && o.RestartCommand != "" {
		bad("--service and --restart-command are mutually exclusive: give the systemd unit, or the command that restarts Mattermost")
	}
	if o.RestartCommand != "" && strings.TrimSpace(o.RestartCommand) == "" {
		bad("--restart-command is blank")
	}
	if o.NoRestart && o.RestartCommand != "" {
		bad("--no-restart and --restart-command contradict each other")
	}
	if o.VerifyAddress != "" {
		if _, _, err := net.SplitHostPort(o.VerifyAddress); err != nil {
			bad("--verify-address %q: want host:port (%v)", o.VerifyAddress, err)
		}
	}
	if o.Listen != "" {
		if _, port, err := net.SplitHostPort(o.Listen); err != nil || !validPort(port) {
			bad("--listen %q: want [host]:port with a numeric port, such as :443", o.Listen)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return usageErr(err)
	}
	return nil
}

// plainName reports whether n is a file name mmtls may create in a
// directory: no slashes, not "." or "..", no leading dot.
func plainName(n string) bool {
	return n != "" && !strings.ContainsRune(n, '/') && !strings.HasPrefix(n, ".")
}

// validPort reports whether s is a port number, as Mattermost parses
// ListenAddress (a service name such as "https" is refused there).
func validPort(s string) bool {
	n, err := strconv.Atoi(s)
	return err == nil && n >= 0 && n <= 65535
}
