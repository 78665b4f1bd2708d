package test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mmtls/mmtls/agent/clock"
	"github.com/mmtls/mmtls/agent/doctor"
	"github.com/mmtls/mmtls/agent/push"
	"github.com/mmtls/mmtls/test/fixture"
	"github.com/mmtls/mmtls/test/pki"
)

// doctorNode is a healthy stand-in node: its pair pushed, TLS verified.
type doctorNode struct {
	*node
	pairs []*fixture.Pair
	roots string
	addr  string
}

func newDoctorNode(t testing.TB) *doctorNode {
	t.Helper()
	n := newNode(t)
	ps, roots := n.pairs(2)
	addr, _ := fixture.PickPort()
	dn := &doctorNode{node: n, pairs: ps, roots: roots, addr: addr}
	dn.push(ps[0])
	return dn
}

func (dn *doctorNode) push(p *fixture.Pair, extra ...string) {
	dn.t.Helper()
	dn.mustPush(p, dn.roots, append([]string{"--listen", dn.addr, "--restart-command", dn.restartCmd()}, extra...)...)
}

func (dn *doctorNode) options() doctor.Options {
	return doctor.Options{
		Push:     push.Options{MattermostDir: dn.tree.MattermostDir, StateDir: dn.tree.StateDir, CAFile: dn.roots, Owner: mmUser},
		UnitDirs: []string{dn.tree.UnitDir},
	}
}

// diagnose runs the doctor in process and returns its checks by id.
func (dn *doctorNode) diagnose(o doctor.Options) map[string]doctor.Check {
	dn.t.Helper()
	out := map[string]doctor.Check{}
	for _, c := range doctor.Run(context.Background(), o) {
		if _, dup := out[c.ID]; dup {
			dn.t.Errorf("check %s reported twice", c.ID)
		}
		out[c.ID] = c
	}
	return out
}

// want asserts one check's status, and that a check not ok says its fix.
func want(t *testing.T, cs map[string]doctor.Check, id string, st doctor.Status) {
	t.Helper()
	c, ok := cs[id]
	switch {
	case !ok:
		t.Errorf("no check %s", id)
	case c.Status != st:
		t.Errorf("%s: %s (%s), want %s", id, c.Status, c.Message, st)
	case (st == doctor.Fail || st == doctor.Warn) && c.Fix == "":
		t.Errorf("%s is %s without a fix: %s", id, st, c.Message)
	}
}

// editConfig changes the node's config.json as an admin (or the System
// Console) would, behind mmtls's back.
func (dn *doctorNode) editConfig(f func(ss, root map[string]any)) {
	dn.t.Helper()
	var cfg map[string]any
	b, err := os.ReadFile(dn.tree.ConfigPath)
	if err != nil {
		dn.t.Fatal(err)
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		dn.t.Fatal(err)
	}
	f(cfg["ServiceSettings"].(map[string]any), cfg)
	b, _ = json.MarshalIndent(cfg, "", "  ")
	if err := os.WriteFile(dn.tree.ConfigPath, b, 0o600); err != nil {
		dn.t.Fatal(err)
	}
}

var healthyChecks = []string{"site-url", "pair-matches", "cert-host", "cert-chain", "cert-expiry", "files", "config", "bind-privilege", "served", "served-chain", "tls-policy", "lets-encrypt"}

func wantHealthy(t *testing.T, cs map[string]doctor.Check) {
	t.Helper()
	for _, id := range healthyChecks {
		want(t, cs, id, doctor.OK)
	}
}

// A healthy node: every check that applies is ok, the rest skip with a
// reason; the command exits 0 and prints JSON with stable ids.
func TestDoctorHealthyNode(t *testing.T) {
	dn := newDoctorNode(t)
	cs := dn.diagnose(dn.options())
	wantHealthy(t, cs)
	for _, id := range []string{"office365-redirect", "http-redirect", "source", "balancer", "cluster", "acme"} {
		want(t, cs, id, doctor.Skip)
	}
	r := runMMTLS(t, "doctor", "--json", "--mattermost-dir", dn.tree.MattermostDir, "--state-dir", dn.tree.StateDir, "--ca-file", dn.roots, "--owner", mmUser)
	var out struct{ Checks []doctor.Check }
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil || r.code != 0 || len(out.Checks) != 19 {
		t.Fatalf("doctor --json: %v\n%s", err, r)
	}
	// A balancer in front, and the plain-HTTP redirect.
	httpAddr, _ := fixture.PickPort()
	bal := startBalancer(t, "--upstream", dn.addr, "--redirect-http", httpAddr, "--site-url", "https://"+fixture.SiteHost)
	o := dn.options()
	o.Balancer, o.HTTPRedirect = bal.addr, httpAddr
	cs = dn.diagnose(o)
	want(t, cs, "balancer", doctor.OK)
	want(t, cs, "http-redirect", doctor.OK)
}

