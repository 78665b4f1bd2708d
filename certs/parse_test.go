package certs

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/mmtls/mmtls/test/pki"
)

// now is the fixed time every certs test validates at.
var now = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func mustChain(t testing.TB, l pki.Leaf) *pki.Chain {
	t.Helper()
	if l.DNSNames == nil {
		l.DNSNames = []string{"chat.example.com"}
	}
	c, err := pki.NewChain(l, now)
	if err != nil {
		t.Fatalf("make chain: %v", err)
	}
	return c
}

func TestParsePairAccepts(t *testing.T) {
	ec := mustChain(t, pki.Leaf{})
	sec1 := mustChain(t, pki.Leaf{Format: pki.SEC1})
	rsa := mustChain(t, pki.Leaf{Key: pki.RSA2048, Format: pki.PKCS1})
	ed := mustChain(t, pki.Leaf{Key: pki.Ed25519})
	ecParams := append([]byte("-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"), sec1.Leaf.KeyPEM...)

	tests := []struct {
		name          string
		cert, key     []byte
		wantReordered bool
		wantLen       int
		wantSkipped   []string
	}{
		{name: "ecdsa pkcs8 fullchain", cert: ec.FullChain(), key: ec.Leaf.KeyPEM, wantLen: 2},
		{name: "ecdsa sec1", cert: sec1.FullChain(), key: sec1.Leaf.KeyPEM, wantLen: 2},
		{name: "ec parameters block before key", cert: sec1.FullChain(), key: ecParams, wantLen: 2, wantSkipped: []string{"EC PARAMETERS"}},
		{name: "rsa pkcs1", cert: rsa.FullChain(), key: rsa.Leaf.KeyPEM, wantLen: 2},
		{name: "ed25519", cert: ed.FullChain(), key: ed.Leaf.KeyPEM, wantLen: 2},
		{name: "leaf alone", cert: ec.Leaf.CertPEM, key: ec.Leaf.KeyPEM, wantLen: 1},
		{name: "intermediate first", cert: pki.EncodeCerts(ec.Intermediate.Cert, ec.Leaf.Cert), key: ec.Leaf.KeyPEM, wantLen: 2, wantReordered: true},
		{name: "root, leaf, intermediate", cert: pki.EncodeCerts(ec.Root.Cert, ec.Leaf.Cert, ec.Intermediate.Cert), key: ec.Leaf.KeyPEM, wantLen: 3, wantReordered: true},
		{name: "duplicate intermediate", cert: pki.EncodeCerts(ec.Leaf.Cert, ec.Intermediate.Cert, ec.Intermediate.Cert), key: ec.Leaf.KeyPEM, wantLen: 2},
		{name: "crlf line endings", cert: []byte(strings.ReplaceAll(string(ec.FullChain()), "\n", "\r\n")), key: ec.Leaf.KeyPEM, wantLen: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := ParsePair("fullchain.pem", tt.cert, "privkey.pem", tt.key)
			if err != nil {
				t.Fatalf("ParsePair: %v", err)
			}
			if len(p.Chain) != tt.wantLen {
				t.Errorf("chain length = %d, want %d", len(p.Chain), tt.wantLen)
			}
			if p.Reordered != tt.wantReordered {
				t.Errorf("Reordered = %v, want %v", p.Reordered, tt.wantReordered)
			}
			if strings.Join(p.Skipped, ",") != strings.Join(tt.wantSkipped, ",") {
				t.Errorf("Skipped = %q, want %q", p.Skipped, tt.wantSkipped)
			}
			for i := 1; i < len(p.Chain); i++ {
				if err := p.Chain[i-1].CheckSignatureFrom(p.Chain[i]); err != nil {
					t.Errorf("chain[%d] is not signed by chain[%d]: %v", i-1, i, err)
				}
			}
			// What gets installed is exactly the ordered chain and the key alone.
			rest := p.CertPEM
			for i := range p.Chain {
				var b *pem.Block
				b, rest = pem.Decode(rest)
				if b == nil || string(b.Bytes) != string(p.Chain[i].Raw) {
					t.Fatalf("CertPEM block %d is not chain[%d]", i, i)
				}
			}
			if b, _ := pem.Decode(p.KeyPEM); b == nil || !strings.HasSuffix(b.Type, "PRIVATE KEY") {
				t.Errorf("KeyPEM does not hold a key block: %q", p.KeyPEM)
			}
		})
	}
}

