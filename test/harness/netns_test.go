package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/mmtls/mmtls/test/pki"
)

func TestMain(m *testing.M) {
	if child() {
		return
	}
	os.Exit(m.Run())
}

// A measurement in a network namespace of its own reaches its backends
// over the namespace's loopback and reports its figures to the parent.
func TestMeasureInNetns(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("CI runs as root: a new network namespace needs it")
		}
		t.Skip("a new network namespace needs root")
	}
	dir := t.TempDir()
	chain, err := pki.NewChain(pki.Leaf{DNSNames: []string{serverName}}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{"cert.pem": chain.FullChain(), "key.pem": chain.Leaf.KeyPEM, "root.pem": pki.EncodeCerts(chain.Root.Cert)} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	*dur, *idle, *settle = 200*time.Millisecond, "20", 10*time.Millisecond
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	f, _, err := measureInNetns(self, "", dir, "direct", true, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"down_mbs", "up_mbs", "conns_s", "rtt_p99_us", "machine_conn_us"} {
		if f[k] <= 0 {
			t.Errorf("%s = %v, want a positive figure (all: %v)", k, f[k], f)
		}
	}
	if _, ok := f["kernel_kib_20"]; ok {
		t.Errorf("the load measurement has memory figures: %v", f)
	}
	// The memory figures come from a measurement of their own.
	f, _, err = measureInNetns(self, "", dir, "direct", true, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := f["kernel_kib_20"]; !ok {
		t.Errorf("the memory measurement has no kernel figure at 20 connections: %v", f)
	}
	if _, ok := f["conns_s"]; ok {
		t.Errorf("the memory measurement has load figures: %v", f)
	}
	if _, _, err := measureInNetns(self, "", dir, "nosuch", false, false); err == nil {
		t.Error("an unknown target measured without an error")
	}
}
