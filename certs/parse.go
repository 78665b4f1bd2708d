package certs

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// MaxFileSize bounds what is read from a certificate or key file. Real
// chains are a few KiB; anything this large is the wrong file.
const MaxFileSize = 1 << 20

// Pair is a parsed certificate chain and the private key that belongs to its
// leaf. A Pair is immutable once returned and safe for concurrent reads.
type Pair struct {
	CertFile string // the certificate file, as given; for messages only
	KeyFile  string // the key file, as given; for messages only

	// Chain is leaf first, then each issuer in turn, as Mattermost (and
	// every TLS client) needs it.
	Chain []*x509.Certificate
	Key   crypto.Signer

	// CertPEM is Chain re-encoded in order; KeyPEM is the key block alone.
	// These are the bytes to install.
	CertPEM []byte
	KeyPEM  []byte

	// Reordered reports that the input file had the chain in another order.
	Reordered bool
	// Skipped lists PEM block types found in the files and left out of
	// CertPEM and KeyPEM (such as "EC PARAMETERS").
	Skipped []string
}

// Leaf returns the end-entity certificate.
func (p *Pair) Leaf() *x509.Certificate { return p.Chain[0] }

// LoadPair reads and parses a certificate file and a key file. Symlinks are
// followed: these are the source files (certbot's live/ links), owned by root.
func LoadPair(certFile, keyFile string) (*Pair, error) {
	certPEM, err := readLimited(certFile)
	if err != nil {
		return nil, fmt.Errorf("read certificate file: %w", err)
	}
	keyPEM, err := readLimited(keyFile)
	if err != nil {
		return nil, fmt.Errorf("read key file: %w", err)
	}
	return ParsePair(certFile, certPEM, keyFile, keyPEM)
}

// ReadRegular reads the file at path, following symlinks, if it is a
// regular file of at most max bytes; a FIFO or a device is refused without
// being opened for reading (ErrUntrustedFile). It reports the file's owner
// and mode, as opened. For files root reads from places others may write:
// a service's EnvironmentFile, Mattermost's config.
func ReadRegular(path string, max int64) ([]byte, *FileState, error) {
	pfd, err := unix.Open(path, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(pfd)
	fd, err := reopenRegular(pfd, path, func(flags int) (int, error) { return unix.Open(path, flags, 0) })
	if err != nil {
		return nil, nil, err
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, nil, &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	data, err := readBounded(f, path, max)
	if err != nil {
		return nil, nil, err
	}
	return data, &FileState{FileAttrs: FileAttrs{UID: int(st.Uid), GID: int(st.Gid), Mode: fs.FileMode(st.Mode & 0o777)}, Dev: st.Dev, Ino: st.Ino}, nil
}

// readLimited reads a file the administrator named (a source pair, a CA
// file, a backup), following symlinks, but only once it is known to be a
// regular file: a FIFO or a device there is refused without being opened
// for reading.
func readLimited(name string) ([]byte, error) {
	data, _, err := ReadRegular(name, MaxFileSize)
	if errors.Is(err, errTooLarge) {
		return nil, fmt.Errorf("%s: larger than %d bytes; this is not a certificate or key file", name, MaxFileSize)
	}
	return data, err
}

// ParsePair parses PEM data. The file names are used in messages only.
func ParsePair(certFile string, certPEM []byte, keyFile string, keyPEM []byte) (*Pair, error) {
	certsIn, skippedCert, err := parseCertificates(certFile, certPEM)
	if err != nil {
		return nil, err
	}
	keyBlock, key, skippedKey, err := parseKey(keyFile, keyPEM)
	if err != nil {
		return nil, err
	}
	p := &Pair{
		CertFile: certFile,
		KeyFile:  keyFile,
		Key:      key,
		KeyPEM:   pem.EncodeToMemory(keyBlock),
		Skipped:  append(skippedCert, skippedKey...),
	}

	leaf := findLeaf(leafCandidates(certsIn), key.Public())
	if leaf == nil {
		return nil, mismatchError(certFile, keyFile, certsIn, key, keyBlock)
	}
	chain, stray := buildChain(leaf, certsIn)
	if len(stray) > 0 {
		c := stray[0]
		return nil, fmt.Errorf("certificate file %q: certificate %q (issued by %q) is not part of the chain of %q; remove it: %w",
			certFile, c.Subject.String(), c.Issuer.String(), leaf.Subject.String(), ErrStrayCertificate)
	}
	p.Chain = chain
	var buf bytes.Buffer
	for i, c := range chain {
		if !p.Reordered && i < len(certsIn) && certsIn[i] != c {
			p.Reordered = true
		}
		pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	p.CertPEM = buf.Bytes()

	// The final word belongs to the loader Mattermost itself uses.
	if _, err := tls.X509KeyPair(p.CertPEM, p.KeyPEM); err != nil {
		return nil, fmt.Errorf("load pair %q and %q: %w", certFile, keyFile, err)
	}
	return p, nil
}

func parseCertificates(name string, data []byte) ([]*x509.Certificate, []string, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, nil, fmt.Errorf("certificate file %q: %w", name, ErrEmpty)
	}
	var (
		out     []*x509.Certificate
		skipped []string
		sawKey  bool
		seen    = map[string]bool{}
		rest    = data
	)
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			if strings.HasSuffix(b.Type, "PRIVATE KEY") {
				sawKey = true
			}
			skipped = append(skipped, b.Type)
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, nil, fmt.Errorf("certificate file %q: parse certificate %d: %w", name, len(out)+1, err)
		}
		if seen[string(c.Raw)] {
			continue // a duplicate adds nothing to the chain
		}
		seen[string(c.Raw)] = true
		out = append(out, c)
	}
	if len(out) > 0 {
		return out, skipped, nil
	}
	if sawKey {
		return nil, nil, fmt.Errorf("certificate file %q holds a private key, not a certificate; were --cert and --key given the wrong way round? %w", name, ErrSwapped)
	}
	if len(skipped) > 0 {
		return nil, nil, fmt.Errorf("certificate file %q has no CERTIFICATE block (found %s): %w", name, strings.Join(skipped, ", "), ErrNoPEM)
	}
	if _, err := x509.ParseCertificates(data); err == nil {
		return nil, nil, fmt.Errorf("certificate file %q: convert it with: openssl x509 -inform der -in %s -out fullchain.pem: %w", name, name, ErrDER)
	}
	if isDERKey(data) {
		return nil, nil, fmt.Errorf("certificate file %q holds a DER private key, not a certificate; were --cert and --key given the wrong way round? %w", name, ErrSwapped)
	}
	return nil, nil, fmt.Errorf("certificate file %q: %w", name, ErrNoPEM)
}

