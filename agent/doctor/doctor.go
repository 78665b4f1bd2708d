// Package doctor checks, read-only, everything between a Mattermost node
// and a working TLS sign-in: SiteURL and the SSO redirect URIs, the
// installed pair, its files, Mattermost's config, the bind privilege, what
// is really served, the TLS policy, the plain-HTTP redirect, the agent's
// source and service, the balancer and the cluster. Each check says ok,
// warn, fail or skip, in one line, with the fix for anything not ok.
//
// It changes nothing and takes no lock a push would wait for; every
// network check has a short timeout.
package doctor

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/mattermost/mattermost/server/public/model"

	"github.com/mmtls/mmtls/agent/clock"
	"github.com/mmtls/mmtls/agent/issuer"
	"github.com/mmtls/mmtls/agent/push"
	"github.com/mmtls/mmtls/certs"
	"github.com/mmtls/mmtls/mmconfig"
)

// Status is a check's outcome.
type Status string

// Statuses.
const (
	OK   Status = "ok"
	Warn Status = "warn"
	Fail Status = "fail"
	Skip Status = "skip"
)

// Check is one check's result. IDs are stable: scripts and monitoring
// depend on them.
type Check struct {
	ID      string `json:"id"`
	Status  Status `json:"status"`
	Message string `json:"message"`
	Fix     string `json:"fix,omitempty"`
}

// DefaultTimeout bounds each network check.
const DefaultTimeout = 3 * time.Second

// expiryWarning is when cert-expiry starts warning, as push does.
const expiryWarning = certs.DefaultExpiryWarning

// Options say where things are: the push options locate Mattermost and
// its config; the rest are optional.
type Options struct {
	Push push.Options
	// SourceCert and SourceKey are the agent's source pair, if it has one.
	SourceCert, SourceKey string
	// Balancer is the balancer's TLS address (HOST:PORT), HTTPRedirect the
	// plain-HTTP address that should redirect to https; "" skips them.
	Balancer, HTTPRedirect string
	// ACME is the config's [acme], if the host obtains its certificate.
	ACME *issuer.Options
	// Cluster reports whether every node serves the current bundle; nil
	// skips the check.
	Cluster func(ctx context.Context) (ok bool, summary string, err error)
	// Service reports the agent's service state; nil skips the check.
	Service func(ctx context.Context) (active bool, state string, err error)
	// UnitDirs: see push.Pusher. Nil means systemd's own.
	UnitDirs []string
	// Clock tells the time for expiry and chain checks; nil: the system's.
	Clock clock.Clock
	// Timeout bounds each network check; 0 means DefaultTimeout.
	Timeout time.Duration
}

// node is what the checks learn as they go.
type node struct {
	o        Options
	po       push.Options
	env      *mmconfig.ServiceEnv
	loc      mmconfig.Location
	doc      []byte // the configuration the node runs with (overrides laid over)
	ss       *model.ServiceSettings
	site     *url.URL
	host     string
	pair     *certs.Pair
	roots    *x509.CertPool
	certFile string
	keyFile  string
	uid      int
	now      time.Time
	timeout  time.Duration
	out      []Check
}

func (n *node) add(id string, st Status, msg, fix string) {
	n.out = append(n.out, Check{ID: id, Status: st, Message: msg, Fix: fix})
}

// Run runs every check, in order, and returns them all.
func Run(ctx context.Context, o Options) []Check {
	n := &node{o: o, po: o.Push.WithDefaults(), now: clock.Or(o.Clock).Now(), timeout: o.Timeout}
	if n.timeout <= 0 {
		n.timeout = DefaultTimeout
	}
	n.checkConfigRead(ctx)
	n.checkSiteURL()
	n.checkRedirectURIs()
	n.checkPair()
	n.checkFiles()
	n.checkConfig()
	n.checkBind()
	n.checkServed(ctx)
	n.checkTLSPolicy(ctx)
	n.checkLetsEncrypt()
	n.checkHTTPRedirect(ctx)
	n.checkSource()
	n.checkService(ctx)
	n.checkBalancer(ctx)
	n.checkCluster(ctx)
	n.checkACME()
	return n.out
}

