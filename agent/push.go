package agent

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"time"

	"github.com/mmtls/mmtls/certs"
	"github.com/mmtls/mmtls/mmconfig"
)

// maxConfigSize bounds config.json reads; real ones are tens of KiB.
const maxConfigSize = 16 << 20

// Pusher runs pushes. Its fields are its dependencies; the zero value uses
// the real clock, the real systemd unit directories and discards logs. A
// Pusher is safe for concurrent use: the state-directory lock serialises
// pushes, across processes too.
type Pusher struct {
	// Logger receives progress and warnings. Nil discards.
	Logger *slog.Logger
	// Now is the clock certificates are validated against. Nil means time.Now.
	Now func() time.Time
	// UnitDirs is where the Mattermost service's unit is looked up. Nil
	// means systemd's own directories.
	UnitDirs []string
}

func (p *Pusher) log() *slog.Logger {
	if p.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return p.Logger
}

func (p *Pusher) now() time.Time {
	if p.Now == nil {
		return time.Now()
	}
	return p.Now()
}

// Status is the overall outcome of a push that did not fail.
type Status string

// Statuses.
const (
	StatusPlanned   Status = "planned"   // --dry-run: nothing was changed
	StatusUnchanged Status = "unchanged" // everything was already in place
	StatusChanged   Status = "changed"   // files or config were written
)

// Result reports a push: what was planned and what was done.
type Result struct {
	Status      Status             `json:"status"`
	Certificate CertInfo           `json:"certificate"`
	SiteURL     string             `json:"site_url"`
	SiteOrigin  string             `json:"site_url_origin"`
	Files       []certs.FileResult `json:"files"`
	Owner       string             `json:"owner"`
	Mode        string             `json:"mode"`
	Config      ConfigResult       `json:"config"`
	BackupDir   string             `json:"backup_dir,omitempty"`
	Warnings    []certs.Warning    `json:"warnings,omitempty"`
}

// CertInfo describes the leaf being pushed.
type CertInfo struct {
	Subject        string    `json:"subject"`
	Issuer         string    `json:"issuer"`
	DNSNames       []string  `json:"dns_names"`
	NotAfter       time.Time `json:"not_after"`
	Fingerprint    string    `json:"fingerprint"`
	KeyFingerprint string    `json:"key_fingerprint"`
	ChainLength    int       `json:"chain_length"`
}

// ConfigResult describes the Mattermost config edit.
type ConfigResult struct {
	Path    string            `json:"path"`
	Origin  string            `json:"origin"`
	Changes []mmconfig.Change `json:"changes"`
}

// plan is everything a push decided before touching anything.
type plan struct {
	o        PushOptions
	pair     *certs.Pair
	loc      mmconfig.Location
	cfgDoc   []byte
	tls      mmconfig.TLS
	uid, gid int
	install  *certs.InstallResult // a dry run
	res      *Result
}

// Push validates the pair, plans the install and the config edit, and unless
// DryRun carries them out. Input that is refused leaves everything as it
// was and returns an error wrapping ErrRefused.
func (p *Pusher) Push(ctx context.Context, o PushOptions) (*Result, error) {
	o = o.WithDefaults()
	if err := o.Validate(); err != nil {
		return nil, err
	}
	log := p.log()
	if !o.DryRun {
		if err := stateDir(o.StateDir); err != nil {
			return nil, err
		}
		lock, err := acquireLock(ctx, filepath.Join(o.StateDir, "lock"), o.LockTimeout, log)
		if err != nil {
			return nil, err
		}
		defer lock.release()
	}
	pl, err := p.plan(ctx, o)
	if err != nil {
		return nil, err
	}
	res := pl.res
	for _, w := range res.Warnings {
		log.Warn(w.Message, "code", w.Code)
	}
	switch {
	case o.DryRun:
		res.Status = StatusPlanned
		return res, nil
	case !pl.install.Changed && len(res.Config.Changes) == 0:
		res.Status = StatusUnchanged
		log.Info("nothing to do: certificate, key and config already in place", "fingerprint", res.Certificate.Fingerprint)
		return res, nil
	}
	if err := p.apply(ctx, pl); err != nil {
		return nil, err
	}
	res.Status = StatusChanged
	return res, nil
}