func isDERKey(data []byte) bool {
	_, err := parsePrivateKey("", data)
	return err == nil
}

// parseKey returns the key block to install and the parsed key.
func parseKey(name string, data []byte) (*pem.Block, crypto.Signer, []string, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, nil, nil, fmt.Errorf("key file %q: %w", name, ErrEmpty)
	}
	var (
		keyBlock *pem.Block
		skipped  []string
		sawCert  bool
		rest     = data
	)
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		switch {
		case b.Type == "ENCRYPTED PRIVATE KEY" || strings.Contains(b.Headers["Proc-Type"], "ENCRYPTED"):
			return nil, nil, nil, fmt.Errorf("key file %q is protected by a passphrase, which Mattermost cannot use; decrypt it with: openssl pkey -in %s -out privkey.pem: %w", name, name, ErrEncryptedKey)
		case strings.HasSuffix(b.Type, "PRIVATE KEY") && keyBlock == nil:
			keyBlock = b
		default:
			if b.Type == "CERTIFICATE" {
				sawCert = true
			}
			skipped = append(skipped, b.Type)
		}
	}
	if keyBlock == nil {
		switch {
		case sawCert:
			return nil, nil, nil, fmt.Errorf("key file %q holds a certificate, not a private key; were --cert and --key given the wrong way round? %w", name, ErrSwapped)
		case len(skipped) > 0:
			return nil, nil, nil, fmt.Errorf("key file %q has no PRIVATE KEY block (found %s): %w", name, strings.Join(skipped, ", "), ErrNoPEM)
		case isDERKey(data):
			return nil, nil, nil, fmt.Errorf("key file %q: convert it with: openssl pkey -inform der -in %s -out privkey.pem: %w", name, name, ErrDER)
		}
		if _, err := x509.ParseCertificate(data); err == nil {
			return nil, nil, nil, fmt.Errorf("key file %q holds a DER certificate, not a private key; were --cert and --key given the wrong way round? %w", name, ErrSwapped)
		}
		return nil, nil, nil, fmt.Errorf("key file %q: %w", name, ErrNoPEM)
	}
	key, err := parsePrivateKey(keyBlock.Type, keyBlock.Bytes)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("key file %q: %w", name, err)
	}
	return keyBlock, key, skipped, nil
}

