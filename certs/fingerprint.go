package certs

import (
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
)

// PublicKeyFingerprint returns "sha256:" and the hex SHA-256 of the key's
// SubjectPublicKeyInfo, the same value as
// `openssl pkey -pubout -outform der | sha256sum` gives for the key, so an
// administrator can compare a certificate and a key by hand.
func PublicKeyFingerprint(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", fmt.Errorf("fingerprint public key: %w", err)
	}
	sum := sha256.Sum256(der)
	return "sha256:" + hex.EncodeToString(sum[:]), nil
}

// Fingerprint returns "sha256:" and the hex SHA-256 of the certificate's DER
// encoding, as `openssl x509 -fingerprint -sha256` shows it (without colons).
func Fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// FirstCertificate returns the first certificate in PEM data: the leaf of a
// file Mattermost serves.
func FirstCertificate(data []byte) (*x509.Certificate, error) {
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return nil, ErrNoPEM
		}
		if b.Type == "CERTIFICATE" {
			return x509.ParseCertificate(b.Bytes)
		}
	}
}

// SHA256Hex returns the hex SHA-256 of b: how installed files and backups
// are identified in results and journals.
func SHA256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// LoadRoots reads a PEM file of trusted root certificates (a private CA's
// roots), bounded like a certificate file.
func LoadRoots(path string) (*x509.CertPool, error) {
	data, err := readLimited(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("%q holds no PEM certificate", path)
	}
	return pool, nil
}
