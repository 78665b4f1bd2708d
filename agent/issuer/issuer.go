// Package issuer obtains and renews the cluster's certificate from an ACME
// CA (RFC 8555: Let's Encrypt, its staging, a private step-ca, pebble),
// answering HTTP-01 challenges from memory through the balancer's port-80
// listener. It uses golang.org/x/crypto/acme (already in the module graph,
// a plain protocol client: the renewal schedule, the retries and where the
// certificate goes are the agent's, which certmagic would take over).
//
// It knows nothing of the cluster or of Mattermost: each new pair goes to
// a Deliver function (publish to the cluster, or push here).
package issuer

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/acme"

	"github.com/mmtls/mmtls/agent/clock"
	"github.com/mmtls/mmtls/certs"
)

// Defaults of Options.
const (
	// DefaultDirectory is Let's Encrypt's production directory.
	DefaultDirectory = "https://acme-v02.api.letsencrypt.org/directory"
	// DefaultStateDir holds the account key and the current pair (root, 0700).
	DefaultStateDir = "/var/lib/mmtls/acme"
	// DefaultRetryMin and DefaultRetryMax bound the backoff after a failed
	// order: never a tight loop against a CA's rate limits.
	DefaultRetryMin = time.Minute
	DefaultRetryMax = 6 * time.Hour
	// orderTimeout bounds one order, challenges and download included.
	orderTimeout = 5 * time.Minute
)

// Options are the [acme] section of the agent's config.
type Options struct {
	// Directory is the CA's ACME directory URL; "" means DefaultDirectory.
	Directory string `toml:"directory"`
	// Email is the account's contact (expiry notices, if the CA sends them).
	Email string `toml:"email"`
	// AgreeTOS must be true: the CA's terms are accepted explicitly.
	AgreeTOS bool `toml:"agree_tos"`
	// Names are the certificate's names; nil means SiteURL's host.
	Names []string `toml:"names"`
	// KeyType is "ecdsa-p256" (the default) or "rsa-2048".
	KeyType string `toml:"key_type"`
	// StateDir holds the account key and the current pair; "" means
	// DefaultStateDir.
	StateDir string `toml:"state_dir"`
	// CAFile, if set, holds the roots that verify the directory's own TLS
	// certificate (a private CA), and the issued chains.
	CAFile string `toml:"ca_file"`
	// RetryMin and RetryMax bound the backoff; 0 means the defaults.
	RetryMin time.Duration `toml:"retry_min"`
	RetryMax time.Duration `toml:"retry_max"`
}

// Enabled reports whether the section asks for ACME at all.
func (o Options) Enabled() bool {
	return o.Directory != "" || o.Email != "" || o.AgreeTOS || len(o.Names) > 0
}

// WithDefaults fills in the defaults.
func (o Options) WithDefaults() Options {
	if o.Directory == "" {
		o.Directory = DefaultDirectory
	}
	if o.KeyType == "" {
		o.KeyType = "ecdsa-p256"
	}
	if o.StateDir == "" {
		o.StateDir = DefaultStateDir
	}
	if o.RetryMin == 0 {
		o.RetryMin = DefaultRetryMin
	}
	if o.RetryMax == 0 {
		o.RetryMax = DefaultRetryMax
	}
	return o
}

// Validate says what is wrong with o, naming the key.
func (o Options) Validate() error {
	var errs []error
	if !o.AgreeTOS {
		errs = append(errs, errors.New("[acme] agree_tos: set it to true to accept the CA's terms of service (Let's Encrypt: https://letsencrypt.org/repository/)"))
	}
	if len(o.Names) == 0 {
		errs = append(errs, errors.New("[acme] names: none, and no SiteURL host to default to ([balance] site_url)"))
	}
	for _, n := range o.Names {
		if !validName(n) {
			errs = append(errs, fmt.Errorf("[acme] names: %q is not a DNS name a public CA issues for", n))
		}
	}
	switch o.KeyType {
	case "", "ecdsa-p256", "rsa-2048":
	default:
		errs = append(errs, fmt.Errorf("[acme] key_type %q: want ecdsa-p256 or rsa-2048", o.KeyType))
	}
	return errors.Join(errs...)
}

func validName(n string) bool {
	if n == "" || len(n) > 253 || strings.HasPrefix(n, "*") || !strings.Contains(n, ".") {
		return false
	}
	for _, l := range strings.Split(n, ".") {
		if l == "" || len(l) > 63 || strings.HasPrefix(l, "-") || strings.HasSuffix(l, "-") {
			return false
		}
		for _, r := range l {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return false
			}
		}
	}
	return true
}