// Failed reports whether any check failed.
func Failed(cs []Check) bool {
	for _, c := range cs {
		if c.Status == Fail {
			return true
		}
	}
	return false
}

// checkConfigRead finds and reads Mattermost's config; a failure is the
// config check's, and the checks that need it skip.
func (n *node) checkConfigRead(ctx context.Context) {
	var err error
	if n.env, err = mmconfig.LoadServiceEnv(n.po.Service+".service", n.o.UnitDirs); err != nil {
		n.add("config", Fail, fmt.Sprintf("cannot read the %s service's environment: %v", n.po.Service, err), "fix the unit file or its EnvironmentFile named above")
		return
	}
	if n.loc, err = mmconfig.Locate(n.po.MMConfig, n.env, n.po.MattermostDir); err != nil {
		n.add("config", Fail, err.Error(), "pass --mattermost-dir or --mm-config")
		return
	}
	var doc []byte
	if n.loc.DSN != "" {
		doc, err = mmconfig.ReadDatabase(ctx, n.loc.DSN)
	} else {
		doc, err = push.ReadMattermostConfig(n.loc.Path)
	}
	if err != nil {
		n.add("config", Fail, fmt.Sprintf("cannot read Mattermost's config (%s): %v", n.loc.Origin, err), "pass --mattermost-dir or --mm-config, or fix the file named above")
		return
	}
	if n.doc, err = mmconfig.Layered(doc, n.env); err != nil {
		n.add("config", Fail, err.Error(), "fix the variable named above")
		n.doc = nil
		return
	}
	if n.ss, err = mmconfig.Effective(n.doc); err != nil {
		n.add("config", Fail, fmt.Sprintf("Mattermost's config (%s): %v", n.where(), err), "fix the file named above")
		n.doc = nil
	}
}

// where names the config for messages.
func (n *node) where() string {
	if n.loc.DSN != "" {
		return "the database store " + mmconfig.RedactDSN(n.loc.DSN)
	}
	return n.loc.Path
}

func (n *node) skipNoConfig(id string) bool {
	if n.ss == nil {
		n.add(id, Skip, "Mattermost's config could not be read (see config)", "")
		return true
	}
	return false
}

func (n *node) checkSiteURL() {
	if n.skipNoConfig("site-url") {
		return
	}
	site := *n.ss.SiteURL
	fix := "set ServiceSettings.SiteURL to https://chat.example.com (mmtls push --site-url https://chat.example.com does it)"
	u, err := url.Parse(site)
	switch {
	case site == "":
		n.add("site-url", Fail, "SiteURL is not set: Office 365 / Entra ID sign-in and links in e-mails need it", fix)
		return
	case err != nil || u.Host == "":
		n.add("site-url", Fail, fmt.Sprintf("SiteURL %q is not an absolute URL", site), fix)
		return
	}
	n.site, n.host = u, u.Hostname()
	switch {
	case u.Scheme != "https":
		n.add("site-url", Fail, fmt.Sprintf("SiteURL %q is not https: Office 365 / Entra ID accepts only https redirect URIs", site), "set SiteURL to https://"+u.Host+" (mmtls push --site-url https://"+u.Host+")")
	case net.ParseIP(n.host) != nil:
		n.add("site-url", Fail, fmt.Sprintf("SiteURL %q names an IP address: no public CA certifies it, and SSO providers want a host name", site), "give the server a DNS name and set SiteURL to https://NAME")
	default:
		n.add("site-url", OK, "SiteURL is "+site, "")
	}
}

// ssoProviders are the SSO providers whose redirect URI is under SiteURL.
var ssoProviders = []struct{ section, name, path string }{
	{"Office365Settings", "Office 365 / Entra ID", "/signup/office365/complete"},
	{"OpenIdSettings", "OpenID Connect", "/signup/openid/complete"},
	{"GitLabSettings", "GitLab", "/signup/gitlab/complete"},
	{"GoogleSettings", "Google", "/signup/google/complete"},
}

