package certs

import (
	"crypto/x509"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/mmtls/mmtls/test/pki"
)

func TestValidate(t *testing.T) {
	good := mustChain(t, pki.Leaf{})
	soon := mustChain(t, pki.Leaf{NotAfter: now.Add(10 * 24 * time.Hour)})
	expired := mustChain(t, pki.Leaf{NotBefore: now.Add(-100 * 24 * time.Hour), NotAfter: now.Add(-time.Hour)})
	future := mustChain(t, pki.Leaf{NotBefore: now.Add(time.Hour), NotAfter: now.Add(90 * 24 * time.Hour)})
	weak := mustChain(t, pki.Leaf{Key: pki.RSA1024})
	ed := mustChain(t, pki.Leaf{Key: pki.Ed25519})
	clientOnly := mustChain(t, pki.Leaf{ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	wildcard := mustChain(t, pki.Leaf{DNSNames: []string{"*.example.com"}})

	pool := func(c *pki.Chain) *x509.CertPool {
		p := x509.NewCertPool()
		p.AddCert(c.Root.Cert)
		return p
	}
	host := []string{"chat.example.com"}

	tests := []struct {
		name      string
		chain     *pki.Chain
		cert      []byte // nil: FullChain
		pol       Policy
		wantErrs  []error
		wantMsg   string
		wantWarns []string
	}{
		{name: "good", chain: good, pol: Policy{Hosts: host}},
		{name: "wildcard covers host", chain: wildcard, pol: Policy{Hosts: host}},
		{name: "expiring soon warns", chain: soon, pol: Policy{Hosts: host}, wantWarns: []string{"expiring"}},
		{name: "expiry warning disabled", chain: soon, pol: Policy{Hosts: host, ExpiryWarning: -1}},
		{name: "expired", chain: expired, pol: Policy{Hosts: host}, wantErrs: []error{ErrExpired},
			wantMsg: `certificate "fullchain.pem" expired at 2026-03-01T11:00:00Z`},
		{name: "not yet valid", chain: future, pol: Policy{Hosts: host}, wantErrs: []error{ErrNotYetValid}},
		{name: "weak rsa", chain: weak, pol: Policy{Hosts: host}, wantErrs: []error{ErrWeakKey},
			wantMsg: `certificate "fullchain.pem" has a 1024-bit RSA key; at least 2048 bits are required`},
		{name: "ed25519 warns", chain: ed, pol: Policy{Hosts: host}, wantWarns: []string{"ed25519"}},
		{name: "client auth only", chain: clientOnly, pol: Policy{Hosts: host}, wantErrs: []error{ErrNoServerAuth}},
		{name: "wrong host", chain: good, pol: Policy{Hosts: []string{"mm.example.org"}}, wantErrs: []error{ErrHostMismatch},
			wantMsg: `certificate "fullchain.pem" does not cover host "mm.example.org" (it covers chat.example.com)`},
		{name: "wrong host allowed", chain: good, pol: Policy{Hosts: []string{"mm.example.org"}, AllowHostMismatch: true}, wantWarns: []string{"host-mismatch"}},
		{name: "untrusted root", chain: good, pol: Policy{Hosts: host, Roots: x509.NewCertPool(), RootsName: "--ca-file x"}, wantErrs: []error{ErrUntrusted},
			wantMsg: `certificate "fullchain.pem" does not verify to --ca-file x`},
		{name: "leaf without intermediate", chain: good, cert: good.Leaf.CertPEM, pol: Policy{Hosts: host}, wantErrs: []error{ErrUntrusted},
			wantMsg: `(the file holds only the leaf: use the full chain, e.g. certbot's fullchain.pem)`},
		{name: "everything at once", chain: expired, pol: Policy{Hosts: []string{"other.example"}}, wantErrs: []error{ErrExpired, ErrHostMismatch}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cert := tt.cert
			if cert == nil {
				cert = tt.chain.FullChain()
			}
			p, err := ParsePair("fullchain.pem", cert, "privkey.pem", tt.chain.Leaf.KeyPEM)
			if err != nil {
				t.Fatalf("ParsePair: %v", err)
			}
			tt.pol.Now = now
			if tt.pol.Roots == nil {
				tt.pol.Roots = pool(tt.chain)
			}
			warns, err := Validate(p, tt.pol)
			for _, want := range tt.wantErrs {
				if !errors.Is(err, want) {
					t.Errorf("error %v is not %v", err, want)
				}
			}
			if len(tt.wantErrs) == 0 && err != nil {
				t.Errorf("Validate: %v", err)
			}
			if tt.wantMsg != "" && (err == nil || !strings.Contains(err.Error(), tt.wantMsg)) {
				t.Errorf("error %v\ndoes not contain %q", err, tt.wantMsg)
			}
			var codes []string
			for _, w := range warns {
				codes = append(codes, w.Code)
			}
			if strings.Join(codes, ",") != strings.Join(tt.wantWarns, ",") {
				t.Errorf("warnings = %v, want codes %v", warns, tt.wantWarns)
			}
		})
	}
}

func TestValidateNeedsNow(t *testing.T) {
	c := mustChain(t, pki.Leaf{})
	p, err := ParsePair("c", c.FullChain(), "k", c.Leaf.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Validate(p, Policy{}); err == nil || !strings.Contains(err.Error(), "Policy.Now is not set") {
		t.Errorf("Validate without Now: %v", err)
	}
}
