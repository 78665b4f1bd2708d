package balance

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/mmtls/mmtls/certs"
)

// acmeToken is what an HTTP-01 challenge token looks like (base64url).
var acmeToken = regexp.MustCompile(`^[A-Za-z0-9_-]{1,256}$`)

const acmePrefix = "/.well-known/acme-challenge/"

// RedirectHandler sends every plain-HTTP request to https://<SiteURL's
// host> with the same path and query (301), except ACME HTTP-01 challenges,
// served from webroot/.well-known/acme-challenge/ (certbot --webroot) so
// renewals keep working; without a webroot they get 404. Mattermost's own
// Forward80To443 cannot work behind a passthrough balancer.
func RedirectHandler(siteURL, webroot string) (http.Handler, error) {
	return redirectHandler(siteURL, webroot, nil)
}

// Challenges answers HTTP-01 challenges from memory (the agent's own ACME
// client), before the webroot.
type Challenges interface {
	Lookup(token string) (keyAuthorization string, ok bool)
}

func redirectHandler(siteURL, webroot string, mem Challenges) (http.Handler, error) {
	u, err := url.Parse(siteURL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("--site-url %q: want https://host", siteURL)
	}
	host := u.Host
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if tok, ok := strings.CutPrefix(r.URL.Path, acmePrefix); ok {
			if mem != nil && acmeToken.MatchString(tok) {
				if ka, ok := mem.Lookup(tok); ok {
					w.Header().Set("Content-Type", "text/plain")
					io.WriteString(w, ka)
					return
				}
			}
			if webroot == "" || !acmeToken.MatchString(tok) {
				http.NotFound(w, r)
				return
			}
			serveChallenge(w, r, webroot, tok)
			return
		}
		http.Redirect(w, r, "https://"+host+r.URL.RequestURI(), http.StatusMovedPermanently)
	}), nil
}

// maxChallenge bounds an HTTP-01 key authorization (token, a dot and a
// 43-character thumbprint).
const maxChallenge = 4 << 10

// serveChallenge answers an HTTP-01 challenge from the webroot: a regular
// file beneath it, opened without following any symlink (the balancer runs
// as root; a link planted there must not serve a root-only file to anyone).
func serveChallenge(w http.ResponseWriter, r *http.Request, webroot, tok string) {
	d, err := certs.OpenDir(filepath.Join(webroot, ".well-known", "acme-challenge"))
	if err != nil {
		http.NotFound(w, r)
		return
	}
	defer d.Close()
	data, _, err := d.ReadFile(tok, maxChallenge)
	if err != nil {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	w.Write(data)
}

// serveRedirect runs the redirect listener until ctx ends.
func serveRedirect(ctx context.Context, addr, siteURL, webroot string, mem Challenges, log *slog.Logger) (func(), error) {
	h, err := redirectHandler(siteURL, webroot, mem)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if webroot != "" {
		if fi, err := os.Stat(webroot); err != nil || !fi.IsDir() {
			return nil, fmt.Errorf("%w: --acme-webroot %q: not a directory", ErrInvalid, webroot)
		}
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--redirect-http %s: %w", addr, err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: time.Minute}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logger(log).Error("redirect listener stopped", "err", err)
		}
	}()
	stop := context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	})
	logger(log).Info("redirecting plain HTTP to https", "listen", ln.Addr().String(), "site_url", siteURL, "acme_webroot", webroot)
	return func() { <-done; stop() }, nil
}
