package push

import (
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mmtls/mmtls/certs"
	"github.com/mmtls/mmtls/test/pki"
)

const testHost = "chat.example.test"

type tlsFixture struct {
	chain  *pki.Chain
	caFile string
}

func newTLSFixture(t *testing.T) *tlsFixture {
	t.Helper()
	c, err := pki.NewChain(pki.Leaf{DNSNames: []string{testHost}}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	ca := filepath.Join(t.TempDir(), "root.pem")
	if err := os.WriteFile(ca, c.Root.PEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	return &tlsFixture{chain: c, caFile: ca}
}

func (f *tlsFixture) cert() tls.Certificate {
	return tls.Certificate{
		Certificate: [][]byte{f.chain.Leaf.Cert.Raw, f.chain.Intermediate.Cert.Raw},
		PrivateKey:  f.chain.Leaf.Key,
		Leaf:        f.chain.Leaf.Cert,
	}
}

// mattermost starts an in-process HTTPS server on loopback that answers the
// ping with body.
func (f *tlsFixture) mattermost(t *testing.T, cfg *tls.Config, handler http.HandlerFunc) string {
	t.Helper()
	srv := httptest.NewUnstartedServer(handler)
	if cfg == nil {
		cfg = &tls.Config{}
	}
	cfg.Certificates = []tls.Certificate{f.cert()}
	srv.TLS = cfg
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

func okPing(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/api/v4/system/ping" {
		http.NotFound(w, r)
		return
	}
	w.Write([]byte(`{"status":"OK"}`))
}

func (f *tlsFixture) expect(addr string) Expectation {
	return Expectation{Addr: addr, TLS: true, ServerName: testHost, Leaf: certs.Fingerprint(f.chain.Leaf.Cert),
		CAFile: f.caFile, PingPath: "/api/v4/system/ping"}
}

func TestVerifierCheck(t *testing.T) {
	f := newTLSFixture(t)
	other := newTLSFixture(t)
	good := f.mattermost(t, nil, okPing)
	tls13only := f.mattermost(t, &tls.Config{MinVersion: tls.VersionTLS13}, okPing)
	unhealthy := f.mattermost(t, nil, func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusInternalServerError)
		w.Write([]byte(`{"status":"UNHEALTHY"}`))
	})
	notOK := f.mattermost(t, nil, func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte(`{"status":"DEGRADED"}`)) })

	tests := []struct {
		name string
		exp  Expectation
		want string
	}{
		{"serves the new leaf", f.expect(good), ""},
		{"serves another leaf", other.expect(good), "server presents certificate " + certs.Fingerprint(f.chain.Leaf.Cert)},
		{"untrusted chain", func() Expectation { e := f.expect(good); e.CAFile = other.caFile; return e }(), "served chain does not verify"},
		{"wrong name", func() Expectation { e := f.expect(good); e.ServerName = "other.example"; return e }(), "served chain does not verify"},
		{"wrong name allowed", func() Expectation {
			e := f.expect(good)
			e.ServerName, e.SkipHostCheck = "other.example", true
			return e
		}(), ""},
		{"no TLS 1.2", f.expect(tls13only), "TLS 1.2 handshake with"},
		{"ping 500", f.expect(unhealthy), "HTTP 500"},
		{"ping not OK", f.expect(notOK), `status "DEGRADED", want "OK"`},
		{"subpath", func() Expectation { e := f.expect(good); e.PingPath = "/mm/api/v4/system/ping"; return e }(), "HTTP 404"},
	}
	v := &Verifier{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := v.Check(context.Background(), tt.exp)
			if tt.want == "" {
				if err != nil {
					t.Errorf("Check: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Check = %v, want %q", err, tt.want)
			}
		})
	}
}

// A server that keeps its port bound but never completes a handshake
// (Mattermost 6.7.2 with a key it cannot use) fails verification.
func TestVerifierCatchesHungServer(t *testing.T) {
	f := newTLSFixture(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	v := &Verifier{Timeout: 500 * time.Millisecond}
	err = v.Wait(context.Background(), f.expect(ln.Addr().String()))
	if err == nil || !strings.Contains(err.Error(), "not verified after 500ms") {
		t.Errorf("Wait on a hung server = %v", err)
	}
}

// Wait keeps trying while Mattermost starts.
func TestVerifierWaitsForStart(t *testing.T) {
	f := newTLSFixture(t)
	var calls atomic.Int32
	addr := f.mattermost(t, nil, func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) < 3 {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		okPing(w, r)
	})
	if err := (&Verifier{Timeout: 20 * time.Second}).Wait(context.Background(), f.expect(addr)); err != nil {
		t.Fatalf("Wait: %v", err)
	}
	if calls.Load() != 3 {
		t.Errorf("ping called %d times, want 3", calls.Load())
	}
}

func TestVerifierPlainHTTP(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(okPing))
	defer srv.Close()
	exp := Expectation{Addr: srv.Listener.Addr().String(), PingPath: "/api/v4/system/ping"}
	if err := (&Verifier{}).Check(context.Background(), exp); err != nil {
		t.Errorf("plain ping: %v", err)
	}
}
