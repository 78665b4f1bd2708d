package agent

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Defaults for PushOptions.
const (
	DefaultMattermostDir = "/opt/mattermost"
	DefaultStateDir      = "/var/lib/mmtls"
	DefaultCertName      = "fullchain.pem"
	DefaultKeyName       = "privkey.pem"
	DefaultOwner         = "mattermost"
	DefaultService       = "mattermost"
	DefaultLockTimeout   = 5 * time.Minute
)

// PushOptions are the inputs of one push, one field per `mmtls push` flag.
// Zero values take the documented defaults (see WithDefaults).
type PushOptions struct {
	CertFile string // --cert; required
	KeyFile  string // --key; required

	MattermostDir string // --mattermost-dir; "" means DefaultMattermostDir
	MMConfig      string // --mm-config; "" means found as Mattermost finds it
	DestDir       string // --dest-dir; "" means MattermostDir/config
	CertName      string // --cert-name; "" means DefaultCertName
	KeyName       string // --key-name; "" means DefaultKeyName
	Owner         string // --owner; "" means DefaultOwner
	Group         string // --group; "" means the owner's primary group

	Listen            string // --listen; "" means ":443"
	SiteURL           string // --site-url; "" leaves SiteURL as it is
	CAFile            string // --ca-file; "" means the system roots
	AllowHostMismatch bool   // --allow-host-mismatch

	StateDir    string        // --state-dir; "" means DefaultStateDir
	LockTimeout time.Duration // --lock-timeout; 0 means DefaultLockTimeout

	// Service is the systemd unit Mattermost runs as: its environment is
	// what Mattermost sees, and it is what gets restarted (unless
	// RestartCommand is set). "" means DefaultService.
	Service string
	// RestartCommand, if set, restarts Mattermost instead of systemctl:
	// run with /bin/sh -c. Mutually exclusive with Service.
	RestartCommand string
	// RestartTimeout bounds the restart. 0 means DefaultRestartTimeout.
	RestartTimeout time.Duration
	// VerifyAddress is where to connect to verify (host:port). "" means
	// the listen address, with 127.0.0.1 for an empty or wildcard host.
	VerifyAddress string
	// VerifyTimeout bounds verification. 0 means DefaultVerifyTimeout.
	VerifyTimeout time.Duration

	NoRestart bool // --no-restart
	DryRun    bool // --dry-run
}

// WithDefaults returns o with every zero field set to its default.
func (o PushOptions) WithDefaults() PushOptions {
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
	def(&o.StateDir, DefaultStateDir)
	if o.RestartCommand == "" {
		def(&o.Service, DefaultService)
	}
	if o.LockTimeout == 0 {
		o.LockTimeout = DefaultLockTimeout
	}
	if o.RestartTimeout == 0 {
		o.RestartTimeout = DefaultRestartTimeout
	}
	if o.VerifyTimeout == 0 {
		o.VerifyTimeout = DefaultVerifyTimeout
	}
	return o
}

// Validate checks the options on their own, before anything is read or
// touched. Every error names the flag and wraps ErrUsage.
func (o PushOptions) Validate() error {
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
	for flag, p := range map[string]string{"--mattermost-dir": o.MattermostDir, "--dest-dir": o.DestDir, "--state-dir": o.StateDir} {
		if p != "" && !filepath.IsAbs(p) {
			bad("%s %q: must be an absolute path", flag, p)
		}
	}
	for flag, n := range map[string]string{"--cert-name": o.CertName, "--key-name": o.KeyName} {
		if n != "" && (strings.ContainsRune(n, '/') || n == "." || n == ".." || strings.HasPrefix(n, ".")) {
			bad("%s %q: must be a plain file name, without slashes or a leading dot", flag, n)
		}
	}
	if o.CertName != "" && o.CertName == o.KeyName {
		bad("--cert-name and --key-name are both %q", o.CertName)
	}
	if o.SiteURL != "" && !strings.HasPrefix(o.SiteURL, "https://") {
		bad("--site-url %q: must start with https:// (Office 365 / Entra ID accepts only https redirect URIs)", o.SiteURL)
	}
	for flag, d := range map[string]time.Duration{"--lock-timeout": o.LockTimeout, "--restart-timeout": o.RestartTimeout, "--verify-timeout": o.VerifyTimeout} {
		if d < 0 {
			bad("%s %s: must not be negative", flag, d)
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
		if _, port, err := net.SplitHostPort(o.Listen); err != nil || !isNumber(port) {
			bad("--listen %q: want [host]:port with a numeric port, such as :443", o.Listen)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return usage(err)
	}
	return nil
}

func isNumber(s string) bool {
	n, err := strconv.Atoi(s)
	return err == nil && n >= 0 && n <= 65535
}
