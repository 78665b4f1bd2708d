package agent

import (
	"errors"
	"fmt"
	"path/filepath"
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

	// Service is the systemd unit whose environment Mattermost sees (and,
	// later, that is restarted). "" means DefaultService.
	Service string

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
	def(&o.Service, DefaultService)
	if o.LockTimeout == 0 {
		o.LockTimeout = DefaultLockTimeout
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
	if o.LockTimeout < 0 {
		bad("--lock-timeout %s: must not be negative", o.LockTimeout)
	}
	if err := errors.Join(errs...); err != nil {
		return usage(err)
	}
	return nil
}
