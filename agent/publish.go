package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"os"

	"github.com/mmtls/mmtls/agent/clock"
	"github.com/mmtls/mmtls/agent/clusterdb"
	"github.com/mmtls/mmtls/agent/push"
	"github.com/mmtls/mmtls/certs"
)

// Publisher stores a certificate pair in the cluster's database for every
// node to roll out: `mmtls publish`, and the watch loop on the host that
// holds the certificate ([cluster] publish = true).
type Publisher struct {
	Store *clusterdb.Store
	Key   *clusterdb.Key
	// By names the publisher in the bundle (the host name).
	By string
	// SiteURL, if set, is the host the certificate must cover; by default
	// each node checks it against its own SiteURL.
	SiteURL string
	// CAFile holds the roots the chain must verify to; "" means the
	// system roots.
	CAFile string
	// Retry resumes a halted rollout of the same pair.
	Retry  bool
	Logger *slog.Logger // nil discards
	Clock  clock.Clock  // nil: the system clock
}

// Publish validates the pair as a push does (key match, chain, expiry, key
// usage, key size; the host where SiteURL is given), seals its key and
// stores it, with a notification, in one transaction: a refusal or a
// failure stores nothing. Errors on the input wrap push.ErrRefused.
func (p *Publisher) Publish(ctx context.Context, certFile, keyFile string) (*clusterdb.PublishResult, *certs.Pair, error) {
	pair, err := certs.LoadPair(certFile, keyFile)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", push.ErrRefused, err)
	}
	pol := certs.Policy{Now: clock.Or(p.Clock).Now()}
	if p.SiteURL != "" {
		u, err := url.Parse(p.SiteURL)
		if err != nil || u.Scheme != "https" || u.Hostname() == "" {
			return nil, nil, fmt.Errorf("%w: --site-url %q: want https://host", push.ErrUsage, p.SiteURL)
		}
		pol.Hosts = []string{u.Hostname()}
	}
	if p.CAFile != "" {
		if pol.Roots, err = certs.LoadRoots(p.CAFile); err != nil {
			return nil, nil, fmt.Errorf("%w: --ca-file: %w", push.ErrUsage, err)
		}
		pol.RootsName = fmt.Sprintf("the roots in --ca-file %q", p.CAFile)
	}
	warns, err := certs.Validate(pair, pol)
	for _, w := range warns {
		logger(p.Logger).Warn(w.Message, "code", w.Code)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", push.ErrRefused, err)
	}
	kfp, err := certs.PublicKeyFingerprint(pair.Leaf().PublicKey)
	if err != nil {
		return nil, nil, err
	}
	b := &clusterdb.Bundle{ChainPEM: pair.CertPEM, KeyID: p.Key.ID(), LeafFingerprint: certs.Fingerprint(pair.Leaf()), KeyFingerprint: kfp,
		NotAfter: pair.Leaf().NotAfter, PublishedBy: p.By}
	b.KeySealed = p.Key.Seal(pair.KeyPEM, b.Identity())
	if err := p.Store.Migrate(ctx); err != nil {
		return nil, nil, err
	}
	res, err := p.Store.Publish(ctx, b, p.Retry)
	if err != nil {
		return nil, nil, err
	}
	return res, pair, nil
}

// Push publishes o's source pair: the watch loop's pusher on the host that
// holds the certificate.
func (p *Publisher) Push(ctx context.Context, o push.Options) (*push.Result, error) {
	res, pair, err := p.Publish(ctx, o.CertFile, o.KeyFile)
	if err != nil {
		return nil, err
	}
	status := push.StatusChanged
	if res.Unchanged {
		status = push.StatusUnchanged
	} else {
		logger(p.Logger).Info("published to the cluster", "bundle", res.Bundle.ID, "fingerprint", res.Bundle.LeafFingerprint)
	}
	return &push.Result{Status: status, Certificate: push.CertInfoOf(pair)}, nil
}

// hostname is this host's name, for the node name and the publisher.
func hostname() string {
	h, err := os.Hostname()
	if err != nil {
		return "unknown"
	}
	return h
}
