package push

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/mmtls/mmtls/agent/clock"
	"github.com/mmtls/mmtls/agent/passthrough"
	"github.com/mmtls/mmtls/certs"
)

// Verification defaults.
const (
	// verifyStepTimeout bounds each dial, handshake and ping.
	verifyStepTimeout = 5 * time.Second
	// verifyInterval is the pause between attempts.
	verifyInterval = 250 * time.Millisecond
)

// Expectation is what a verified Mattermost serves. It is plain data, kept
// in the journal so an interrupted push can be verified by the next run.
type Expectation struct {
	// Addr is where to connect, host:port.
	Addr string `json:"addr"`
	// TLS is false for a plain-HTTP Mattermost (before its first push).
	TLS bool `json:"tls"`
	// ServerName is the SNI sent and the name the chain is verified for.
	ServerName string `json:"server_name"`
	// Leaf is the fingerprint (certs.Fingerprint) the server must present.
	// Empty accepts any leaf.
	Leaf string `json:"leaf,omitempty"`
	// CAFile holds the roots to verify against; empty means the system roots.
	CAFile string `json:"ca_file,omitempty"`
	// SkipHostCheck verifies the chain without the server name (a push
	// made with --allow-host-mismatch).
	SkipHostCheck bool `json:"skip_host_check,omitempty"`
	// SkipChainCheck checks only the leaf's fingerprint (the old state
	// after a rollback is what it was, trusted or not).
	SkipChainCheck bool `json:"skip_chain_check,omitempty"`
	// PingPath is SiteURL's path followed by /api/v4/system/ping.
	PingPath string `json:"ping_path"`
}

func (e Expectation) String() string {
	if !e.TLS {
		return "plain HTTP on " + e.Addr
	}
	if e.Leaf == "" {
		return "TLS on " + e.Addr
	}
	return "TLS on " + e.Addr + " with certificate " + e.Leaf
}

// Describe says in full what a verification of e checks.
func (e Expectation) Describe() string {
	if !e.TLS {
		return fmt.Sprintf("GET %s on plain HTTP at %s answers OK", e.PingPath, e.Addr)
	}
	name := e.ServerName
	if e.SkipHostCheck {
		name += " (chain only, --allow-host-mismatch)"
	}
	leaf := "a trusted certificate"
	if e.Leaf != "" {
		leaf = "certificate " + e.Leaf
	}
	return fmt.Sprintf("TLS 1.2 and 1.3 handshakes to %s for %s present %s, and GET %s answers OK", e.Addr, name, leaf, e.PingPath)
}

// Verifier checks that Mattermost serves what it should, with real TLS
// handshakes and Mattermost's own health endpoint. Safe for concurrent use.
type Verifier struct {
	// Timeout bounds Wait. 0 means DefaultVerifyTimeout.
	Timeout time.Duration
	// Logger receives progress. Nil discards.
	Logger *slog.Logger
	// Clock is what chains are verified at. Nil means the system clock.
	// The retries and Timeout are real time.
	Clock clock.Clock
}

// Wait retries Check until it succeeds or Timeout passes, and returns the
// last failure. A Mattermost that keeps its port bound but never completes a
// handshake (6.7.2 with a key it cannot use) fails here.
func (v *Verifier) Wait(ctx context.Context, exp Expectation) error {
	timeout := orDefault(v.Timeout, DefaultVerifyTimeout)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	t := time.NewTimer(0)
	defer t.Stop()
	var last error
	for attempt := 1; ; attempt++ {
		select {
		case <-ctx.Done():
			if last == nil {
				last = ctx.Err()
			}
			return fmt.Errorf("verify %s: not verified after %s (%d attempt(s)): %w", exp, timeout, attempt-1, last)
		case <-t.C:
		}
		last = v.Check(ctx, exp)
		if last == nil {
			logger(v.Logger).Info("verified", "expect", exp.String(), "attempts", attempt)
			return nil
		}
		if attempt == 1 {
			logger(v.Logger).Info("waiting for mattermost", "expect", exp.String(), "err", last)
		}
		t.Reset(verifyInterval)
	}
}

// Check makes one attempt: for TLS, a handshake at TLS 1.3 and one at 1.2
// (an ECDSA key with RSA-only TLSOverwriteCiphers fails only at 1.2), each
// presenting exactly the expected leaf and a chain that verifies; then the
// ping, which must answer 200 with "status":"OK".
func (v *Verifier) Check(ctx context.Context, exp Expectation) error {
	var tc *tls.Config
	if exp.TLS {
		var roots *x509.CertPool
		if exp.CAFile != "" && !exp.SkipChainCheck {
			var err error
			if roots, err = certs.LoadRoots(exp.CAFile); err != nil {
				return fmt.Errorf("--ca-file: %w", err)
			}
		}
		tc = &tls.Config{
			ServerName:         exp.ServerName,
			InsecureSkipVerify: true, // verified below, to say exactly what is wrong
			VerifyConnection: func(cs tls.ConnectionState) error {
				return v.verifyPeer(cs, exp, roots)
			},
		}
		for _, ver := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
			c := tc.Clone()
			c.MinVersion, c.MaxVersion = ver, ver
			if err := handshake(ctx, exp.Addr, c); err != nil {
				return fmt.Errorf("%s handshake with %s: %w", tls.VersionName(ver), exp.Addr, err)
			}
		}
	}
	return ping(ctx, exp, tc)
}

func (v *Verifier) verifyPeer(cs tls.ConnectionState, exp Expectation, roots *x509.CertPool) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("server presented no certificate")
	}
	leaf := cs.PeerCertificates[0]
	if got := certs.Fingerprint(leaf); exp.Leaf != "" && got != exp.Leaf {
		return fmt.Errorf("server presents certificate %s (%s, expires %s), want %s",
			got, leaf.Subject, leaf.NotAfter.UTC().Format(time.RFC3339), exp.Leaf)
	}
	if exp.SkipChainCheck {
		return nil
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	opts := x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: clock.Or(v.Clock).Now()}
	if !exp.SkipHostCheck {
		opts.DNSName = exp.ServerName
	}
	if _, err := leaf.Verify(opts); err != nil {
		return fmt.Errorf("served chain does not verify: %w", err)
	}
	return nil
}

func handshake(ctx context.Context, addr string, c *tls.Config) error {
	ctx, cancel := context.WithTimeout(ctx, verifyStepTimeout)
	defer cancel()
	d := &tls.Dialer{Config: c}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	return conn.Close()
}

// ping asks Mattermost's health endpoint at exp.Addr: over TLS with tc
// and SiteURL's host, or plain HTTP when tc is nil.
func ping(ctx context.Context, exp Expectation, tc *tls.Config) error {
	ctx, cancel := context.WithTimeout(ctx, verifyStepTimeout)
	defer cancel()
	return passthrough.Ping(ctx, exp.Addr, tc, exp.ServerName, exp.PingPath)
}
