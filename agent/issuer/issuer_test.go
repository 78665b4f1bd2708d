package issuer

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/mmtls/mmtls/agent/clock"
)

// selfSigned makes a certificate for names, valid from notBefore for life.
func selfSigned(t *testing.T, notBefore time.Time, life time.Duration, names ...string) *x509.Certificate {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(42), Subject: pkix.Name{CommonName: names[0]}, DNSNames: names, NotBefore: notBefore, NotAfter: notBefore.Add(life)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

// Of several balancer hosts, one orders: a host that finds, once it holds
// the order lock, that the cluster has a certificate not yet due takes it
// instead of ordering; one for other names does not count.
func TestOrderTakesWhatTheClusterHas(t *testing.T) {
	now := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	clk := clock.NewFake(now)
	fresh := selfSigned(t, now.Add(-time.Hour), 90*24*time.Hour, "chat.example.test")
	locked := 0
	is := &Issuer{Options: Options{Names: []string{"chat.example.test"}, AgreeTOS: true, Directory: "https://127.0.0.1:1/dir", StateDir: t.TempDir()},
		Challenges: &Challenges{},
		Published:  func(context.Context) (*x509.Certificate, error) { return fresh, nil },
		Lock:       func(context.Context) (func(), error) { locked++; return func() { locked-- }, nil }}
	delivered := false
	fp, err := is.order(context.Background(), clk, func(context.Context, string, string) error { delivered = true; return nil })
	if err != nil || fp != "" || delivered || locked != 0 {
		t.Errorf("with a fresh published certificate: fp %q, err %v, delivered %v, lock held %d", fp, err, delivered, locked)
	}
	// Another name: not this host's certificate; it orders (and fails here:
	// no CA), having held the lock.
	other := selfSigned(t, now.Add(-time.Hour), 90*24*time.Hour, "other.example.test")
	is.Published = func(context.Context) (*x509.Certificate, error) { return other, nil }
	if _, err := is.order(context.Background(), clk, func(context.Context, string, string) error { return nil }); err == nil || locked != 0 {
		t.Errorf("with another name published: err %v, lock held %d", err, locked)
	}
}

func TestRenewAt(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	c := selfSigned(t, nb, 90*24*time.Hour, "chat.example.test")
	if got := RenewAt(c); !got.Equal(nb.Add(60 * 24 * time.Hour)) {
		t.Errorf("RenewAt = %s, want two thirds of 90 days in", got)
	}
	if j := jitter(c); j < 0 || j > 3*24*time.Hour {
		t.Errorf("jitter %s, want within 1/30 of the lifetime", j)
	}
}

func TestOptionsValidate(t *testing.T) {
	for _, tt := range []struct {
		o    Options
		want string
	}{
		{Options{Names: []string{"chat.example.test"}}, "agree_tos"},
		{Options{AgreeTOS: true}, "[acme] names: none"},
		{Options{AgreeTOS: true, Names: []string{"*.example.test"}}, `"*.example.test"`},
		{Options{AgreeTOS: true, Names: []string{"localhost"}}, `"localhost"`},
		{Options{AgreeTOS: true, Names: []string{"chat.example.test"}, KeyType: "dsa"}, "key_type"},
	} {
		if err := tt.o.Validate(); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Validate(%+v) = %v, want %q", tt.o, err, tt.want)
		}
	}
	if err := (Options{AgreeTOS: true, Names: []string{"chat.example.test"}}).Validate(); err != nil {
		t.Errorf("valid options: %v", err)
	}
}
