package push

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mmtls/mmtls/certs"
	"github.com/mmtls/mmtls/mmconfig"
)

// plan is everything a push decided before touching anything.
type plan struct {
	o        Options
	pair     *certs.Pair
	loc      mmconfig.Location
	cfgDoc   []byte
	cfgState *certs.FileState
	tls      mmconfig.TLS
	uid, gid int
	install  *certs.InstallResult // a dry run
	res      *Result
	env      *mmconfig.ServiceEnv
	// A database store: the drop-in that enrols the node (its path, its
	// content now, nil when absent, and what the push writes), and the
	// service environment without it (what else sets the owned keys).
	dropIn    string
	localMode string // the local-mode socket, when set through it
	dropInOld []byte
	dropInNew []byte
	envOthers *mmconfig.ServiceEnv
	host      string      // SiteURL's host
	newExp    Expectation // what Mattermost serves once the push is done
	oldExp    Expectation // what it served before (per the config on disk)
}

// prepare reads and checks everything, and writes nothing.
func (p *Pusher) prepare(ctx context.Context, o Options) (*plan, error) {
	pl := &plan{o: o, res: &Result{}}
	res := pl.res

	env, err := mmconfig.LoadServiceEnv(o.Service+".service", p.UnitDirs)
	if err != nil {
		return nil, refused(fmt.Errorf("read the %s service's environment: %w", o.Service, err))
	}
	pl.env = env
	pl.loc, err = mmconfig.Locate(o.MMConfig, env, o.MattermostDir)
	if err != nil {
		return nil, refused(err)
	}
	pl.uid, pl.gid, err = lookupOwner(o.Owner, o.Group)
	if err != nil {
		return nil, refused(err)
	}
	pl.envOthers = env
	if pl.loc.DSN != "" {
		if err := p.prepareDatabase(ctx, pl); err != nil {
			return nil, err
		}
		env = pl.envOthers
	} else if pl.cfgDoc, pl.cfgState, err = readConfig(pl.loc.Path); err != nil {
		return nil, refused(err)
	}
	res.Config = ConfigResult{Path: pl.loc.Path, Origin: pl.loc.Origin}
	if pl.loc.DSN == "" && pl.loc.Untrusted && pl.cfgState.UID != pl.uid {
		// MM_CONFIG came from a file the mattermost user can change: it
		// must not make root edit a file that is not the mattermost user's.
		return nil, refused(fmt.Errorf("mattermost config %q, named by %s, is owned by uid %d, not by %s (uid %d): "+
			"a file that %s can change may only point mmtls at the mattermost user's own config; set MM_CONFIG in a root-owned file, or pass --mm-config",
			pl.loc.Path, pl.loc.Origin, pl.cfgState.UID, o.Owner, pl.uid, o.Owner))
	}

	host, err := siteHost(pl, env)
	if err != nil {
		return nil, refused(err)
	}
	pl.host = host

	res.Owner = fmt.Sprintf("%s:%s (%d:%d)", o.Owner, groupName(o.Group, pl.gid), pl.uid, pl.gid)
	res.Mode = fmt.Sprintf("%04o", certs.DefaultMode)

	pair, err := certs.LoadPair(o.CertFile, o.KeyFile)
	if errors.Is(err, fs.ErrNotExist) {
		for _, f := range []struct{ flag, path string }{{"--cert", o.CertFile}, {"--key", o.KeyFile}} {
			if _, serr := os.Stat(f.path); errors.Is(serr, fs.ErrNotExist) {
				return nil, refused(fmt.Errorf("%s %q: no such file (a typo? certbot names them fullchain.pem and privkey.pem)", f.flag, f.path))
			}
		}
	}
	if err != nil {
		return nil, refused(err)
	}
	pl.pair = pair
	res.Certificate = CertInfoOf(pair)
	pol := certs.Policy{Now: p.now(), Hosts: []string{host}, AllowHostMismatch: o.AllowHostMismatch}
	if o.CAFile != "" {
		pol.Roots, err = certs.LoadRoots(o.CAFile)
		if err != nil {
			return nil, usageErr(fmt.Errorf("--ca-file: %w", err))
		}
		pol.RootsName = fmt.Sprintf("the roots in --ca-file %q", o.CAFile)
	}
	warns, err := certs.Validate(pair, pol)
	res.Warnings = append(res.Warnings, warns...)
	if err != nil {
		return nil, refused(fmt.Errorf("%w%s", err, validationHint(err, o)))
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
	if pl.dropIn != "" {
		if pl.dropInNew, err = mmconfig.RenderDropIn(pl.tls.Settings()); err != nil {
			return nil, refused(err)
		}
		if bytes.Equal(pl.dropInNew, pl.dropInOld) {
			changes = nil // enrolled: a renewal changes no setting
		}
	}
	if err := mmconfig.Check(pl.cfgDoc, newDoc, []string{pl.tls.CertFile, pl.tls.KeyFile}); err != nil {
		return nil, refused(fmt.Errorf("mattermost config %q after the edit: %w", pl.loc.Path, err))
	}
	res.Config.Changes = changes
	for _, c := range changes {
		if c.Key == "ServiceSettings.UseLetsEncrypt" && string(c.Old) == "true" {
			res.Warnings = append(res.Warnings, certs.Warning{Code: "letsencrypt-off",
				Message: "ServiceSettings.UseLetsEncrypt was on; it is turned off, since Mattermost ignores TLSCertFile and TLSKeyFile while it is on"})
		}
	}

	pl.install, err = certs.Install(ctx, pl.installRequest(true, ""))
	if err != nil {
		return nil, refused(fmt.Errorf("destination: %w", err))
	}
	res.Files = pl.install.Files
	if err := pl.expectations(newDoc); err != nil {
		return nil, refused(err)
	}
	return pl, nil
}

// expectations works out what a verified Mattermost serves after the push,
// and what it served before it, from the config on disk.
func (pl *plan) expectations(newDoc []byte) error {
	o := pl.o
	newSS, err := mmconfig.Effective(newDoc)
	if err != nil {
		return err
	}
	addr := o.VerifyAddress
	if addr == "" {
		addr = dialAddr(*newSS.ListenAddress)
	}
	pl.newExp = Expectation{
		Addr:          addr,
		TLS:           true,
		ServerName:    pl.host,
		Leaf:          certs.Fingerprint(pl.pair.Leaf()),
		CAFile:        o.CAFile,
		SkipHostCheck: o.AllowHostMismatch,
		PingPath:      pingPath(*newSS.SiteURL),
	}

	oldSS, err := mmconfig.Effective(pl.cfgDoc)
	if err != nil {
		return err
	}
	old := Expectation{
		Addr:           dialAddr(*oldSS.ListenAddress),
		TLS:            *oldSS.ConnectionSecurity == "TLS",
		ServerName:     pl.host,
		SkipChainCheck: true,
		PingPath:       pingPath(*oldSS.SiteURL),
	}
	if o.VerifyAddress != "" && *oldSS.ListenAddress == *newSS.ListenAddress {
		old.Addr = o.VerifyAddress
	}
	if old.TLS {
		old.Leaf = currentLeaf(*oldSS.TLSCertFile)
	}
	pl.oldExp = old
	return nil
}

// dialAddr turns a ListenAddress into an address to connect to: loopback
// for an empty or wildcard host.
func dialAddr(listen string) string {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return listen
	}
	switch host {
	case "", "0.0.0.0":
		host = "127.0.0.1"
	case "::":
		host = "::1"
	}
	return net.JoinHostPort(host, port)
}