// Challenges holds the HTTP-01 key authorizations being answered, by
// token, for the balancer's port-80 listener. Safe for concurrent use.
type Challenges struct {
	mu     sync.Mutex
	tokens map[string]string
}

// Lookup returns the key authorization for token.
func (c *Challenges) Lookup(token string) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.tokens[token]
	return v, ok
}

func (c *Challenges) set(token, v string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.tokens == nil {
		c.tokens = map[string]string{}
	}
	c.tokens[token] = v
}

func (c *Challenges) drop(token string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.tokens, token)
}

// Issuer orders certificates.
type Issuer struct {
	Options    Options
	Challenges *Challenges
	Logger     *slog.Logger
	// HTTPClient talks to the CA; nil means one with a timeout that trusts
	// Options.CAFile, or the system roots.
	HTTPClient *http.Client
	// Published, if set, returns the certificate the cluster has now (nil
	// if none): one another balancer host ordered, which this host takes
	// for its schedule instead of ordering again.
	Published func(ctx context.Context) (*x509.Certificate, error)
	// Lock, if set, is held around each order and its delivery, so that
	// of several hosts only one orders at a time.
	Lock func(ctx context.Context) (release func(), err error)
}

func (is *Issuer) log() *slog.Logger {
	if is.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return is.Logger
}

// Current returns the pair in the state directory, or nil.
func (is *Issuer) Current() (*certs.Pair, error) {
	o := is.Options.WithDefaults()
	pair, err := certs.LoadPair(filepath.Join(o.StateDir, "cert.pem"), filepath.Join(o.StateDir, "key.pem"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	return pair, err
}

// Files returns the paths of the current pair.
func (is *Issuer) Files() (cert, key string) {
	o := is.Options.WithDefaults()
	return filepath.Join(o.StateDir, "cert.pem"), filepath.Join(o.StateDir, "key.pem")
}

// Obtain orders a certificate for the names and stores it as the current
// pair. The account is registered (or found) first.
func (is *Issuer) Obtain(ctx context.Context) (*certs.Pair, error) {
	o := is.Options.WithDefaults()
	if err := o.Validate(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, orderTimeout)
	defer cancel()
	if err := os.MkdirAll(o.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("[acme] state_dir: %w", err)
	}
	akey, err := loadOrCreateKey(filepath.Join(o.StateDir, "account.key"))
	if err != nil {
		return nil, err
	}
	hc := is.HTTPClient
	if hc == nil {
		if hc, err = httpClient(o.CAFile); err != nil {
			return nil, err
		}
	}
	c := &acme.Client{Key: akey, DirectoryURL: o.Directory, HTTPClient: hc, UserAgent: "mmtls"}
	acct := &acme.Account{}
	if o.Email != "" {
		acct.Contact = []string{"mailto:" + o.Email}
	}
	if _, err := c.Register(ctx, acct, acme.AcceptTOS); err != nil && !errors.Is(err, acme.ErrAccountAlreadyExists) {
		return nil, fmt.Errorf("register the ACME account at %s: %w", o.Directory, err)
	}
	order, err := c.AuthorizeOrder(ctx, acme.DomainIDs(o.Names...))
	if err != nil {
		return nil, fmt.Errorf("order a certificate for %s: %w", strings.Join(o.Names, ", "), err)
	}
	for _, u := range order.AuthzURLs {
		if err := is.authorize(ctx, c, u); err != nil {
			return nil, err
		}
	}
	finalize, orderURL := order.FinalizeURL, order.URI
	if order, err = c.WaitOrder(ctx, orderURL); err != nil {
		return nil, fmt.Errorf("the order for %s: %w", strings.Join(o.Names, ", "), err)
	}
	if order.FinalizeURL != "" {
		finalize = order.FinalizeURL
	}
	key, err := newKey(o.KeyType)
	if err != nil {
		return nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: o.Names[0]}, DNSNames: o.Names}, key)
	if err != nil {
		return nil, err
	}
	der, _, err := c.CreateOrderCert(ctx, finalize, csr, true)
	if err != nil {
		// A CA that answers the finalize with a processing order and no
		// Location (pebble does) leaves the client nothing to poll: poll
		// the order it made.
		if o, werr := c.WaitOrder(ctx, orderURL); werr == nil && o.Status == acme.StatusValid && o.CertURL != "" {
			der, err = c.FetchCert(ctx, o.CertURL, true)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("finalize the order for %s: %w", strings.Join(o.Names, ", "), err)
	}
	var certPEM []byte
	for _, d := range der {
		certPEM = append(certPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: d})...)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
	pair, err := certs.ParsePair("issued certificate", certPEM, "its key", keyPEM)
	if err != nil {
		return nil, fmt.Errorf("the CA's certificate: %w", err)
	}
	if err := writeState(o.StateDir, certPEM, keyPEM); err != nil {
		return nil, err
	}
	is.log().Info("certificate issued", "names", o.Names, "not_after", pair.Leaf().NotAfter, "fingerprint", certs.Fingerprint(pair.Leaf()))
	return pair, nil
}