// plan reads and checks everything, and writes nothing.
func (p *Pusher) plan(ctx context.Context, o PushOptions) (*plan, error) {
	pl := &plan{o: o, res: &Result{}}
	res := pl.res

	env, err := mmconfig.LoadServiceEnv(o.Service+".service", p.UnitDirs)
	if err != nil {
		return nil, refused(fmt.Errorf("read the %s service's environment: %w", o.Service, err))
	}
	pl.loc, err = mmconfig.Locate(o.MMConfig, env, o.MattermostDir)
	if err != nil {
		return nil, refused(err)
	}
	res.Config = ConfigResult{Path: pl.loc.Path, Origin: pl.loc.Origin}
	pl.cfgDoc, _, err = readConfig(pl.loc.Path)
	if err != nil {
		return nil, refused(err)
	}

	host, err := siteHost(pl, env)
	if err != nil {
		return nil, refused(err)
	}

	pl.uid, pl.gid, err = lookupOwner(o.Owner, o.Group)
	if err != nil {
		return nil, refused(err)
	}
	res.Owner = fmt.Sprintf("%s:%s (%d:%d)", o.Owner, groupName(o.Group, pl.gid), pl.uid, pl.gid)
	res.Mode = fmt.Sprintf("%04o", certs.DefaultMode)

	pair, err := certs.LoadPair(o.CertFile, o.KeyFile)
	if err != nil {
		return nil, refused(err)
	}
	pl.pair = pair
	res.Certificate = certInfo(pair)
	pol := certs.Policy{Now: p.now(), Hosts: []string{host}, AllowHostMismatch: o.AllowHostMismatch}
	if o.CAFile != "" {
		pol.Roots, err = loadRoots(o.CAFile)
		if err != nil {
			return nil, usage(err)
		}
		pol.RootsName = fmt.Sprintf("the roots in --ca-file %q", o.CAFile)
	}
	warns, err := certs.Validate(pair, pol)
	res.Warnings = append(res.Warnings, warns...)
	if err != nil {
		return nil, refused(fmt.Errorf("%w%s", err, validationHint(err)))
	}

	pl.tls = mmconfig.TLS{
		ListenAddress: o.Listen,
		CertFile:      filepath.Join(o.DestDir, o.CertName),
		KeyFile:       filepath.Join(o.DestDir, o.KeyName),
		SiteURL:       o.SiteURL,
	}
	if err := checkOverrides(env, pl.tls, &res.Warnings); err != nil {
		return nil, refused(err)
	}
	newDoc, changes, err := mmconfig.Edit(pl.cfgDoc, pl.tls.Settings())
	if err != nil {
		return nil, refused(fmt.Errorf("mattermost config %q: %w", pl.loc.Path, err))
	}
	if err := mmconfig.Check(pl.cfgDoc, newDoc, []string{pl.tls.CertFile, pl.tls.KeyFile}); err != nil {
		return nil, refused(fmt.Errorf("mattermost config %q after the edit: %w", pl.loc.Path, err))
	}
	res.Config.Changes = changes
	for _, c := range changes {
		if c.Key == "ServiceSettings.UseLetsEncrypt" {
			res.Warnings = append(res.Warnings, certs.Warning{Code: "letsencrypt-off",
				Message: "ServiceSettings.UseLetsEncrypt was on; it is turned off, since Mattermost ignores TLSCertFile and TLSKeyFile while it is on"})
		}
	}

	pl.install, err = certs.Install(ctx, pl.installRequest(true, ""))
	if err != nil {
		return nil, refused(fmt.Errorf("destination: %w", err))
	}
	res.Files = pl.install.Files
	return pl, nil
}

func (pl *plan) installRequest(dryRun bool, backupDir string) certs.InstallRequest {
	return certs.InstallRequest{
		Dir: pl.o.DestDir,
		Files: []certs.File{
			{Name: pl.o.CertName, Data: pl.pair.CertPEM},
			{Name: pl.o.KeyName, Data: pl.pair.KeyPEM},
		},
		UID:       pl.uid,
		GID:       pl.gid,
		BackupDir: backupDir,
		DryRun:    dryRun,
	}
}

// siteHost works out the SiteURL clients (and Entra ID) will use, records it
// in the result and returns its host.
func siteHost(pl *plan, env *mmconfig.ServiceEnv) (string, error) {
	res := pl.res
	fromFile, err := mmconfig.LookupString(pl.cfgDoc, mmconfig.Section, "SiteURL")
	if err != nil {
		return "", fmt.Errorf("mattermost config %q: %w", pl.loc.Path, err)
	}
	site, origin := fromFile, pl.loc.Path
	if v, ok := env.Override(mmconfig.Section, "SiteURL"); ok {
		site, origin = v.Value, v.Name+" in "+v.Source
		if pl.o.SiteURL != "" && pl.o.SiteURL != v.Value {
			return "", fmt.Errorf("--site-url %q would be ignored: the %s service's environment sets %s=%q (%s), which wins over config.json; change it there",
				pl.o.SiteURL, pl.o.Service, v.Name, v.Value, v.Source)
		}
	}
	if pl.o.SiteURL != "" {
		site, origin = pl.o.SiteURL, "--site-url"
	}
	res.SiteURL, res.SiteOrigin = site, origin
	if site == "" {
		return "", fmt.Errorf("ServiceSettings.SiteURL is empty in %q; Office 365 / Entra ID SSO needs it: pass --site-url https://chat.example.com", pl.loc.Path)
	}
	u, err := url.Parse(site)
	if err != nil || u.Host == "" {
		return "", fmt.Errorf("SiteURL %q (from %s) is not an absolute URL; pass --site-url https://chat.example.com", site, origin)
	}
	if u.Scheme != "https" {
		return "", fmt.Errorf("SiteURL %q (from %s) is not https: Office 365 / Entra ID accepts only an https redirect URI, "+
			"and it must equal SiteURL + /signup/office365/complete, so SSO cannot work with it; pass --site-url https://%s to change it in this push",
			site, origin, u.Host)
	}
	return u.Hostname(), nil
}

