package certs

import "errors"

// Sentinel errors. Every error this package returns for bad input wraps one
// of these, so callers can branch with errors.Is while the message itself
// names the file and the fix.
var (
	// ErrEmpty: the file has no content at all.
	ErrEmpty = errors.New("file is empty")
	// ErrNoPEM: the file holds no PEM block (and is not DER either).
	ErrNoPEM = errors.New("no PEM data found")
	// ErrDER: the file is DER (binary) rather than PEM.
	ErrDER = errors.New("file is DER-encoded, not PEM")
	// ErrSwapped: a key where a certificate belongs, or the reverse.
	ErrSwapped = errors.New("certificate and key appear to be switched")
	// ErrEncryptedKey: the key is protected by a passphrase, which Mattermost cannot use.
	ErrEncryptedKey = errors.New("private key is encrypted")
	// ErrUnsupportedKey: a key block this package cannot parse.
	ErrUnsupportedKey = errors.New("unsupported private key")
	// ErrKeyMismatch: the key does not belong to the leaf certificate.
	ErrKeyMismatch = errors.New("private key does not match certificate")
	// ErrStrayCertificate: a certificate in the file that is not part of the leaf's chain.
	ErrStrayCertificate = errors.New("certificate is not part of the leaf's chain")
	// ErrExpired: the leaf's NotAfter is in the past.
	ErrExpired = errors.New("certificate has expired")
	// ErrNotYetValid: the leaf's NotBefore is in the future.
	ErrNotYetValid = errors.New("certificate is not yet valid")
	// ErrWeakKey: an RSA key shorter than 2048 bits.
	ErrWeakKey = errors.New("key is too weak")
	// ErrNoServerAuth: the leaf's extended key usage excludes TLS server authentication.
	ErrNoServerAuth = errors.New("certificate is not valid for TLS server authentication")
	// ErrHostMismatch: the leaf's names do not cover the host clients use.
	ErrHostMismatch = errors.New("certificate does not cover the host")
	// ErrUntrusted: the chain does not verify to the trusted roots.
	ErrUntrusted = errors.New("certificate chain does not verify")
	// ErrUnsafePath: a symlink or directory on the destination path that
	// someone other than root could change.
	ErrUnsafePath = errors.New("unsafe path")
)