func (n *node) checkRedirectURIs() {
	if n.skipNoConfig("office365-redirect") {
		return
	}
	var enabled []string
	for _, p := range ssoProviders {
		if on, _ := mmconfig.Lookup(n.doc, p.section, "Enable"); string(on) == "true" {
			enabled = append(enabled, p.name+": "+strings.TrimRight(*n.ss.SiteURL, "/")+p.path)
		}
	}
	if len(enabled) == 0 {
		n.add("office365-redirect", Skip, "no SSO provider (Office 365, OpenID, GitLab, Google) is enabled", "")
		return
	}
	msg := "register exactly: " + strings.Join(enabled, "; ")
	switch {
	case n.site == nil || n.site.Scheme != "https":
		n.add("office365-redirect", Fail, msg+" — not https, which the providers refuse", "make SiteURL https (see site-url)")
	case n.site.Port() != "":
		n.add("office365-redirect", Warn, msg+" — with port "+n.site.Port()+": the app registration must list it exactly so, and clients must reach that port", "drop the port from SiteURL unless clients really use it")
	default:
		n.add("office365-redirect", OK, msg, "")
	}
}

// checkPair loads the installed pair: the files Mattermost's config names,
// else where mmtls installs them.
func (n *node) checkPair() {
	n.certFile = filepath.Join(n.po.DestDir, n.po.CertName)
	n.keyFile = filepath.Join(n.po.DestDir, n.po.KeyName)
	if n.ss != nil && *n.ss.TLSCertFile != "" && *n.ss.TLSKeyFile != "" {
		n.certFile, n.keyFile = abs(*n.ss.TLSCertFile, n.po.MattermostDir), abs(*n.ss.TLSKeyFile, n.po.MattermostDir)
	}
	if n.po.CAFile != "" {
		var err error
		if n.roots, err = certs.LoadRoots(n.po.CAFile); err != nil {
			n.add("pair-matches", Fail, "--ca-file: "+err.Error(), "pass a PEM file of root certificates")
			for _, id := range []string{"cert-host", "cert-chain", "cert-expiry"} {
				n.add(id, Skip, "no roots to verify against", "")
			}
			return
		}
	}
	pair, err := certs.LoadPair(n.certFile, n.keyFile)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		n.add("pair-matches", Fail, fmt.Sprintf("no installed pair: %v", err), "install one: mmtls push --cert fullchain.pem --key privkey.pem")
	case errors.Is(err, certs.ErrKeyMismatch):
		n.add("pair-matches", Fail, err.Error(), "push a matching pair: mmtls push --cert fullchain.pem --key privkey.pem (certbot's live/ files match)")
	case err != nil:
		n.add("pair-matches", Fail, err.Error(), "push a valid pair: mmtls push --cert fullchain.pem --key privkey.pem")
	}
	if err != nil {
		for _, id := range []string{"cert-host", "cert-chain", "cert-expiry"} {
			n.add(id, Skip, "no usable installed pair (see pair-matches)", "")
		}
		return
	}
	n.pair = pair
	leaf := pair.Leaf()
	n.add("pair-matches", OK, fmt.Sprintf("%s and %s match (%s)", n.certFile, n.keyFile, certs.Fingerprint(leaf)), "")

	if n.host == "" {
		n.add("cert-host", Skip, "no SiteURL host to check (see site-url)", "")
	} else if err := leaf.VerifyHostname(n.host); err != nil {
		n.add("cert-host", Fail, fmt.Sprintf("the certificate is for %s, not SiteURL's host %s", strings.Join(leaf.DNSNames, ", "), n.host), "get a certificate for "+n.host+" and push it")
	} else {
		n.add("cert-host", OK, "the certificate covers "+n.host, "")
	}

	pol := certs.Policy{Now: n.now, Roots: n.roots, AllowHostMismatch: true}
	if _, err := certs.Validate(pair, pol); err != nil && (errors.Is(err, certs.ErrUntrusted) || len(pair.Chain) == 1 && !selfSigned(leaf)) {
		fix := "install the full chain: certbot's fullchain.pem, not cert.pem; for a private CA pass its root with --ca-file"
		n.add("cert-chain", Fail, fmt.Sprintf("the chain in %s (%d certificates) does not verify: %v; Android and the mobile apps do not fetch missing intermediates", n.certFile, len(pair.Chain), err), fix)
	} else if err != nil && !strings.Contains(err.Error(), "expire") && !strings.Contains(err.Error(), "not valid") {
		n.add("cert-chain", Fail, err.Error(), "push a valid pair")
	} else {
		n.add("cert-chain", OK, fmt.Sprintf("%d certificates, leaf first, verify to %s", len(pair.Chain), rootsName(n.po.CAFile)), "")
	}

	left := leaf.NotAfter.Sub(n.now)
	days := int(left.Hours() / 24)
	switch {
	case left <= 0:
		n.add("cert-expiry", Fail, fmt.Sprintf("expired on %s", leaf.NotAfter.Format(time.RFC3339)), "renew (certbot renew) and push; mmtls watch pushes renewals by itself")
	case n.now.Before(leaf.NotBefore):
		n.add("cert-expiry", Fail, fmt.Sprintf("not valid before %s (is this host's clock right?)", leaf.NotBefore.Format(time.RFC3339)), "check the clock (timedatectl)")
	case left < expiryWarning:
		n.add("cert-expiry", Warn, fmt.Sprintf("expires in %d days (%s)", days, leaf.NotAfter.Format("2006-01-02")), "check renewal: certbot renew --dry-run, and that mmtls watch runs")
	default:
		n.add("cert-expiry", OK, fmt.Sprintf("%d days left (%s)", days, leaf.NotAfter.Format("2006-01-02")), "")
	}
}