func pingPath(siteURL string) string {
	prefix := ""
	if u, err := url.Parse(siteURL); err == nil {
		prefix = strings.TrimRight(u.Path, "/")
	}
	return prefix + "/api/v4/system/ping"
}

// currentLeaf returns the fingerprint of the leaf in the certificate file
// Mattermost is configured with, or "" if it cannot be read.
func currentLeaf(path string) string {
	if !filepath.IsAbs(path) {
		return ""
	}
	d, err := certs.OpenDir(filepath.Dir(path))
	if err != nil {
		return ""
	}
	defer d.Close()
	data, _, err := d.ReadFile(filepath.Base(path), certs.MaxFileSize)
	if err != nil {
		return ""
	}
	leaf, err := certs.FirstCertificate(data)
	if err != nil {
		return ""
	}
	return certs.Fingerprint(leaf)
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
	if pl.loc.DSN != "" {
		origin = "the database store " + mmconfig.RedactDSN(pl.loc.DSN)
	}
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
		if env.DropIn != "" {
			// A database store: mmtls's drop-in sets it; any other value
			// set elsewhere, winning or not, would fight it.
			for _, v := range env.Vars {
				if strings.EqualFold(v.Name, s.EnvName()) && fmt.Sprint(s.Value) != v.Value {
					errs = append(errs, fmt.Errorf("%s=%q (%s) sets %s too, differently from mmtls's drop-in %s; remove it from that file",
						v.Name, v.Value, v.Source, s.Name(), env.DropIn))
				}
			}
			continue
		}
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

// prepareDatabase reads a database store's active configuration (read
// only), layered with the node's environment overrides, and plans the
// systemd drop-in that enrols the node: the shared configuration is never
// written, and a renewal changes nothing but the files.
func (p *Pusher) prepareDatabase(ctx context.Context, pl *plan) error {
	o, env := pl.o, pl.env
	doc, err := mmconfig.ReadDatabase(ctx, pl.loc.DSN)
	if err != nil {
		return refused(fmt.Errorf("%w (MM_CONFIG %s)", err, mmconfig.RedactDSN(pl.loc.DSN)))
	}
	if pl.cfgDoc, err = mmconfig.Layered(doc, env); err != nil {
		return refused(err)
	}
	if o.RestartCommand != "" || env.Unit == "" {
		// No systemd unit to enrol: Mattermost's own API, which saves the
		// shared configuration and tells the cluster.
		sock, err := mmconfig.LocalModeSocket(pl.cfgDoc)
		if err != nil {
			return refused(fmt.Errorf("Mattermost keeps its config in the database (%s) and is not run by systemd here: %w; "+
				"or run Mattermost under systemd, where mmtls enrols the node with a drop-in for this node alone", pl.loc.Origin, err))
		}
		// The socket's path comes from a configuration the mattermost user
		// can change: root talks only to a socket owned by the owner of
		// Mattermost's directory, as the one Mattermost creates is, never
		// to another service's.
		if err := ownedSocket(sock, o.MattermostDir); err != nil {
			return refused(fmt.Errorf("Mattermost's local-mode socket (ServiceSettings.LocalModeSocketLocation): %w", err))
		}
		pl.localMode = sock
		pl.loc.Path = sock
		pl.loc.Origin += ", set through Mattermost's local-mode API"
		return nil
	}
	pl.dropIn = mmconfig.TLSDropInPath(p.UnitDirs, o.Service)
	pl.loc.Path = pl.dropIn
	pl.loc.Origin += ", enrolled by a systemd drop-in"
	d, err := certs.OpenDir(filepath.Dir(pl.dropIn))
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return refused(fmt.Errorf("drop-in %s: %w", pl.dropIn, err))
	default:
		defer d.Close()
		cur, st, err := d.ReadFile(mmconfig.TLSDropInName, maxConfigSize)
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return refused(fmt.Errorf("drop-in %s: %w", pl.dropIn, err))
		default:
			pl.dropInOld, pl.cfgState = cur, st
		}
	}
	pl.envOthers = env.Without(pl.dropIn)
	pl.envOthers.DropIn = pl.dropIn
	return nil
}

