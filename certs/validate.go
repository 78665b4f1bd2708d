package certs

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Policy says what Validate accepts. The zero value is not usable: Now must
// be set.
type Policy struct {
	// Now is the time to validate at. Validate never reads the clock.
	Now time.Time
	// Hosts are the names clients connect to (SiteURL's host). Empty skips
	// the name check.
	Hosts []string
	// AllowHostMismatch turns a name that the leaf does not cover into a
	// warning.
	AllowHostMismatch bool
	// Roots verifies the chain. Nil means the system roots.
	Roots *x509.CertPool
	// RootsName describes Roots in messages. Empty means "the system roots".
	RootsName string
	// ExpiryWarning is how close to NotAfter a warning is given. Zero means
	// 21 days; negative disables the warning.
	ExpiryWarning time.Duration
}

// DefaultExpiryWarning is Policy.ExpiryWarning's zero-value meaning.
const DefaultExpiryWarning = 21 * 24 * time.Hour

// minRSABits is the smallest RSA modulus accepted.
const minRSABits = 2048

// Warning is a problem that does not stop an install.
type Warning struct {
	Code    string `json:"code"` // stable, for scripts: "expiring", "ed25519", "host-mismatch", "reordered", "skipped-blocks"
	Message string `json:"message"`
}

// Validate checks the pair against the policy. It returns every refusal at
// once, joined, so the administrator fixes them in one go; warnings are
// returned either way.
func Validate(p *Pair, pol Policy) ([]Warning, error) {
	if pol.Now.IsZero() {
		return nil, errors.New("validate: Policy.Now is not set")
	}
	var (
		warns []Warning
		errs  []error
		leaf  = p.Leaf()
		name  = p.CertFile
	)
	warn := func(code, format string, args ...any) {
		warns = append(warns, Warning{Code: code, Message: fmt.Sprintf(format, args...)})
	}
	if p.Reordered {
		warn("reordered", "certificate file %q had its chain out of order; it is installed leaf first", name)
	}
	if len(p.Skipped) > 0 {
		warn("skipped-blocks", "PEM blocks left out of the installed files: %s", strings.Join(p.Skipped, ", "))
	}

	timeOK := true
	switch {
	case pol.Now.Before(leaf.NotBefore):
		timeOK = false
		errs = append(errs, fmt.Errorf("certificate %q is valid only from %s: %w", name, leaf.NotBefore.UTC().Format(time.RFC3339), ErrNotYetValid))
	case pol.Now.After(leaf.NotAfter):
		timeOK = false
		errs = append(errs, fmt.Errorf("certificate %q expired at %s: %w", name, leaf.NotAfter.UTC().Format(time.RFC3339), ErrExpired))
	default:
		within := pol.ExpiryWarning
		if within == 0 {
			within = DefaultExpiryWarning
		}
		if left := leaf.NotAfter.Sub(pol.Now); within > 0 && left < within {
			warn("expiring", "certificate %q expires at %s, in %d days", name, leaf.NotAfter.UTC().Format(time.RFC3339), int(left.Hours()/24))
		}
	}

	switch k := leaf.PublicKey.(type) {
	case *rsa.PublicKey:
		if bits := k.N.BitLen(); bits < minRSABits {
			errs = append(errs, fmt.Errorf("certificate %q has a %d-bit RSA key; at least %d bits are required: %w", name, bits, minRSABits, ErrWeakKey))
		}
	case *ecdsa.PublicKey:
		if c := k.Curve; c != elliptic.P256() && c != elliptic.P384() && c != elliptic.P521() {
			errs = append(errs, fmt.Errorf("certificate %q uses ECDSA curve %s, which TLS servers cannot sign with; use P-256, P-384 or P-521: %w", name, c.Params().Name, ErrWeakKey))
		}
	case ed25519.PublicKey:
		warn("ed25519", "certificate %q has an Ed25519 key, which browsers do not accept; use ECDSA P-256 or RSA", name)
	}

	serverAuth := len(leaf.ExtKeyUsage) == 0 && len(leaf.UnknownExtKeyUsage) == 0 ||
		slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageServerAuth) ||
		slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageAny)
	if !serverAuth {
		errs = append(errs, fmt.Errorf("certificate %q has an extended key usage list without serverAuth: %w", name, ErrNoServerAuth))
	}

	for _, h := range pol.Hosts {
		if err := leaf.VerifyHostname(h); err != nil {
			msg := fmt.Sprintf("certificate %q does not cover host %q (it covers %s)", name, h, describeNames(leaf))
			if pol.AllowHostMismatch {
				warn("host-mismatch", "%s", msg)
				continue
			}
			errs = append(errs, fmt.Errorf("%s: %w", msg, ErrHostMismatch))
		}
	}

	if err := verifyChain(p, pol, timeOK, serverAuth); err != nil {
		errs = append(errs, err)
	}
	return warns, errors.Join(errs...)
}

func verifyChain(p *Pair, pol Policy, timeOK, serverAuth bool) error {
	leaf := p.Leaf()
	inter := x509.NewCertPool()
	for _, c := range p.Chain[1:] {
		inter.AddCert(c)
	}
	opts := x509.VerifyOptions{
		Roots:         pol.Roots,
		Intermediates: inter,
		CurrentTime:   pol.Now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if !timeOK {
		// Already reported; still check the chain itself.
		opts.CurrentTime = leaf.NotBefore.Add(time.Second)
	}
	if !serverAuth {
		opts.KeyUsages = []x509.ExtKeyUsage{x509.ExtKeyUsageAny}
	}
	if _, err := leaf.Verify(opts); err != nil {
		roots := pol.RootsName
		if roots == "" {
			roots = "the system roots"
		}
		hint := ""
		if len(p.Chain) == 1 && !isSelfSigned(leaf) {
			hint = " (the file holds only the leaf: use the full chain, e.g. certbot's fullchain.pem)"
		}
		return fmt.Errorf("certificate %q does not verify to %s%s: %w: %w", p.CertFile, roots, hint, ErrUntrusted, err)
	}
	return nil
}

func isSelfSigned(c *x509.Certificate) bool {
	return string(c.RawIssuer) == string(c.RawSubject) && c.CheckSignatureFrom(c) == nil
}

func describeNames(c *x509.Certificate) string {
	var names []string
	names = append(names, c.DNSNames...)
	for _, ip := range c.IPAddresses {
		names = append(names, ip.String())
	}
	if len(names) == 0 {
		return "no subject alternative names"
	}
	return strings.Join(names, ", ")
}