func rootsName(caFile string) string {
	if caFile != "" {
		return caFile
	}
	return "the system roots"
}

func selfSigned(c *x509.Certificate) bool {
	return c.CheckSignatureFrom(c) == nil
}

func abs(p, base string) string {
	if filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(base, p)
}

func (n *node) checkFiles() {
	uid, gid, err := push.LookupOwner(n.po.Owner, n.po.Group)
	if err != nil {
		n.add("files", Fail, err.Error(), "pass --owner, the user Mattermost runs as")
		return
	}
	n.uid = uid
	if n.pair == nil {
		if _, err := os.Lstat(n.certFile); errors.Is(err, fs.ErrNotExist) {
			n.add("files", Skip, "no installed pair (see pair-matches)", "")
			return
		}
	}
	var bad []string
	for _, f := range []string{n.certFile, n.keyFile} {
		st, err := os.Lstat(f)
		if err != nil {
			bad = append(bad, fmt.Sprintf("%s: %v", f, err))
			continue
		}
		sys := st.Sys().(*syscall.Stat_t)
		switch {
		case st.Mode()&fs.ModeSymlink != 0:
			bad = append(bad, f+" is a symlink (mmtls never installs one: a link in a directory the mattermost user writes can point anywhere)")
		case !st.Mode().IsRegular():
			bad = append(bad, f+" is not a regular file")
		case int(sys.Uid) != uid || int(sys.Gid) != gid:
			bad = append(bad, fmt.Sprintf("%s is owned by %d:%d, not %s (%d:%d)", f, sys.Uid, sys.Gid, n.po.Owner, uid, gid))
		case st.Mode().Perm() != certs.DefaultMode:
			bad = append(bad, fmt.Sprintf("%s has mode %04o, not %04o", f, st.Mode().Perm(), certs.DefaultMode))
		}
	}
	if n.loc.DSN == "" && n.loc.Path != "" {
		if st, err := os.Stat(n.loc.Path); err == nil && int(st.Sys().(*syscall.Stat_t).Uid) != uid {
			bad = append(bad, fmt.Sprintf("%s is not owned by %s: Mattermost cannot save settings from the System Console", n.loc.Path, n.po.Owner))
		}
	}
	if len(bad) > 0 {
		n.add("files", Fail, strings.Join(bad, "; "), "push again (mmtls push ...) to install the pair as "+n.po.Owner+", mode 0400; chown "+n.po.Owner+": the config file")
		return
	}
	n.add("files", OK, fmt.Sprintf("the pair is %s's, mode %04o, no symlink", n.po.Owner, certs.DefaultMode), "")
}