// checkOverrides refuses service-environment variables that would silently
// override what mmtls writes to config.json.
func checkOverrides(env *mmconfig.ServiceEnv, t mmconfig.TLS, warns *[]certs.Warning) error {
	var errs []error
	for _, s := range t.Settings() {
		v, ok := env.Override(s.Section, s.Key)
		if !ok {
			continue
		}
		if fmt.Sprint(s.Value) == v.Value {
			*warns = append(*warns, certs.Warning{Code: "env-override",
				Message: fmt.Sprintf("%s=%q (%s) overrides %s; it agrees with mmtls now, but later changes to config.json will not take effect", v.Name, v.Value, v.Source, s.Name())})
			continue
		}
		errs = append(errs, fmt.Errorf("%s=%q in Mattermost's service environment (%s) overrides %s, so the %q mmtls would write to config.json would be ignored; remove it from that file",
			v.Name, v.Value, v.Source, s.Name(), fmt.Sprint(s.Value)))
	}
	return errors.Join(errs...)
}

func validationHint(err error) string {
	switch {
	case errors.Is(err, certs.ErrHostMismatch):
		return " (pass --allow-host-mismatch to push anyway, or --site-url to change SiteURL)"
	case errors.Is(err, certs.ErrUntrusted):
		return " (for a private CA, pass its root certificate with --ca-file)"
	}
	return ""
}

// apply installs the pair and edits the config. If the config cannot be
// written, the previous pair is put back.
func (p *Pusher) apply(ctx context.Context, pl *plan) error {
	log := p.log()
	backupDir, err := newBackupDir(pl.o.StateDir, p.now())
	if err != nil {
		return err
	}
	pl.res.BackupDir = backupDir
	req := pl.installRequest(false, backupDir)
	req.Logger = log
	inst, err := certs.Install(ctx, req)
	if err != nil {
		return err
	}
	pl.res.Files = inst.Files
	if inst.Changed {
		log.Info("installed certificate and key", "dir", pl.o.DestDir, "fingerprint", pl.res.Certificate.Fingerprint)
	}
	changes, err := p.writeConfig(pl, backupDir)
	if err != nil {
		if rbErr := certs.Restore(ctx, pl.o.DestDir, inst.Files); rbErr != nil {
			return &outcome{kind: ErrRollbackFailed, err: fmt.Errorf("%w; putting the previous certificate and key back failed too, so %s holds the new pair while the config is unchanged: %w",
				err, pl.o.DestDir, rbErr)}
		}
		return fmt.Errorf("%w (the previous certificate and key were put back)", err)
	}
	pl.res.Config.Changes = changes
	if len(changes) > 0 {
		log.Info("updated mattermost config", "path", pl.loc.Path, "changes", len(changes))
	}
	return nil
}

var errConfigChanged = errors.New("config changed while being edited")