// One broken thing at a time: recognised by its id, with a fix that, done,
// turns it ok again.
func TestDoctorFindsWhatIsBroken(t *testing.T) {
	dn := newDoctorNode(t)
	o := dn.options()
	restart := func() {
		t.Helper()
		if err := dn.tree.RunCtl(context.Background(), standinBin, "restart"); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 20*time.Second, func() error { _, err := served(dn.addr); return err })
	}

	t.Run("http SiteURL with Office 365 on", func(t *testing.T) {
		dn.editConfig(func(ss, root map[string]any) {
			ss["SiteURL"] = "http://" + fixture.SiteHost
			root["Office365Settings"] = map[string]any{"Enable": true, "Id": "x", "Secret": "y"}
		})
		cs := dn.diagnose(o)
		want(t, cs, "site-url", doctor.Fail)
		want(t, cs, "office365-redirect", doctor.Fail)
		dn.push(dn.pairs[0], "--site-url", "https://"+fixture.SiteHost) // the fix
		cs = dn.diagnose(o)
		want(t, cs, "site-url", doctor.OK)
		want(t, cs, "office365-redirect", doctor.OK)
		if m := cs["office365-redirect"].Message; !strings.Contains(m, "https://"+fixture.SiteHost+"/signup/office365/complete") {
			t.Errorf("the redirect URI to register: %s", m)
		}
	})

	t.Run("a leaf without its intermediate", func(t *testing.T) {
		cert := filepath.Join(dn.tree.ConfigDir, "fullchain.pem")
		os.WriteFile(cert, dn.pairs[0].Chain.Leaf.CertPEM, 0o400)
		restart()
		cs := dn.diagnose(o)
		want(t, cs, "cert-chain", doctor.Fail)
		want(t, cs, "served-chain", doctor.Fail)
		dn.push(dn.pairs[0])
		wantHealthy(t, dn.diagnose(o))
	})

	t.Run("TLSMinVer 1.0", func(t *testing.T) {
		dn.editConfig(func(ss, _ map[string]any) { ss["TLSMinVer"] = "1.0" })
		restart()
		want(t, dn.diagnose(o), "tls-policy", doctor.Warn)
		dn.editConfig(func(ss, _ map[string]any) { ss["TLSMinVer"] = "1.2" })
		restart()
		want(t, dn.diagnose(o), "tls-policy", doctor.OK)
	})

	t.Run("UseLetsEncrypt left on", func(t *testing.T) {
		dn.editConfig(func(ss, _ map[string]any) { ss["UseLetsEncrypt"] = true })
		want(t, dn.diagnose(o), "lets-encrypt", doctor.Fail)
		dn.push(dn.pairs[0])
		want(t, dn.diagnose(o), "lets-encrypt", doctor.OK)
	})

	t.Run("a key that does not match, behind mmtls's back", func(t *testing.T) {
		os.WriteFile(filepath.Join(dn.tree.ConfigDir, "privkey.pem"), dn.pairs[1].Chain.Leaf.KeyPEM, 0o400)
		want(t, dn.diagnose(o), "pair-matches", doctor.Fail)
		dn.push(dn.pairs[0])
		wantHealthy(t, dn.diagnose(o))
	})

	t.Run("a certificate for another host", func(t *testing.T) {
		c, err := pki.NewChain(pki.Leaf{DNSNames: []string{"other.example.test"}}, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		other := &fixture.Pair{Chain: c, CertFile: filepath.Join(dir, "fullchain.pem"), KeyFile: filepath.Join(dir, "privkey.pem")}
		os.WriteFile(other.CertFile, c.FullChain(), 0o600)
		os.WriteFile(other.KeyFile, c.Leaf.KeyPEM, 0o600)
		roots := filepath.Join(dir, "roots.pem")
		fixture.Roots(roots, dn.pairs[0], dn.pairs[1], other)
		dn.mustPush(other, roots, "--listen", dn.addr, "--restart-command", dn.restartCmd(), "--allow-host-mismatch")
		oo := o
		oo.Push.CAFile = roots
		want(t, dn.diagnose(oo), "cert-host", doctor.Fail)
		dn.push(dn.pairs[0])
		want(t, dn.diagnose(o), "cert-host", doctor.OK)
	})

	t.Run("the key readable by others", func(t *testing.T) {
		os.Chmod(filepath.Join(dn.tree.ConfigDir, "privkey.pem"), 0o644)
		want(t, dn.diagnose(o), "files", doctor.Fail)
		dn.push(dn.pairs[0])
		want(t, dn.diagnose(o), "files", doctor.OK)
	})

	t.Run("an environment override", func(t *testing.T) {
		os.WriteFile(filepath.Join(dn.tree.UnitDir, "mattermost.service"), []byte("[Service]\nExecStart=/opt/mattermost/bin/mattermost\n"), 0o644)
		dropIn := filepath.Join(dn.tree.UnitDir, "mattermost.service.d", "override.conf")
		os.MkdirAll(filepath.Dir(dropIn), 0o755)
		os.WriteFile(dropIn, []byte("[Service]\nEnvironment=MM_SERVICESETTINGS_TLSCERTFILE="+filepath.Join(dn.tree.ConfigDir, "fullchain.pem")+"\n"), 0o644)
		cs := dn.diagnose(o)
		want(t, cs, "config", doctor.Warn)
		if !strings.Contains(cs["config"].Message, dropIn+":2") {
			t.Errorf("the override's file and line: %s", cs["config"].Message)
		}
		os.RemoveAll(filepath.Dir(dropIn))
		os.Remove(filepath.Join(dn.tree.UnitDir, "mattermost.service"))
		want(t, dn.diagnose(o), "config", doctor.OK)
	})

	t.Run("port 443 without the privilege", func(t *testing.T) {
		dn.editConfig(func(ss, _ map[string]any) { ss["ListenAddress"] = ":443" })
		want(t, dn.diagnose(o), "bind-privilege", doctor.Fail)
		// The fix a push applies under systemd: the drop-in.
		os.WriteFile(filepath.Join(dn.tree.UnitDir, "mattermost.service"), []byte("[Service]\nExecStart=/opt/mattermost/bin/mattermost\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n"), 0o644)
		want(t, dn.diagnose(o), "bind-privilege", doctor.OK)
		os.Remove(filepath.Join(dn.tree.UnitDir, "mattermost.service"))
		dn.editConfig(func(ss, _ map[string]any) { ss["ListenAddress"] = dn.addr })
	})

	t.Run("serving an old certificate", func(t *testing.T) {
		dn.mustPush(dn.pairs[1], dn.roots, "--listen", dn.addr, "--no-restart")
		want(t, dn.diagnose(o), "served", doctor.Fail)
		dn.push(dn.pairs[1]) // the same pair: push sees it is not served and restarts
		wantHealthy(t, dn.diagnose(o))
	})

	t.Run("expired (a clock past NotAfter)", func(t *testing.T) {
		oo := o
		oo.Clock = clock.NewFake(dn.pairs[1].Chain.Leaf.Cert.NotAfter.Add(24 * time.Hour))
		want(t, dn.diagnose(oo), "cert-expiry", doctor.Fail)
		want(t, dn.diagnose(o), "cert-expiry", doctor.OK)
	})
}

// The whole doctor on a healthy node, every check that applies run (the
// target: under 2 s, quick enough for every login to the box).
func BenchmarkDoctorHealthyNode(b *testing.B) {
	if testing.Short() {
		b.Skip("-short")
	}
	dn := newDoctorNode(b)
	o := dn.options()
	b.ResetTimer()
	for b.Loop() {
		if cs := doctor.Run(context.Background(), o); doctor.Failed(cs) {
			b.Fatalf("not healthy: %+v", cs)
		}
	}
}