// checkConfig compares the TLS settings with what mmtls sets, and names
// environment overrides of them.
func (n *node) checkConfig() {
	if n.ss == nil {
		return // checkConfigRead reported it
	}
	var bad []string
	if *n.ss.ConnectionSecurity != model.ConnSecurityTLS {
		bad = append(bad, fmt.Sprintf("ConnectionSecurity is %q, not \"TLS\"", *n.ss.ConnectionSecurity))
	}
	if *n.ss.TLSCertFile == "" || *n.ss.TLSKeyFile == "" {
		bad = append(bad, "TLSCertFile or TLSKeyFile is empty")
	}
	var over []string
	for _, s := range (mmconfig.TLS{SiteURL: "x"}).Settings() {
		if v, ok := n.env.Override(s.Section, s.Key); ok && !strings.HasPrefix(v.Source, mmconfig.TLSDropInPath(n.o.UnitDirs, n.po.Service)+":") {
			over = append(over, fmt.Sprintf("%s=%q (%s)", v.Name, v.Value, v.Source))
		}
	}
	switch {
	case len(bad) > 0:
		n.add("config", Fail, strings.Join(bad, "; ")+" in "+n.where(), "mmtls push --cert fullchain.pem --key privkey.pem sets them")
	case len(over) > 0:
		n.add("config", Warn, fmt.Sprintf("TLS on %s; set in the service environment, which wins over %s: %s", *n.ss.ListenAddress, n.where(), strings.Join(over, ", ")),
			"remove them from the files named, unless you mean to set them there")
	default:
		n.add("config", OK, fmt.Sprintf("TLS on %s with %s and %s (%s)", *n.ss.ListenAddress, *n.ss.TLSCertFile, *n.ss.TLSKeyFile, n.where()), "")
	}
}

func (n *node) checkBind() {
	if n.ss == nil {
		n.add("bind-privilege", Skip, "Mattermost's config could not be read (see config)", "")
		return
	}
	needed, port, granted, fileCap, how := push.BindStatus(n.po, n.o.UnitDirs, *n.ss.ListenAddress, n.uid, n.env.Unit)
	switch {
	case !needed:
		n.add("bind-privilege", OK, fmt.Sprintf("port %d needs no privilege", port), "")
	case !granted:
		n.add("bind-privilege", Fail, fmt.Sprintf("Mattermost listens on port %d but may not bind it as %s", port, n.po.Owner),
			"a push without --no-restart sets it up (AmbientCapabilities=CAP_NET_BIND_SERVICE in a drop-in for the "+n.po.Service+" unit)")
	case fileCap:
		n.add("bind-privilege", Warn, fmt.Sprintf("port %d through %s: a Mattermost upgrade replaces the binary and drops it", port, how),
			"run Mattermost under systemd (the drop-in survives upgrades), or push again after each upgrade")
	default:
		n.add("bind-privilege", OK, fmt.Sprintf("port %d through %s", port, how), "")
	}
}

// expectation is what the node should serve.
func (n *node) expectation() (push.Expectation, bool) {
	if n.ss == nil || n.pair == nil || n.host == "" {
		return push.Expectation{}, false
	}
	return push.Expectation{Addr: push.DialAddr(*n.ss.ListenAddress), TLS: true, ServerName: n.host,
		Leaf: certs.Fingerprint(n.pair.Leaf()), CAFile: n.po.CAFile, PingPath: push.PingPath(*n.ss.SiteURL)}, true
}