func validationHint(err error, o Options) string {
	switch {
	case errors.Is(err, certs.ErrHostMismatch):
		return " (pass --allow-host-mismatch to push anyway, or --site-url to change SiteURL)"
	case errors.Is(err, certs.ErrUntrusted) && o.CAFile == "":
		return " (for a private CA, pass its root certificate with --ca-file)"
	case errors.Is(err, certs.ErrUntrusted):
		return fmt.Sprintf(" (the chain does not lead to a root in --ca-file %q: is it the right CA, and does --cert hold the intermediates?)", o.CAFile)
	}
	return ""
}

// ReadMattermostConfig reads Mattermost's config.json as a push does:
// without following a link planted in its directory, which the mattermost
// user can write, and bounded in size.
func ReadMattermostConfig(path string) ([]byte, error) {
	doc, _, err := readConfig(path)
	return doc, err
}

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
	// Prune first, so the directory made now is never among the pruned.
	pruneBackups(root, keepBackups-1)
	dir, err := os.MkdirTemp(root, now.UTC().Format("20060102T150405.000000000Z")+"-")
	if err != nil {
		return "", fmt.Errorf("create backup directory: %w", err)
	}
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

// LookupOwner returns the uid and gid of owner (a name or a number) and,
// if given, of group: the user Mattermost runs as.
func LookupOwner(owner, group string) (int, int, error) { return lookupOwner(owner, group) }

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

// CertInfoOf describes a pair's leaf as a push result does.
func CertInfoOf(p *certs.Pair) CertInfo {
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

// ownedSocket checks that path is a Unix socket, not a link, owned by the
// owner of mattermostDir.
func ownedSocket(path, mattermostDir string) error {
	var dir, st unix.Stat_t
	if err := unix.Stat(mattermostDir, &dir); err != nil {
		return fmt.Errorf("--mattermost-dir %s: %w", mattermostDir, err)
	}
	if err := unix.Lstat(path, &st); err != nil {
		return fmt.Errorf("%s: %w (is Mattermost running with local mode on?)", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fmt.Errorf("%s is not a socket", path)
	}
	if st.Uid != dir.Uid {
		return fmt.Errorf("%s is owned by uid %d, not by uid %d, the owner of %s: not Mattermost's socket", path, st.Uid, dir.Uid, mattermostDir)
	}
	return nil
}
