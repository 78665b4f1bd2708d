package test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/mmtls/mmtls/test/fixture"
	"github.com/mmtls/mmtls/test/pki"
)

// The whole life of a node: first push from plain HTTP, an identical push
// that restarts nothing, a renewal, bad pairs refused while the current
// certificate keeps serving.
func TestPushLifecycle(t *testing.T) {
	n := newNode(t)
	now := time.Now()
	p1, err := fixture.WritePair(filepath.Join(n.tree.Root, "src1"), now)
	if err != nil {
		t.Fatal(err)
	}
	p2, err := fixture.WritePair(filepath.Join(n.tree.Root, "src2"), now)
	if err != nil {
		t.Fatal(err)
	}
	roots := filepath.Join(n.tree.Root, "roots.pem")
	if err := fixture.Roots(roots, p1, p2); err != nil {
		t.Fatal(err)
	}
	tlsAddr, err := fixture.PickPort()
	if err != nil {
		t.Fatal(err)
	}
	restart := n.restartCmd()
	// The stand-in rewrote config.json at start with the keys its model
	// knows. A newer Mattermost writes keys this model does not know: add
	// some, as it would have, and keep a copy to compare with.
	b, err := os.ReadFile(n.tree.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	b = []byte(strings.Replace(string(b), "{", `{"FutureSettingsNoServerKnows": {"Enabled": true, "Level": 3},`, 1))
	if err := os.WriteFile(n.tree.ConfigPath, b, 0o600); err != nil {
		t.Fatal(err)
	}
	var pre map[string]any
	if err := json.Unmarshal(b, &pre); err != nil {
		t.Fatal(err)
	}
	push := func(p *fixture.Pair, extra ...string) (result, map[string]any) {
		args := n.pushArgs(p, roots, append([]string{"--listen", tlsAddr, "--restart-command", restart}, extra...)...)
		return pushJSON(t, args...)
	}

	// First push: plain HTTP -> TLS on a new port, verified.
	r, res := push(p1)
	if r.code != 0 {
		t.Fatalf("first push failed:\n%s", r)
	}
	if res["status"] != "changed" || res["verified"] != true || n.restarts() != 1 {
		t.Fatalf("first push: status %v verified %v restarts %d", res["status"], res["verified"], n.restarts())
	}
	assertServes(t, tlsAddr, p1)

	// What mmtls wrote, before the stand-in rewrote it at start: owned
	// keys set, unknown keys kept.
	var written map[string]map[string]any
	b, err = os.ReadFile(filepath.Join(n.tree.Root, "config-before-restart.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &written); err != nil {
		t.Fatal(err)
	}
	ss := written["ServiceSettings"]
	want := map[string]any{
		"ListenAddress": tlsAddr, "ConnectionSecurity": "TLS", "UseLetsEncrypt": false,
		"TLSCertFile": filepath.Join(n.tree.ConfigDir, "fullchain.pem"),
		"TLSKeyFile":  filepath.Join(n.tree.ConfigDir, "privkey.pem"),
	}
	for k, v := range want {
		if ss[k] != v {
			t.Errorf("config.json ServiceSettings.%s = %v, want %v", k, ss[k], v)
		}
	}
	// Everything else is as it was, the unknown keys included.
	var post map[string]any
	json.Unmarshal(b, &post)
	for _, m := range []map[string]any{pre, post} {
		for k := range want {
			delete(m["ServiceSettings"].(map[string]any), k)
		}
	}
	if !reflect.DeepEqual(pre, post) {
		t.Errorf("keys mmtls does not own changed:\nbefore %v\nafter  %v", pre, post)
	}
	for _, name := range []string{"fullchain.pem", "privkey.pem"} {
		st := stateOf(t, filepath.Join(n.tree.ConfigDir, name))
		if st.uid != uint32(mmUID) || st.gid != uint32(mmGID) || st.mode&0o7777 != 0o400 {
			t.Errorf("%s: owner %d:%d mode %04o, want mattermost 0400", name, st.uid, st.gid, st.mode&0o7777)
		}
	}

	// Identical push: nothing written, nothing restarted.
	r, res = push(p1)
	if r.code != 0 || res["status"] != "unchanged" || n.restarts() != 1 {
		t.Fatalf("identical push: status %v restarts %d\n%s", res["status"], n.restarts(), r)
	}

	// Renewal.
	r, res = push(p2)
	if r.code != 0 || res["status"] != "changed" || n.restarts() != 2 {
		t.Fatalf("renewal: status %v restarts %d\n%s", res["status"], n.restarts(), r)
	}
	assertServes(t, tlsAddr, p2)

	// Bad pairs: refused (exit 3), nothing on disk changes, p2 keeps serving.
	other, err := fixture.WritePair(filepath.Join(n.tree.Root, "other"), now)
	if err != nil {
		t.Fatal(err)
	}
	wrongHost, err := pki.NewChain(pki.Leaf{DNSNames: []string{"mm.example.org"}}, now)
	if err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(n.tree.Root, "bad")
	os.MkdirAll(bad, 0o700)
	write := func(name string, data []byte) string {
		path := filepath.Join(bad, name)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	encrypted := write("encrypted.pem", []byte("-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBAA==\n-----END ENCRYPTED PRIVATE KEY-----\n"))
	tests := []struct {
		name, cert, key, wantErr string
	}{
		{"mismatched key", p2.CertFile, other.KeyFile, "does not match certificate"},
		{"encrypted key", p2.CertFile, encrypted, "is protected by a passphrase"},
		{"wrong host", write("wrong-host.pem", wrongHost.FullChain()), write("wrong-host.key", wrongHost.Leaf.KeyPEM), `does not cover host "chat.example.test"`},
		{"swapped files", p2.KeyFile, p2.CertFile, "were --cert and --key given the wrong way round?"},
		{"typo in key name", p2.CertFile, filepath.Join(filepath.Dir(p2.KeyFile), "privekey.pem"), "privekey.pem\": no such file (a typo?"},
	}
	before := map[string]fileState{}
	for _, f := range []string{"fullchain.pem", "privkey.pem", "config.json"} {
		before[f] = stateOf(t, filepath.Join(n.tree.ConfigDir, f))
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runMMTLS(t, n.pushArgs(&fixture.Pair{CertFile: tt.cert, KeyFile: tt.key}, roots, "--listen", tlsAddr, "--restart-command", restart)...)
			if r.code != 3 || !strings.Contains(r.stderr, tt.wantErr) {
				t.Errorf("want exit 3 with %q, got:\n%s", tt.wantErr, r)
			}
			for f, st := range before {
				if got := stateOf(t, filepath.Join(n.tree.ConfigDir, f)); got != st {
					t.Errorf("%s changed after a refused push", f)
				}
			}
			assertServes(t, tlsAddr, p2)
		})
	}
	if n.restarts() != 2 {
		t.Errorf("refused pushes restarted mattermost: %d restarts", n.restarts())
	}
}

// A push whose verification fails (the new port is held by something that
// never answers) is rolled back to the old certificate, config and port.
func TestPushRollsBackWhenVerifyFails(t *testing.T) {
	n := newNode(t)
	ps, roots := n.pairs(2)
	p1, p2 := ps[0], ps[1]
	oldAddr, _ := fixture.PickPort()
	restart := n.restartCmd()
	n.mustPush(p1, roots, "--listen", oldAddr, "--restart-command", restart)
	assertServes(t, oldAddr, p1)

	held := holdPort(t)
	r, res := pushJSON(t, n.pushArgs(p2, roots, "--listen", held, "--restart-command", restart, "--verify-timeout", "3s")...)
	if r.code != 4 || res["status"] != "rolled-back" {
		t.Fatalf("want exit 4 (rolled back), got:\n%s", r)
	}
	if !strings.Contains(r.stderr, "rolled back: the previous certificate and config are in force again; verified") {
		t.Errorf("rollback message:\n%s", r.stderr)
	}
	assertServes(t, oldAddr, p1)
	var cfg map[string]map[string]any
	b, _ := os.ReadFile(n.tree.ConfigPath)
	json.Unmarshal(b, &cfg)
	if cfg["ServiceSettings"]["ListenAddress"] != oldAddr {
		t.Errorf("ListenAddress after rollback = %v, want %s", cfg["ServiceSettings"]["ListenAddress"], oldAddr)
	}
	if _, err := os.Stat(filepath.Join(n.tree.StateDir, "journal.json")); !os.IsNotExist(err) {
		t.Errorf("journal left after a completed rollback: %v", err)
	}
}

// A pair Mattermost cannot use at start (here: a key it cannot read) is
// caught by verification whichever way the server fails: 6.7.2 keeps the
// port bound and never completes a handshake, current versions exit.
func TestPushCatchesServerThatCannotLoadKey(t *testing.T) {
	for _, mode := range []string{"hang", "exit"} {
		t.Run(mode, func(t *testing.T) {
			n := newNode(t, "--bad-key", mode)
			ps, roots := n.pairs(2)
			p1, p2 := ps[0], ps[1]
			addr, _ := fixture.PickPort()
			restart := n.restartCmd("--bad-key", mode)
			n.mustPush(p1, roots, "--listen", addr, "--restart-command", restart)
			// --owner root: the key lands 0400 root, unreadable by mattermost.
			r := runMMTLS(t, n.pushArgs(p2, roots, "--listen", addr, "--restart-command", restart, "--verify-timeout", "4s", "--owner", "root")...)
			if r.code != 4 {
				t.Fatalf("want exit 4 (rolled back), got:\n%s", r)
			}
			assertServes(t, addr, p1)
		})
	}
}

// After a --no-restart push, the running server still serves the old
// certificate: an identical push restarts it, without reinstalling.
func TestPushNoOpRestartsStaleServer(t *testing.T) {
	n := newNode(t)
	ps, roots := n.pairs(2)
	p1, p2 := ps[0], ps[1]
	addr, _ := fixture.PickPort()
	restart := n.restartCmd()
	n.mustPush(p1, roots, "--listen", addr, "--restart-command", restart)
	n.mustPush(p2, roots, "--listen", addr, "--no-restart")
	assertServes(t, addr, p1)
	r, res := pushJSON(t, n.pushArgs(p2, roots, "--listen", addr, "--restart-command", restart)...)
	if r.code != 0 || res["status"] != "restarted" {
		t.Fatalf("want status restarted:\n%s", r)
	}
	for _, f := range res["files"].([]any) {
		if a := f.(map[string]any)["action"]; a != "unchanged" {
			t.Errorf("file reinstalled: %v", f)
		}
	}
	assertServes(t, addr, p2)
}

// --json writes one result whatever happens: a refusal and a rollback
// carry the error, its cause and the exit code; --log-format json makes the
// final error a JSON log line too.
func TestPushJSONOnFailure(t *testing.T) {
	n := newNode(t)
	ps, roots := n.pairs(2)
	r, res := pushJSON(t, n.pushArgs(ps[0], roots, "--key", ps[1].KeyFile, "--listen", n.listen, "--restart-command", n.restartCmd())...)
	if r.code != 3 || res["status"] != "refused" || res["exit_code"] != float64(3) || !strings.Contains(fmt.Sprint(res["error"]), "does not match") {
		t.Errorf("refused push: %v\n%s", res, r)
	}
	held := holdPort(t)
	r, res = pushJSON(t, n.pushArgs(ps[0], roots, "--listen", held, "--restart-command", n.restartCmd(), "--verify-timeout", "2s", "--log-format", "json")...)
	if r.code != 4 || res["status"] != "rolled-back" || res["exit_code"] != float64(4) || !strings.Contains(fmt.Sprint(res["error"]), "rolled back") {
		t.Errorf("rolled-back push: %v\n%s", res, r)
	}
	lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
	var last map[string]any
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &last); err != nil || last["exit_code"] != float64(4) {
		t.Errorf("the final error with --log-format json: %q (%v)", lines[len(lines)-1], err)
	}
}