func (n *node) checkServed(ctx context.Context) {
	exp, ok := n.expectation()
	if !ok {
		n.add("served", Skip, "needs the config, SiteURL and the installed pair (see above)", "")
		n.add("served-chain", Skip, "needs the config, SiteURL and the installed pair (see above)", "")
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 2*n.timeout)
	defer cancel()
	// What is served, looked at apart from the verifier's verdict.
	cs, err := handshake(ctx, exp.Addr, &tls.Config{ServerName: n.host, InsecureSkipVerify: true})
	if err != nil {
		n.add("served", Fail, fmt.Sprintf("no TLS handshake with %s: %v (Mattermost 6.x keeps its port but never completes a handshake with a pair it cannot use)", exp.Addr, err),
			"restart Mattermost (systemctl restart "+n.po.Service+") and read its log; mmtls push restarts and verifies")
		n.add("served-chain", Skip, "nothing served (see served)", "")
		return
	}
	got := certs.Fingerprint(cs.PeerCertificates[0])
	if got != exp.Leaf {
		n.add("served", Fail, fmt.Sprintf("%s serves %s, not the installed %s: Mattermost read its files before they changed", exp.Addr, got, exp.Leaf),
			"restart Mattermost (mmtls push with the same pair restarts it when it does not serve it)")
	} else if err := (&push.Verifier{Timeout: n.timeout}).Check(ctx, exp); err != nil {
		n.add("served", Fail, err.Error(), "restart Mattermost and read its log")
	} else {
		n.add("served", OK, fmt.Sprintf("%s serves the installed certificate over TLS 1.2 and 1.3; %s answers OK", exp.Addr, exp.PingPath), "")
	}

	// The chain as served, for a client that fetches nothing.
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	_, verr := cs.PeerCertificates[0].Verify(x509.VerifyOptions{DNSName: n.host, Roots: n.roots, Intermediates: inter, CurrentTime: n.now})
	if verr != nil {
		n.add("served-chain", Fail, fmt.Sprintf("the chain %s serves (%d certificates) does not verify without fetching: %v; browsers may cope, Android and the mobile apps do not", exp.Addr, len(cs.PeerCertificates), verr),
			"install fullchain.pem (leaf and intermediates), not cert.pem, and push it")
		return
	}
	n.add("served-chain", OK, fmt.Sprintf("the served chain (%d certificates) verifies as sent", len(cs.PeerCertificates)), "")
}

// weakSuites are TLS 1.2 suites without forward secrecy.
var weakSuites = []uint16{tls.TLS_RSA_WITH_AES_128_GCM_SHA256, tls.TLS_RSA_WITH_AES_256_GCM_SHA384, tls.TLS_RSA_WITH_AES_128_CBC_SHA, tls.TLS_RSA_WITH_AES_256_CBC_SHA}

func (n *node) checkTLSPolicy(ctx context.Context) {
	exp, ok := n.expectation()
	if !ok {
		n.add("tls-policy", Skip, "needs the config, SiteURL and the installed pair (see above)", "")
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 2*n.timeout)
	defer cancel()
	if _, err := handshake(ctx, exp.Addr, &tls.Config{ServerName: n.host, InsecureSkipVerify: true}); err != nil {
		n.add("tls-policy", Skip, "no TLS handshake to look at (see served)", "")
		return
	}
	var weak []string
	for _, v := range []uint16{tls.VersionTLS10, tls.VersionTLS11} {
		if _, err := handshake(ctx, exp.Addr, &tls.Config{ServerName: n.host, InsecureSkipVerify: true, MinVersion: v, MaxVersion: v}); err == nil {
			weak = append(weak, tls.VersionName(v)+" accepted")
		}
	}
	if cs, err := handshake(ctx, exp.Addr, &tls.Config{ServerName: n.host, InsecureSkipVerify: true, MaxVersion: tls.VersionTLS12, CipherSuites: weakSuites}); err == nil {
		weak = append(weak, tls.CipherSuiteName(cs.CipherSuite)+" (no forward secrecy) accepted")
	}
	if len(weak) > 0 {
		n.add("tls-policy", Warn, strings.Join(weak, "; "),
			`set ServiceSettings.TLSMinVer "1.2" and TLSOverwriteCiphers to the ECDHE suites; only clients older than Android 4.4 or Windows 7's IE need what this turns off`)
		return
	}
	n.add("tls-policy", OK, "TLS 1.2 and 1.3 only; every suite offered has forward secrecy", "")
}

func (n *node) checkLetsEncrypt() {
	if n.skipNoConfig("lets-encrypt") {
		return
	}
	if *n.ss.UseLetsEncrypt {
		n.add("lets-encrypt", Fail, "ServiceSettings.UseLetsEncrypt is on: Mattermost ignores TLSCertFile and TLSKeyFile, each node orders its own certificate, and behind a balancer the challenge may reach another node",
			"turn it off (mmtls push does)")
		return
	}
	n.add("lets-encrypt", OK, "UseLetsEncrypt is off", "")
}

