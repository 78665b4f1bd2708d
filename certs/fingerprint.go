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