func TestParsePairRefuses(t *testing.T) {
	a := mustChain(t, pki.Leaf{})
	b := mustChain(t, pki.Leaf{})
	rsa := mustChain(t, pki.Leaf{Key: pki.RSA2048})
	other := mustChain(t, pki.Leaf{})
	encrypted := []byte("-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBAA==\n-----END ENCRYPTED PRIVATE KEY-----\n")
	legacyEncrypted := []byte("-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00000000000000000000000000000000\n\nMIIBAA==\n-----END RSA PRIVATE KEY-----\n")
	derCert, _ := pem.Decode(a.Leaf.CertPEM)
	derKey, _ := pem.Decode(a.Leaf.KeyPEM)

	tests := []struct {
		name      string
		cert, key []byte
		wantIs    error
		wantMsg   string
	}{
		{name: "empty cert", cert: nil, key: a.Leaf.KeyPEM, wantIs: ErrEmpty,
			wantMsg: `certificate file "fullchain.pem": file is empty`},
		{name: "blank key", cert: a.FullChain(), key: []byte(" \n\t"), wantIs: ErrEmpty,
			wantMsg: `key file "privkey.pem": file is empty`},
		{name: "swapped", cert: a.Leaf.KeyPEM, key: a.FullChain(), wantIs: ErrSwapped,
			wantMsg: `certificate file "fullchain.pem" holds a private key, not a certificate; were --cert and --key given the wrong way round?`},
		{name: "cert given twice", cert: a.FullChain(), key: a.FullChain(), wantIs: ErrSwapped,
			wantMsg: `key file "privkey.pem" holds a certificate, not a private key`},
		{name: "encrypted pkcs8", cert: a.FullChain(), key: encrypted, wantIs: ErrEncryptedKey,
			wantMsg: `key file "privkey.pem" is protected by a passphrase, which Mattermost cannot use; decrypt it with: openssl pkey -in privkey.pem -out privkey.pem`},
		{name: "encrypted legacy pem", cert: a.FullChain(), key: legacyEncrypted, wantIs: ErrEncryptedKey},
		{name: "der cert", cert: derCert.Bytes, key: a.Leaf.KeyPEM, wantIs: ErrDER,
			wantMsg: `certificate file "fullchain.pem": convert it with: openssl x509 -inform der -in fullchain.pem -out fullchain.pem: file is DER-encoded, not PEM`},
		{name: "der key", cert: a.FullChain(), key: derKey.Bytes, wantIs: ErrDER,
			wantMsg: `key file "privkey.pem": convert it with: openssl pkey -inform der`},
		{name: "der key as cert", cert: derKey.Bytes, key: a.Leaf.KeyPEM, wantIs: ErrSwapped},
		{name: "text", cert: []byte("hello\n"), key: a.Leaf.KeyPEM, wantIs: ErrNoPEM,
			wantMsg: `certificate file "fullchain.pem": no PEM data found`},
		{name: "mismatched key", cert: a.FullChain(), key: b.Leaf.KeyPEM, wantIs: ErrKeyMismatch,
			wantMsg: `key "privkey.pem" does not match certificate "fullchain.pem" (cert key sha256:`},
		{name: "key of another type", cert: a.FullChain(), key: rsa.Leaf.KeyPEM, wantIs: ErrKeyMismatch,
			wantMsg: `tls: private key type does not match public key type`},
		{name: "intermediate key", cert: a.FullChain(), key: mustKeyPEM(t, a.Intermediate), wantIs: ErrKeyMismatch,
			wantMsg: `the key belongs to "CN=mmtls test intermediate,O=mmtls test", an issuer in the certificate file`},
		{name: "stray certificate", cert: append(a.FullChain(), other.Intermediate.PEM()...), key: a.Leaf.KeyPEM, wantIs: ErrStrayCertificate,
			wantMsg: `certificate file "fullchain.pem": certificate "CN=mmtls test intermediate,O=mmtls test" (issued by "CN=mmtls test root,O=mmtls test") is not part of the chain of "CN=chat.example.com"; remove it`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParsePair("fullchain.pem", tt.cert, "privkey.pem", tt.key)
			if err == nil {
				t.Fatal("ParsePair succeeded, want an error")
			}
			if !errors.Is(err, tt.wantIs) {
				t.Errorf("error %q is not %v", err, tt.wantIs)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("error %q\ndoes not contain %q", err, tt.wantMsg)
			}
		})
	}
}

func TestKeyMismatchNamesBothFingerprints(t *testing.T) {
	a := mustChain(t, pki.Leaf{})
	b := mustChain(t, pki.Leaf{})
	_, err := ParsePair("/etc/mm/tls.crt", a.FullChain(), "/etc/mm/tls.key", b.Leaf.KeyPEM)
	var mm *KeyMismatchError
	if !errors.As(err, &mm) {
		t.Fatalf("error %v is not a *KeyMismatchError", err)
	}
	certFP, _ := PublicKeyFingerprint(a.Leaf.Cert.PublicKey)
	keyFP, _ := PublicKeyFingerprint(b.Leaf.Key.Public())
	want := `key "/etc/mm/tls.key" does not match certificate "/etc/mm/tls.crt" (cert key ` + certFP + `, key ` + keyFP + `): tls: private key does not match public key`
	if err.Error() != want {
		t.Errorf("error:\n got %s\nwant %s", err, want)
	}
}

func mustKeyPEM(t *testing.T, ca *pki.CA) []byte {
	t.Helper()
	b, err := pki.EncodeKey(ca.Key, pki.PKCS8)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func FuzzParsePair(f *testing.F) {
	c, err := pki.NewChain(pki.Leaf{DNSNames: []string{"a.example"}}, now)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(c.FullChain(), c.Leaf.KeyPEM)
	f.Add(c.Leaf.KeyPEM, c.FullChain())
	f.Add([]byte("-----BEGIN CERTIFICATE-----\n\n-----END CERTIFICATE-----\n"), []byte{})
	f.Fuzz(func(t *testing.T, cert, key []byte) {
		p, err := ParsePair("c", cert, "k", key)
		if err != nil {
			return
		}
		// Anything accepted must load exactly as Mattermost loads it and
		// have a key that matches the leaf.
		if len(p.Chain) == 0 {
			t.Fatal("accepted a pair without a chain")
		}
		if _, err := x509.ParseCertificate(p.Chain[0].Raw); err != nil {
			t.Fatalf("accepted leaf does not parse: %v", err)
		}
		if findLeaf(p.Chain[:1], p.Key.Public()) == nil {
			t.Fatal("accepted a key that does not match the leaf")
		}
	})
}