// authorize answers an authorization's HTTP-01 challenge from memory.
func (is *Issuer) authorize(ctx context.Context, c *acme.Client, url string) error {
	z, err := c.GetAuthorization(ctx, url)
	if err != nil {
		return fmt.Errorf("authorization: %w", err)
	}
	if z.Status == acme.StatusValid {
		return nil
	}
	i := slices.IndexFunc(z.Challenges, func(ch *acme.Challenge) bool { return ch.Type == "http-01" })
	if i < 0 {
		return fmt.Errorf("the CA offers no http-01 challenge for %s", z.Identifier.Value)
	}
	ch := z.Challenges[i]
	resp, err := c.HTTP01ChallengeResponse(ch.Token)
	if err != nil {
		return err
	}
	is.Challenges.set(ch.Token, resp)
	defer is.Challenges.drop(ch.Token)
	if _, err := c.Accept(ctx, ch); err != nil {
		return fmt.Errorf("accept the http-01 challenge for %s: %w", z.Identifier.Value, err)
	}
	if _, err := c.WaitAuthorization(ctx, z.URI); err != nil {
		return fmt.Errorf("the CA could not validate %s over http://%s/.well-known/acme-challenge/ (port 80 must reach this balancer's --redirect-http): %w",
			z.Identifier.Value, z.Identifier.Value, err)
	}
	return nil
}

// RenewAt is when a certificate is renewed: two thirds into its lifetime.
func RenewAt(leaf *x509.Certificate) time.Time {
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	return leaf.NotBefore.Add(life * 2 / 3)
}

// Run keeps a current certificate: at start when there is none (or it is
// due), then at each renewal time with some jitter, retrying with backoff
// on failure (each distinct error logged once). Each new pair goes to
// deliver; a delivery that fails is retried like an order. A certificate
// the cluster already has (Published) counts as this host's own for the
// schedule.
func (is *Issuer) Run(ctx context.Context, clk clock.Clock, deliver func(ctx context.Context, cert, key string) error, m Observer) error {
	clk = clock.Or(clk)
	o := is.Options.WithDefaults()
	log := is.log()
	retry := time.Duration(0)
	lastErr := ""
	delivered, adopted := "", ""
	for {
		var wait time.Duration
		pair, err := is.Current()
		if err != nil {
			log.Warn("the stored ACME certificate is unusable; ordering a new one", "err", err)
			pair, err = nil, nil
		}
		var leaf *x509.Certificate
		if pair != nil {
			leaf = pair.Leaf()
			if fp := certs.Fingerprint(leaf); fp != delivered && clk.Now().Before(leaf.NotAfter) {
				cert, key := is.Files()
				if err = deliver(ctx, cert, key); err == nil {
					delivered = fp
				}
			}
		}
		if err == nil {
			if pub := is.published(ctx); pub != nil && (leaf == nil || pub.NotBefore.After(leaf.NotBefore)) {
				if fp := certs.Fingerprint(pub); fp != adopted {
					adopted = fp
					log.Info("ACME: the cluster's certificate is current; this host orders when it is due", "fingerprint", fp, "renew_at", RenewAt(pub))
				}
				leaf = pub
			}
			if leaf != nil {
				at := RenewAt(leaf)
				m.nextRenewal(at)
				wait = at.Sub(clk.Now()) + jitter(leaf)
			}
			if wait <= 0 {
				var fp string
				if fp, err = is.order(ctx, clk, deliver); err == nil {
					if fp != "" {
						delivered = fp
					}
					retry, lastErr = 0, ""
					continue
				}
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			m.failed(clk.Now())
			retry = min(max(2*retry, o.RetryMin), o.RetryMax)
			if err.Error() != lastErr {
				lastErr = err.Error()
				log.Error("ACME: no new certificate; the current one keeps serving, retrying with backoff", "err", err, "retry_in", retry)
			} else {
				log.Debug("ACME: still failing", "retry_in", retry)
			}
			wait = retry
		}
		t := clk.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C():
		}
	}
}

