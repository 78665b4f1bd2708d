package clusterdb

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// DefaultKeyFile is where the cluster key lives on the publisher and on
// every node.
const DefaultKeyFile = "/etc/mmtls/cluster.key"

// ErrWrongKey is returned when a bundle was sealed with another cluster key
// than the node's.
var ErrWrongKey = errors.New("sealed with another cluster key")

// Key is the cluster key: 32 random bytes that seal every bundle's private
// key with AES-256-GCM. The same file goes to the publisher and every node.
type Key struct {
	file string
	id   string
	aead cipher.AEAD
}

// ID identifies the key without revealing it: "k1:" and the first 16 hex
// digits of its SHA-256. It is stored beside each sealed key.
func (k *Key) ID() string { return k.id }

// File is where the key was read from, for messages.
func (k *Key) File() string { return k.file }

// GenerateKey writes a new random key to path: base64, root-owned, 0400.
// It refuses to overwrite an existing file.
func GenerateKey(path string) error {
	var raw [32]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("cluster key %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o400)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("cluster key %s exists already: it seals every published bundle, so it is never overwritten; copy it to the nodes, or remove it first to start over (then publish again)", path)
	}
	if err != nil {
		return fmt.Errorf("cluster key %s: %w", path, err)
	}
	_, werr := f.WriteString(base64.StdEncoding.EncodeToString(raw[:]) + "\n")
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(path)
		return fmt.Errorf("cluster key %s: %w", path, err)
	}
	return nil
}

// LoadKey reads the cluster key. Like the agent's config, the file must be
// root's and readable by no one else.
func LoadKey(path string) (*Key, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("cluster key: %w (make one with `mmtls cluster keygen --out %s` and copy it to every node)", err, path)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("cluster key %s: %w", path, err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if !fi.Mode().IsRegular() || st.Uid != 0 || fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("cluster key %s is owned by uid %d with mode %04o: it must be a file of root's that no one else can read (chown root %s; chmod 400 %s)",
			path, st.Uid, fi.Mode().Perm(), path, path)
	}
	buf := make([]byte, 256)
	n, _ := f.Read(buf)
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(buf[:n])))
	if err != nil || len(raw) != 32 {
		return nil, fmt.Errorf("cluster key %s: not 32 bytes of base64, as `mmtls cluster keygen` writes", path)
	}
	return newKey(path, raw)
}

func newKey(file string, raw []byte) (*Key, error) {
	block, err := aes.NewCipher(raw)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(raw)
	return &Key{file: file, id: "k1:" + hex.EncodeToString(sum[:8]), aead: aead}, nil
}

// Seal encrypts a private key for a bundle; identity (the bundle's leaf
// and key fingerprints) is bound as additional data, so a sealed key
// cannot be moved to another bundle.
func (k *Key) Seal(plain []byte, identity string) []byte {
	nonce := make([]byte, k.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return k.aead.Seal(nonce, nonce, plain, []byte(identity))
}

// Open decrypts what Seal sealed for identity under keyID. A key id that
// is not k's is ErrWrongKey, with both ids and k's file in the message.
func (k *Key) Open(sealed []byte, keyID, identity string) ([]byte, error) {
	if keyID != k.id {
		return nil, fmt.Errorf("the bundle was sealed with key id %s, this node's key file %s has key id %s: copy the publisher's cluster key here: %w",
			keyID, k.file, k.id, ErrWrongKey)
	}
	ns := k.aead.NonceSize()
	if len(sealed) < ns {
		return nil, errors.New("sealed key is truncated")
	}
	plain, err := k.aead.Open(nil, sealed[:ns], sealed[ns:], []byte(identity))
	if err != nil {
		return nil, fmt.Errorf("unseal the bundle's key: %w", err)
	}
	return plain, nil
}