// writeConfig applies the edit to config.json, keeping its owner, mode and
// extended attributes. If the file changes between read and rename (a
// System Console save), the edit is applied again to the new content.
func (p *Pusher) writeConfig(pl *plan, backupDir string) ([]mmconfig.Change, error) {
	path := pl.loc.Path
	d, err := certs.OpenDir(filepath.Dir(path))
	if err != nil {
		return nil, fmt.Errorf("mattermost config: %w", err)
	}
	defer d.Close()
	name := filepath.Base(path)
	backedUp := false
	for attempt := 0; ; attempt++ {
		doc, st, err := d.ReadFile(name, maxConfigSize)
		if err != nil {
			return nil, fmt.Errorf("mattermost config: %w", err)
		}
		newDoc, changes, err := mmconfig.Edit(doc, pl.tls.Settings())
		if err != nil {
			return nil, fmt.Errorf("mattermost config %q: %w", path, err)
		}
		if len(changes) == 0 {
			return nil, nil
		}
		if err := mmconfig.Check(doc, newDoc, nil); err != nil {
			return nil, fmt.Errorf("mattermost config %q after the edit: %w", path, err)
		}
		if !backedUp {
			if err := os.WriteFile(filepath.Join(backupDir, "config.json"), doc, 0o600); err != nil {
				return nil, fmt.Errorf("back up mattermost config: %w", err)
			}
			backedUp = true
		}
		err = d.ReplaceFile(name, newDoc, st.FileAttrs, func() error {
			cur, _, err := d.ReadFile(name, maxConfigSize)
			if err != nil {
				return err
			}
			if !bytes.Equal(cur, doc) {
				return errConfigChanged
			}
			return nil
		})
		if errors.Is(err, errConfigChanged) && attempt < 5 {
			p.log().Info("mattermost config changed while being edited; applying the edit again", "path", path)
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("write mattermost config: %w", err)
		}
		return changes, nil
	}
}

// readConfig reads config.json without following a link planted in its
// directory, which the mattermost user can write.
func readConfig(path string) ([]byte, *certs.FileState, error) {
	d, err := certs.OpenDir(filepath.Dir(path))
	if err != nil {
		return nil, nil, fmt.Errorf("mattermost config: %w", err)
	}
	defer d.Close()
	doc, st, err := d.ReadFile(filepath.Base(path), maxConfigSize)
	if errors.Is(err, certs.ErrUntrustedFile) {
		return nil, nil, fmt.Errorf("mattermost config: %w; mmtls does not follow links in a directory the mattermost user can write: pass the real file with --mm-config", err)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("mattermost config: %w", err)
	}
	return doc, st, nil
}

// newBackupDir makes a fresh directory for this push's backups and prunes
// the oldest beyond keepBackups.
func newBackupDir(state string, now time.Time) (string, error) {
	root := filepath.Join(state, "backups")
	if err := os.MkdirAll(root, 0o700); err != nil {
		return "", fmt.Errorf("create backup directory: %w", err)
	}
	dir, err := os.MkdirTemp(root, now.UTC().Format("20060102T150405Z")+"-")
	if err != nil {
		return "", fmt.Errorf("create backup directory: %w", err)
	}
	pruneBackups(root, keepBackups)
	return dir, nil
}

// keepBackups is how many push backups the state directory keeps.
const keepBackups = 10

func pruneBackups(root string, keep int) {
	entries, err := os.ReadDir(root)
	if err != nil || len(entries) <= keep {
		return
	}
	// Names start with a UTC timestamp, so ReadDir's order is age order.
	for _, e := range entries[:len(entries)-keep] {
		os.RemoveAll(filepath.Join(root, e.Name()))
	}
}

func lookupOwner(owner, group string) (int, int, error) {
	u, err := user.Lookup(owner)
	if err != nil {
		if _, numErr := strconv.Atoi(owner); numErr == nil {
			u, err = user.LookupId(owner)
			if err != nil {
				u = &user.User{Uid: owner, Gid: owner}
				err = nil
			}
		}
	}
	if err != nil {
		return 0, 0, fmt.Errorf("--owner %q: %w; create the user Mattermost runs as, or pass --owner", owner, err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if group != "" {
		g, err := user.LookupGroup(group)
		if err != nil {
			if n, numErr := strconv.Atoi(group); numErr == nil {
				return uid, n, nil
			}
			return 0, 0, fmt.Errorf("--group %q: %w", group, err)
		}
		gid, _ = strconv.Atoi(g.Gid)
	}
	return uid, gid, nil
}

func groupName(group string, gid int) string {
	if group != "" {
		return group
	}
	if g, err := user.LookupGroupId(strconv.Itoa(gid)); err == nil {
		return g.Name
	}
	return strconv.Itoa(gid)
}

func loadRoots(path string) (*x509.CertPool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--ca-file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("--ca-file %q holds no PEM certificate", path)
	}
	return pool, nil
}

func certInfo(p *certs.Pair) CertInfo {
	leaf := p.Leaf()
	kfp, _ := certs.PublicKeyFingerprint(leaf.PublicKey)
	names := leaf.DNSNames
	for _, ip := range leaf.IPAddresses {
		names = append(names, ip.String())
	}
	return CertInfo{
		Subject:        leaf.Subject.String(),
		Issuer:         leaf.Issuer.String(),
		DNSNames:       names,
		NotAfter:       leaf.NotAfter.UTC(),
		Fingerprint:    certs.Fingerprint(leaf),
		KeyFingerprint: kfp,
		ChainLength:    len(p.Chain),
	}
}
