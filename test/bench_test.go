package test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/mmtls/mmtls/agent"
	"github.com/mmtls/mmtls/agent/push"
	"github.com/mmtls/mmtls/test/fixture"
	"github.com/mmtls/mmtls/test/pki"
)

// threeCertPair writes a leaf issued by a second-level intermediate: the
// certificate file holds leaf, intermediate 2 and intermediate 1.
func threeCertPair(b *testing.B, dir string, root *pki.CA) *fixture.Pair {
	b.Helper()
	now := time.Now()
	i1, err := root.Intermediate("bench intermediate 1", now)
	if err != nil {
		b.Fatal(err)
	}
	i2, err := i1.Intermediate("bench intermediate 2", now)
	if err != nil {
		b.Fatal(err)
	}
	leaf, err := i2.Issue(pki.Leaf{DNSNames: []string{fixture.SiteHost}}, now)
	if err != nil {
		b.Fatal(err)
	}
	p := &fixture.Pair{CertFile: filepath.Join(dir, "fullchain.pem"), KeyFile: filepath.Join(dir, "privkey.pem")}
	os.MkdirAll(dir, 0o700)
	os.WriteFile(p.CertFile, pki.EncodeCerts(leaf.Cert, i2.Cert, i1.Cert), 0o600)
	os.WriteFile(p.KeyFile, leaf.KeyPEM, 0o600)
	return p
}

// benchTree makes a node's tree, a root CA file and two three-certificate
// pairs under it.
func benchTree(b *testing.B) (root string, tree *fixture.Tree, caFile string, pairs []*fixture.Pair) {
	b.Helper()
	root = b.TempDir()
	tree, err := fixture.NewTree(root, mmUser, mmUID, mmGID, "127.0.0.1:8065", "https://"+fixture.SiteHost)
	if err != nil {
		b.Fatal(err)
	}
	ca, err := pki.NewRoot("bench root", time.Now())
	if err != nil {
		b.Fatal(err)
	}
	caFile = filepath.Join(root, "root.pem")
	if err := os.WriteFile(caFile, ca.PEM(), 0o644); err != nil {
		b.Fatal(err)
	}
	pairs = []*fixture.Pair{threeCertPair(b, filepath.Join(root, "a"), ca), threeCertPair(b, filepath.Join(root, "b"), ca)}
	return root, tree, caFile, pairs
}

// BenchmarkPushNoRestart times `mmtls push --no-restart` with a
// three-certificate chain, in process: validate, plan, lock, journal,
// back up, install, edit config.json. "rotate" alternates two pairs so
// every push writes; "unchanged" is the no-op.
func BenchmarkPushNoRestart(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	_, tree, caFile, pairs := benchTree(b)
	opts := func(p *fixture.Pair) push.Options {
		return push.Options{CertFile: p.CertFile, KeyFile: p.KeyFile, MattermostDir: tree.MattermostDir,
			StateDir: tree.StateDir, CAFile: caFile, Owner: mmUser, NoRestart: true}
	}
	pu := &push.Pusher{}
	ctx := context.Background()
	// next alternates the pairs across every push, whichever sub-benchmark
	// (and however many times the framework calls it).
	next := 0
	flip := func() *fixture.Pair { next++; return pairs[next%2] }
	b.Run("rotate", func(b *testing.B) {
		for b.Loop() {
			res, err := pu.Push(ctx, opts(flip()))
			if err != nil || res.Status != push.StatusChanged {
				b.Fatalf("push: %v %v", res, err)
			}
		}
	})
	b.Run("unchanged", func(b *testing.B) {
		same := pairs[next%2] // installed by the last push
		for b.Loop() {
			res, err := pu.Push(ctx, opts(same))
			if err != nil || res.Status != push.StatusUnchanged {
				b.Fatalf("push: %v %v", res, err)
			}
		}
	})
	b.Run("cli-rotate", func(b *testing.B) {
		for b.Loop() {
			o := opts(flip())
			r := runMMTLS(b, "push", "--cert", o.CertFile, "--key", o.KeyFile, "--mattermost-dir", o.MattermostDir,
				"--state-dir", o.StateDir, "--ca-file", o.CAFile, "--owner", mmUser, "--no-restart", "--log-level", "error")
			if r.code != 0 {
				b.Fatalf("mmtls push: %s", r)
			}
		}
	})
}

// BenchmarkWatchLatency times the watch loop from the last change of the
// source pair to the new pair installed (push --no-restart), with a 50 ms
// quiet period. The figure minus the quiet period is the loop's own cost,
// plus the push; ns/op is per renewal.
func BenchmarkWatchLatency(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	root, tree, caFile, pairs := benchTree(b)
	src := filepath.Join(root, "src")
	os.MkdirAll(src, 0o700)
	cert, key := filepath.Join(src, "fullchain.pem"), filepath.Join(src, "privkey.pem")
	install := func(p *fixture.Pair) {
		for dst, from := range map[string]string{key: p.KeyFile, cert: p.CertFile} {
			data, _ := os.ReadFile(from)
			os.WriteFile(dst+".tmp", data, 0o600)
			os.Rename(dst+".tmp", dst)
		}
	}
	install(pairs[0])

	const quiet = 50 * time.Millisecond
	opts := agent.WatchOptions{Quiet: quiet, MaxWait: time.Second, Reconcile: -1, Push: push.Options{
		CertFile: cert, KeyFile: key, MattermostDir: tree.MattermostDir, StateDir: tree.StateDir,
		CAFile: caFile, Owner: mmUser, NoRestart: true}}
	installed := filepath.Join(tree.ConfigDir, "privkey.pem")
	fsw, err := fsnotify.NewWatcher()
	if err != nil {
		b.Fatal(err)
	}
	defer fsw.Close()
	fsw.Add(tree.ConfigDir)
	waitInstalled := func(p *fixture.Pair) {
		want, _ := os.ReadFile(p.KeyFile)
		deadline := time.After(10 * time.Second)
		for {
			if got, _ := os.ReadFile(installed); bytes.Equal(got, want) {
				return
			}
			select {
			case <-fsw.Events:
			case err := <-fsw.Errors:
				b.Fatal(err)
			case <-deadline:
				b.Fatal("pair not installed after 10s")
			}
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	w := agent.NewWatcher(&push.Pusher{}, nil, nil)
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx, opts) }()
	defer func() { cancel(); <-done }()
	waitInstalled(pairs[0])

	var total time.Duration
	i := 0
	for b.Loop() {
		i++
		p := pairs[i%2]
		start := time.Now()
		install(p)
		waitInstalled(p)
		total += time.Since(start)
	}
	b.ReportMetric(float64((total/time.Duration(i)-quiet).Microseconds())/1000, "ms-beyond-quiet/op")
}