// order orders and delivers a certificate holding Lock, unless the cluster
// got one meanwhile (another host held the lock); it returns the delivered
// leaf's fingerprint, "" when it took the cluster's.
func (is *Issuer) order(ctx context.Context, clk clock.Clock, deliver func(ctx context.Context, cert, key string) error) (string, error) {
	if is.Lock != nil {
		release, err := is.Lock(ctx)
		if err != nil {
			return "", fmt.Errorf("the ACME order lock: %w", err)
		}
		defer release()
		if pub := is.published(ctx); pub != nil && RenewAt(pub).After(clk.Now()) {
			is.log().Info("another balancer host ordered the certificate; taking its schedule", "fingerprint", certs.Fingerprint(pub))
			return "", nil
		}
	}
	pair, err := is.Obtain(ctx)
	if err != nil {
		return "", err
	}
	cert, key := is.Files()
	if err := deliver(ctx, cert, key); err != nil {
		return "", err
	}
	return certs.Fingerprint(pair.Leaf()), nil
}

// published returns the cluster's certificate if it covers every name.
func (is *Issuer) published(ctx context.Context) *x509.Certificate {
	if is.Published == nil {
		return nil
	}
	leaf, err := is.Published(ctx)
	if err != nil || leaf == nil {
		return nil
	}
	for _, n := range is.Options.Names {
		if leaf.VerifyHostname(n) != nil {
			return nil
		}
	}
	return leaf
}

// jitter spreads renewals of hosts that got their certificate at once:
// up to 1/30 of the lifetime, derived from the serial so it is stable.
func jitter(leaf *x509.Certificate) time.Duration {
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	if life <= 0 || leaf.SerialNumber == nil {
		return 0
	}
	span := big.NewInt(int64(life / 30))
	if span.Sign() <= 0 {
		return 0
	}
	return time.Duration(new(big.Int).Mod(leaf.SerialNumber, span).Int64())
}

// Observer receives what metrics export; the zero value records nothing.
type Observer struct {
	NextRenewal func(time.Time)
	Failed      func(time.Time)
}

func (o Observer) nextRenewal(t time.Time) {
	if o.NextRenewal != nil {
		o.NextRenewal(t)
	}
}

func (o Observer) failed(t time.Time) {
	if o.Failed != nil {
		o.Failed(t)
	}
}

func loadOrCreateKey(path string) (crypto.Signer, error) {
	data, _, err := certs.ReadRegular(path, certs.MaxFileSize)
	if err == nil {
		block, _ := pem.Decode(data)
		if block == nil {
			return nil, fmt.Errorf("%s: not PEM", path)
		}
		k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("%s: not a signing key", path)
		}
		return s, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("ACME account key: %w", err)
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	if err := writeFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})); err != nil {
		return nil, err
	}
	return k, nil
}

func newKey(kind string) (crypto.Signer, error) {
	if kind == "rsa-2048" {
		return rsa.GenerateKey(rand.Reader, 2048)
	}
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

// writeState replaces the current pair: key first, each atomically.
func writeState(dir string, certPEM, keyPEM []byte) error {
	if err := writeFile(filepath.Join(dir, "key.pem"), keyPEM); err != nil {
		return err
	}
	return writeFile(filepath.Join(dir, "cert.pem"), certPEM)
}

func writeFile(path string, data []byte) error {
	d, err := certs.OpenDir(filepath.Dir(path))
	if err != nil {
		return fmt.Errorf("[acme] state_dir: %w", err)
	}
	defer d.Close()
	return d.WriteFile(filepath.Base(path), data, certs.FileAttrs{UID: os.Geteuid(), GID: os.Getegid(), Mode: 0o600})
}

func httpClient(caFile string) (*http.Client, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if caFile != "" {
		pool, err := certs.LoadRoots(caFile)
		if err != nil {
			return nil, fmt.Errorf("[acme] ca_file: %w", err)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	}
	return &http.Client{Transport: tr, Timeout: time.Minute}, nil
}