// parsePrivateKey tries the encoding the block type names first, then the
// others, since tools mislabel keys.
func parsePrivateKey(blockType string, der []byte) (crypto.Signer, error) {
	var errs []error
	try := func(k any, err error) crypto.Signer {
		if err != nil {
			errs = append(errs, err)
			return nil
		}
		switch k := k.(type) {
		case *rsa.PrivateKey:
			return k
		case *ecdsa.PrivateKey:
			return k
		case ed25519.PrivateKey:
			return k
		}
		errs = append(errs, fmt.Errorf("key type %T", k))
		return nil
	}
	order := []func() crypto.Signer{
		func() crypto.Signer { return try(x509.ParsePKCS8PrivateKey(der)) },
		func() crypto.Signer { return try(x509.ParsePKCS1PrivateKey(der)) },
		func() crypto.Signer { return try(x509.ParseECPrivateKey(der)) },
	}
	switch blockType {
	case "RSA PRIVATE KEY":
		order[0], order[1] = order[1], order[0]
	case "EC PRIVATE KEY":
		order[0], order[2] = order[2], order[0]
	}
	for _, f := range order {
		if k := f(); k != nil {
			return k, nil
		}
	}
	return nil, fmt.Errorf("%w: not PKCS#8, PKCS#1 or SEC1 RSA, ECDSA or Ed25519 (%w)", ErrUnsupportedKey, errors.Join(errs...))
}

// findLeaf returns the certificate whose public key is pub, or nil.
func findLeaf(certs []*x509.Certificate, pub crypto.PublicKey) *x509.Certificate {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	eq, ok := pub.(equaler)
	if !ok {
		return nil
	}
	for _, c := range certs {
		if eq.Equal(c.PublicKey) {
			return c
		}
	}
	return nil
}

// leafCandidates returns the certificates that issued none of the others.
func leafCandidates(certs []*x509.Certificate) []*x509.Certificate {
	var out []*x509.Certificate
	for _, c := range certs {
		issuer := false
		for _, o := range certs {
			if o != c && bytes.Equal(o.RawIssuer, c.RawSubject) && o.CheckSignatureFrom(c) == nil {
				issuer = true
				break
			}
		}
		if !issuer {
			out = append(out, c)
		}
	}
	if len(out) == 0 {
		return certs[:1]
	}
	return out
}

// buildChain orders certs from leaf up through each issuer and returns the
// certificates that are not on that path.
func buildChain(leaf *x509.Certificate, certs []*x509.Certificate) (chain, stray []*x509.Certificate) {
	chain = []*x509.Certificate{leaf}
	rest := make([]*x509.Certificate, 0, len(certs))
	for _, c := range certs {
		if c != leaf {
			rest = append(rest, c)
		}
	}
	for {
		cur := chain[len(chain)-1]
		next := -1
		for i, c := range rest {
			if bytes.Equal(cur.RawIssuer, c.RawSubject) && cur.CheckSignatureFrom(c) == nil {
				next = i
				break
			}
		}
		if next < 0 {
			return chain, rest
		}
		chain = append(chain, rest[next])
		rest = append(rest[:next], rest[next+1:]...)
	}
}

// KeyMismatchError reports a key that belongs to no certificate in the
// certificate file. errors.Is(err, ErrKeyMismatch) is true for it; Unwrap
// gives crypto/tls's own diagnosis.
type KeyMismatchError struct {
	CertFile, KeyFile string
	CertKey, Key      string // public-key fingerprints, see PublicKeyFingerprint
	// BelongsTo names the issuer certificate in the file that the key
	// belongs to, when the key is an intermediate's; usually empty.
	BelongsTo string
	Err       error // from tls.X509KeyPair
}

func (e *KeyMismatchError) Error() string {
	note := ""
	if e.BelongsTo != "" {
		note = fmt.Sprintf("; the key belongs to %q, an issuer in the certificate file", e.BelongsTo)
	}
	return fmt.Sprintf("key %q does not match certificate %q (cert key %s, key %s%s): %v",
		e.KeyFile, e.CertFile, e.CertKey, e.Key, note, e.Err)
}

func (e *KeyMismatchError) Is(target error) bool { return target == ErrKeyMismatch }
func (e *KeyMismatchError) Unwrap() error        { return e.Err }

func mismatchError(certFile, keyFile string, certs []*x509.Certificate, key crypto.Signer, keyBlock *pem.Block) error {
	leaf := leafCandidates(certs)[0]
	e := &KeyMismatchError{CertFile: certFile, KeyFile: keyFile}
	if c := findLeaf(certs, key.Public()); c != nil {
		e.BelongsTo = c.Subject.String()
	}
	e.CertKey, _ = PublicKeyFingerprint(leaf.PublicKey)
	e.Key, _ = PublicKeyFingerprint(key.Public())
	leafPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw})
	if _, err := tls.X509KeyPair(leafPEM, pem.EncodeToMemory(keyBlock)); err != nil {
		e.Err = err
	} else {
		e.Err = errors.New("public keys differ")
	}
	return e
}
