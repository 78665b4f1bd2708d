// Package pki makes throwaway certificate authorities, chains and keys for
// mmtls's tests and demo. Nothing it makes is fit for production.
package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"time"
)

// CA is a certificate authority that issues certificates.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// PEM returns the CA's certificate as PEM.
func (ca *CA) PEM() []byte { return EncodeCerts(ca.Cert) }

// NewRoot makes a self-signed root valid from now-1h for ten years.
func NewRoot(name string, now time.Time) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := caTemplate(name, now)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("create root %q: %w", name, err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: c, Key: key}, nil
}

// Intermediate issues a subordinate CA.
func (ca *CA) Intermediate(name string, now time.Time) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	der, err := x509.CreateCertificate(rand.Reader, caTemplate(name, now), ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return nil, fmt.Errorf("create intermediate %q: %w", name, err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: c, Key: key}, nil
}

func caTemplate(name string, now time.Time) *x509.Certificate {
	return &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"mmtls test"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
}

// KeyType selects a leaf key algorithm.
type KeyType string

// Key types.
const (
	ECDSA   KeyType = "ecdsa"   // P-256, the default
	RSA2048 KeyType = "rsa2048" // slow to generate: use sparingly
	RSA1024 KeyType = "rsa1024"
	Ed25519 KeyType = "ed25519"
)

// KeyFormat selects how a key is encoded.
type KeyFormat string

// Key formats.
const (
	PKCS8 KeyFormat = "pkcs8" // the default
	PKCS1 KeyFormat = "pkcs1" // RSA only
	SEC1  KeyFormat = "sec1"  // ECDSA only
)

// Leaf describes a leaf certificate to issue. Zero fields take defaults.
type Leaf struct {
	DNSNames  []string
	IPs       []net.IP
	NotBefore time.Time // zero: now - 1h
	NotAfter  time.Time // zero: now + 90 days
	Key       KeyType
	Format    KeyFormat
	// ExtKeyUsage nil means serverAuth and clientAuth.
	ExtKeyUsage []x509.ExtKeyUsage
}

// Issued is a leaf with its key, ready to write to files.
type Issued struct {
	Cert    *x509.Certificate
	Key     crypto.Signer
	CertPEM []byte // the leaf alone
	KeyPEM  []byte
}

// Issue signs a leaf.
func (ca *CA) Issue(l Leaf, now time.Time) (*Issued, error) {
	var key crypto.Signer
	var err error
	switch l.Key {
	case "", ECDSA:
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case RSA2048:
		key, err = rsa.GenerateKey(rand.Reader, 2048)
	case RSA1024:
		key, err = rsa.GenerateKey(rand.Reader, 1024)
	case Ed25519:
		_, key, err = ed25519.GenerateKey(rand.Reader)
	default:
		return nil, fmt.Errorf("unknown key type %q", l.Key)
	}
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: firstOr(l.DNSNames, "mmtls test leaf")},
		DNSNames:     l.DNSNames,
		IPAddresses:  l.IPs,
		NotBefore:    l.NotBefore,
		NotAfter:     l.NotAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  l.ExtKeyUsage,
	}
	if tmpl.NotBefore.IsZero() {
		tmpl.NotBefore = now.Add(-time.Hour)
	}
	if tmpl.NotAfter.IsZero() {
		tmpl.NotAfter = now.Add(90 * 24 * time.Hour)
	}
	if tmpl.ExtKeyUsage == nil {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return nil, fmt.Errorf("issue leaf: %w", err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	keyPEM, err := EncodeKey(key, l.Format)
	if err != nil {
		return nil, err
	}
	return &Issued{Cert: c, Key: key, CertPEM: EncodeCerts(c), KeyPEM: keyPEM}, nil
}

// EncodeCerts PEM-encodes certificates in the order given.
func EncodeCerts(certs ...*x509.Certificate) []byte {
	var b bytes.Buffer
	for _, c := range certs {
		pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.Bytes()
}

// EncodeKey PEM-encodes a key in the given format (empty: PKCS#8).
func EncodeKey(key crypto.Signer, f KeyFormat) ([]byte, error) {
	var b *pem.Block
	switch f {
	case "", PKCS8:
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, err
		}
		b = &pem.Block{Type: "PRIVATE KEY", Bytes: der}
	case PKCS1:
		k, ok := key.(*rsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("PKCS#1 needs an RSA key, not %T", key)
		}
		b = &pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)}
	case SEC1:
		k, ok := key.(*ecdsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("SEC1 needs an ECDSA key, not %T", key)
		}
		der, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			return nil, err
		}
		b = &pem.Block{Type: "EC PRIVATE KEY", Bytes: der}
	default:
		return nil, fmt.Errorf("unknown key format %q", f)
	}
	return pem.EncodeToMemory(b), nil
}

// Chain is a root, an intermediate and a leaf issued by the intermediate:
// the shape every public CA hands out.
type Chain struct {
	Root, Intermediate *CA
	Leaf               *Issued
}

// FullChain is the leaf then the intermediate, as certbot's fullchain.pem.
func (c *Chain) FullChain() []byte {
	return EncodeCerts(c.Leaf.Cert, c.Intermediate.Cert)
}

// NewChain makes a root, an intermediate and a leaf for l.
func NewChain(l Leaf, now time.Time) (*Chain, error) {
	root, err := NewRoot("mmtls test root", now)
	if err != nil {
		return nil, err
	}
	inter, err := root.Intermediate("mmtls test intermediate", now)
	if err != nil {
		return nil, err
	}
	leaf, err := inter.Issue(l, now)
	if err != nil {
		return nil, err
	}
	return &Chain{Root: root, Intermediate: inter, Leaf: leaf}, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	return n
}

func firstOr(s []string, def string) string {
	if len(s) > 0 {
		return s[0]
	}
	return def
}
