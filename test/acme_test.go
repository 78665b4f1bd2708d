package test

import (
	"bytes"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"net"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/letsencrypt/pebble/v2/ca"
	"github.com/letsencrypt/pebble/v2/db"
	"github.com/letsencrypt/pebble/v2/va"
	"github.com/letsencrypt/pebble/v2/wfe"
	"github.com/miekg/dns"

	"github.com/mmtls/mmtls/test/fixture"
)

// pebbleCA is Let's Encrypt's test CA, in process: its ACME server over
// TLS, its validation authority connecting to httpPort on the addresses a
// DNS server of the test's gives (127.0.0.1 for every name).
type pebbleCA struct {
	directory string
	roots     string // the ACME server's TLS root and the issuance root, PEM
	srv       *httptest.Server
}

func startPebble(t *testing.T, httpPort int, validity time.Duration) *pebbleCA {
	t.Helper()
	t.Setenv("PEBBLE_VA_NOSLEEP", "1")
	t.Setenv("PEBBLE_WFE_NONCEREJECT", "0")
	logger := log.New(io.Discard, "", 0)
	if testing.Verbose() {
		logger = log.New(os.Stderr, "pebble ", log.Lmicroseconds)
	}
	store := db.NewMemoryStore()
	authority := ca.New(logger, store, "", "ecdsa", 0, 1, map[string]ca.Profile{"default": {Description: "test", ValidityPeriod: uint64(validity.Seconds())}})
	validator := va.New(logger, httpPort, 0, false, startDNS(t), store)
	front := wfe.New(logger, store, validator, authority, nil, false, false, 0, 0)
	srv := httptest.NewUnstartedServer(front.Handler())
	srv.StartTLS()
	t.Cleanup(srv.Close)
	var roots bytes.Buffer
	roots.Write(pemCert(srv.Certificate().Raw))
	roots.Write(authority.GetRootCert(0).PEM())
	path := filepath.Join(t.TempDir(), "pebble-roots.pem")
	os.WriteFile(path, roots.Bytes(), 0o644)
	return &pebbleCA{directory: srv.URL + wfe.DirectoryPath, roots: path, srv: srv}
}