func (n *node) checkHTTPRedirect(ctx context.Context) {
	if n.o.HTTPRedirect == "" || n.host == "" {
		n.add("http-redirect", Skip, "pass --http-redirect ADDR (the balancer's --redirect-http, or this node's :80) to check it", "")
		return
	}
	ctx, cancel := context.WithTimeout(ctx, n.timeout)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+n.o.HTTPRedirect+"/", nil)
	req.Host = n.host
	c := &http.Client{Timeout: n.timeout, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := c.Do(req)
	if err != nil {
		n.add("http-redirect", Fail, fmt.Sprintf("plain HTTP to %s: %v", n.o.HTTPRedirect, err), "mmtls balance --redirect-http :80 --site-url https://"+n.host+" (or Forward80To443 on a single node)")
		return
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	loc := resp.Header.Get("Location")
	if resp.StatusCode/100 != 3 || !strings.HasPrefix(loc, "https://"+n.host) {
		n.add("http-redirect", Fail, fmt.Sprintf("plain HTTP to %s answers %d %q, not a redirect to https://%s", n.o.HTTPRedirect, resp.StatusCode, loc, n.host),
			"mmtls balance --redirect-http :80 --site-url https://"+n.host)
		return
	}
	n.add("http-redirect", OK, fmt.Sprintf("plain HTTP redirects (%d) to %s", resp.StatusCode, loc), "")
}

func (n *node) checkSource() {
	if n.o.SourceCert == "" {
		n.add("source", Skip, "no source pair configured (the agent's [source])", "")
		return
	}
	src, err := certs.LoadPair(n.o.SourceCert, n.o.SourceKey)
	if err != nil {
		n.add("source", Fail, err.Error(), "fix the source pair ([source] cert and key); certbot's live/ files are fullchain.pem and privkey.pem")
		return
	}
	if n.pair != nil && certs.Fingerprint(src.Leaf()) != certs.Fingerprint(n.pair.Leaf()) && src.Leaf().NotBefore.Before(n.pair.Leaf().NotBefore) {
		n.add("source", Warn, fmt.Sprintf("the source %s is older than what is installed (issued %s, installed %s)", n.o.SourceCert, src.Leaf().NotBefore.Format("2006-01-02"), n.pair.Leaf().NotBefore.Format("2006-01-02")),
			"point [source] at the renewed certificate")
		return
	}
	if n.pair != nil && certs.Fingerprint(src.Leaf()) != certs.Fingerprint(n.pair.Leaf()) {
		n.add("source", Warn, fmt.Sprintf("the source %s is newer than what is installed and not pushed yet", n.o.SourceCert), "is the agent running? mmtls service status; or mmtls push it")
		return
	}
	n.add("source", OK, fmt.Sprintf("%s is a consistent pair, the one installed", n.o.SourceCert), "")
}

func (n *node) checkService(ctx context.Context) {
	if n.o.Service == nil {
		n.add("service", Skip, "no systemd here", "")
		return
	}
	ctx, cancel := context.WithTimeout(ctx, n.timeout)
	defer cancel()
	active, state, err := n.o.Service(ctx)
	switch {
	case err != nil:
		n.add("service", Skip, "cannot ask systemd: "+err.Error(), "")
	case !active:
		n.add("service", Warn, "the mmtls service is "+state+": renewals are not pushed by themselves", "mmtls service install --config /etc/mmtls/mmtls.toml && mmtls service start")
	default:
		n.add("service", OK, "the mmtls service is "+state, "")
	}
}

func (n *node) checkBalancer(ctx context.Context) {
	if n.o.Balancer == "" || n.host == "" {
		n.add("balancer", Skip, "pass --balancer ADDR to check the way clients come in", "")
		return
	}
	ctx, cancel := context.WithTimeout(ctx, n.timeout)
	defer cancel()
	cs, err := handshake(ctx, n.o.Balancer, &tls.Config{ServerName: n.host, InsecureSkipVerify: true})
	if err != nil {
		n.add("balancer", Fail, fmt.Sprintf("no TLS handshake through %s: %v", n.o.Balancer, err), "mmtls balance status on the balancer host; is this node up there?")
		return
	}
	got := certs.Fingerprint(cs.PeerCertificates[0])
	if n.pair != nil && got != certs.Fingerprint(n.pair.Leaf()) {
		n.add("balancer", Warn, fmt.Sprintf("%s presents %s, not this node's %s: another node there serves another certificate", n.o.Balancer, got, certs.Fingerprint(n.pair.Leaf())),
			"mmtls cluster status, or push the same pair on every node")
		return
	}
	n.add("balancer", OK, fmt.Sprintf("a handshake through %s for %s presents this node's certificate", n.o.Balancer, n.host), "")
}

func (n *node) checkCluster(ctx context.Context) {
	if n.o.Cluster == nil {
		n.add("cluster", Skip, "no cluster database configured", "")
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 3*n.timeout)
	defer cancel()
	ok, summary, err := n.o.Cluster(ctx)
	switch {
	case err != nil:
		n.add("cluster", Fail, "cannot read the cluster's state: "+err.Error(), "check [cluster] dsn and that the database is up")
	case !ok:
		n.add("cluster", Fail, summary, "mmtls cluster status shows each node; mmtls publish --retry resumes a halted rollout")
	default:
		n.add("cluster", OK, summary, "")
	}
}

// handshake completes one TLS handshake with addr.
func handshake(ctx context.Context, addr string, c *tls.Config) (tls.ConnectionState, error) {
	d := &tls.Dialer{Config: c}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer conn.Close()
	return conn.(*tls.Conn).ConnectionState(), nil
}

// ServiceState asks systemd whether unit is active, where systemd runs.
func ServiceState(unit string) func(ctx context.Context) (bool, string, error) {
	if _, err := os.Stat("/run/systemd/system"); err != nil {
		return nil
	}
	return func(ctx context.Context) (bool, string, error) {
		out, err := exec.CommandContext(ctx, "systemctl", "is-active", unit).Output()
		state := strings.TrimSpace(string(out))
		if state == "" && err != nil {
			return false, "", err
		}
		return state == "active", state, nil
	}
}

// checkACME looks at what [acme] keeps: the account and the current pair,
// and when it is renewed.
func (n *node) checkACME() {
	if n.o.ACME == nil {
		n.add("acme", Skip, "no [acme] in the config", "")
		return
	}
	o := n.o.ACME.WithDefaults()
	is := &issuer.Issuer{Options: o}
	account := filepath.Join(o.StateDir, "account.key")
	if _, err := os.Stat(account); err != nil {
		n.add("acme", Warn, fmt.Sprintf("no ACME account yet (%s): the agent registers at %s when it starts", account, o.Directory),
			"start the agent (mmtls service start) and read its log (journalctl -u mmtls)")
		return
	}
	pair, err := is.Current()
	switch {
	case err != nil:
		n.add("acme", Fail, "the stored ACME certificate: "+err.Error(), "remove it from "+o.StateDir+"; the agent orders a new one")
	case pair == nil:
		n.add("acme", Warn, "account "+account+", but no certificate obtained yet", "journalctl -u mmtls: the CA's answer (is port 80 reaching redirect_http?)")
	case n.now.After(issuer.RenewAt(pair.Leaf()).Add(time.Hour)):
		n.add("acme", Warn, fmt.Sprintf("the certificate for %s was due for renewal at %s and is still the current one", strings.Join(pair.Leaf().DNSNames, ", "), issuer.RenewAt(pair.Leaf()).Format(time.RFC3339)),
			"journalctl -u mmtls: the last ACME error")
	default:
		n.add("acme", OK, fmt.Sprintf("account %s; certificate for %s until %s, renewed at %s", account, strings.Join(pair.Leaf().DNSNames, ", "),
			pair.Leaf().NotAfter.Format("2006-01-02"), issuer.RenewAt(pair.Leaf()).Format(time.RFC3339)), "")
	}
}