// startDNS answers every A query with 127.0.0.1 (TCP, as pebble asks),
// so the CA validates test names against loopback.
func startDNS(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &dns.Server{Listener: ln, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		for _, q := range r.Question {
			if q.Qtype == dns.TypeA {
				m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 0}, A: net.IPv4(127, 0, 0, 1)})
			}
		}
		w.WriteMsg(m)
	})}
	go s.ActivateAndServe()
	t.Cleanup(func() { s.Shutdown() })
	return ln.Addr().String()
}

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// The certificate from nothing: the balancer host's agent orders it from
// the CA (pebble), answering HTTP-01 on its port-80 listener from memory,
// publishes it, and the real Mattermost nodes roll it out; at two thirds of its (short)
// lifetime it is renewed and rolled out again, and through the balancer no
// connection is refused meanwhile. With the CA gone at renewal time, the
// current certificate keeps serving and the error is logged once.
func TestACMEFromNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: skipping the real Mattermost servers")
	}
	// Two real Mattermost 6.7.2 nodes of one cluster, each on its own
	// loopback address, their agents answering agent checks.
	dc := newDrainCluster(t)
	r, agentPort := dc.r, dc.agentPort
	httpAddr, _ := fixture.PickPort()
	_, portStr, _ := net.SplitHostPort(httpAddr)
	httpPort, _ := strconv.Atoi(portStr)
	// Long enough for a rollout over two real nodes (each drains, restarts,
	// is verified and rejoins) well inside the last third of it.
	const life = 120 * time.Second
	pb := startPebble(t, httpPort, life)
	// The nodes trust pebble's issuance root.
	roots, _ := os.ReadFile(pb.roots)
	os.WriteFile(r.roots, roots, 0o644)
	dc.start()

	dir := t.TempDir()
	listen, _ := fixture.PickPort()
	var ups string
	for _, m := range r.nodes {
		ups += fmt.Sprintf("%q, ", m.addr)
	}
	conf := fmt.Sprintf(`[balance]
listen = [%q]
upstreams = [%s]
redirect_http = %q
site_url = "https://%s"
control_socket = %q
agent_check_port = %d
agent_check_interval = "1s"

[acme]
directory = %q
email = "admin@example.test"
agree_tos = true
ca_file = %q
state_dir = %q
retry_min = "1s"
retry_max = "4s"

[cluster]
publish = true
dsn = %q
key_file = %q
`, listen, strings.TrimSuffix(ups, ", "), httpAddr, fixture.SiteHost, filepath.Join(dir, "balance.sock"), agentPort, pb.directory, pb.roots, filepath.Join(dir, "acme"), r.pg.DSN, r.key)
	os.WriteFile(filepath.Join(dir, "mmtls.toml"), []byte(conf), 0o600)
	out, _ := startDaemon(t, "the balancer host's agent", exec.Command(mmtlsBin, "run", "--config", filepath.Join(dir, "mmtls.toml"), "--log-level", "debug"), 40*time.Second)

	// The first certificate, on every node.
	var first string
	waitFor(t, 3*time.Minute, func() error {
		for _, m := range r.nodes {
			fp, err := served(m.addr)
			if err != nil {
				return err
			}
			if first == "" {
				first = fp
			}
			if fp != first {
				return fmt.Errorf("nodes serve different certificates")
			}
		}
		return nil
	})
	if !strings.Contains(out.String(), "certificate issued") {
		t.Fatalf("no issuance logged:\n%s", out)
	}
	t.Logf("issued and rolled out to both nodes: %s", first)
	res := runMMTLS(t, "doctor", "--config", filepath.Join(dir, "mmtls.toml"), "--json")
	if !strings.Contains(res.stdout, `"id": "acme",
      "status": "ok"`) {
		t.Errorf("doctor's acme check on the balancer host:\n%s", res.stdout)
	}

	// A second balancer host, started now: it takes the cluster's
	// certificate for its schedule and orders nothing. (It stops before
	// the renewal: pebble validates on the first host's port only.)
	dir2 := t.TempDir()
	listen2, _ := fixture.PickPort()
	http2, _ := fixture.PickPort()
	conf2 := strings.NewReplacer(listen, listen2, httpAddr, http2, filepath.Join(dir, "balance.sock"), filepath.Join(dir2, "balance.sock"),
		filepath.Join(dir, "acme"), filepath.Join(dir2, "acme")).Replace(conf)
	os.WriteFile(filepath.Join(dir2, "mmtls.toml"), []byte(conf2), 0o600)
	out2, stop2 := startDaemon(t, "the second balancer host's agent", exec.Command(mmtlsBin, "run", "--config", filepath.Join(dir2, "mmtls.toml"), "--log-level", "debug"), 40*time.Second)
	waitFor(t, 30*time.Second, func() error {
		if !strings.Contains(out2.String(), "ACME: the cluster's certificate is current") {
			return fmt.Errorf("the second host has not looked at the cluster's certificate")
		}
		return nil
	})
	stop2()
	if strings.Contains(out2.String(), "certificate issued") || strings.Contains(out2.String(), "ACME: no new certificate") {
		t.Errorf("the second balancer host ordered:\n%s", out2)
	}

	// The renewal, at two thirds of the lifetime, with fresh TLS
	// connections through the balancer all along.
	l := startLoad(t, listen, pb.roots)
	waitFor(t, 2*life, func() error {
		for _, m := range r.nodes {
			fp, err := served(m.addr)
			if err != nil || fp == first {
				return fmt.Errorf("%s still serves the first certificate (%v)", m.name, err)
			}
		}
		return nil
	})
	if ok, failed := l.end(t, "through mmtls balance during the ACME renewal"); failed != 0 || ok == 0 {
		t.Errorf("%d requests failed during the renewal (%d ok)", failed, ok)
	}

	// The CA goes away: at the next renewal the current certificate keeps
	// serving, the error is logged once, and retries back off.
	pb.srv.Close()
	second, _ := served(r.nodes[0].addr)
	waitFor(t, 2*life, func() error {
		if !strings.Contains(out.String(), "ACME: no new certificate; the current one keeps serving") {
			return fmt.Errorf("no renewal failure yet")
		}
		return nil
	})
	if fp, err := served(r.nodes[0].addr); err != nil || fp != second {
		t.Errorf("after a failed renewal the node serves %s (%v), want %s", fp, err, second)
	}
	waitFor(t, 30*time.Second, func() error {
		if strings.Count(out.String(), "ACME: still failing") < 2 {
			return fmt.Errorf("not retried yet")
		}
		return nil
	})
	if n := strings.Count(out.String(), "ACME: no new certificate"); n != 1 {
		t.Errorf("the same failure logged %d times at error level, want once", n)
	}
}

// Bad ACME settings are refused at start, naming the key: nothing is
// ordered, nothing published.
func TestACMERefusals(t *testing.T) {
	dir := t.TempDir()
	for name, acme := range map[string]string{
		"no agreement": "directory = \"https://127.0.0.1:1/dir\"\n",
		"invalid name": "directory = \"https://127.0.0.1:1/dir\"\nagree_tos = true\nnames = [\"not a name\"]\n",
	} {
		conf := fmt.Sprintf("[balance]\nlisten = [\"127.0.0.1:0\"]\nupstreams = [\"127.0.0.1:1\"]\nredirect_http = \"127.0.0.1:0\"\nsite_url = \"https://%s\"\ncontrol_socket = %q\n\n[acme]\n%s",
			fixture.SiteHost, filepath.Join(dir, "b.sock"), acme)
		path := filepath.Join(dir, "mmtls.toml")
		os.WriteFile(path, []byte(conf), 0o600)
		res := runMMTLS(t, "run", "--config", path)
		want := map[string]string{"no agreement": "[acme] agree_tos", "invalid name": `[acme] names: "not a name"`}[name]
		if res.code != 2 || !strings.Contains(res.stderr, want) {
			t.Errorf("%s: want exit 2 naming %s:\n%s", name, want, res)
		}
	}
}
