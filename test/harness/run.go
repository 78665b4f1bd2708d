package main

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/mmtls/mmtls/test/pki"
)

type figures map[string][]float64 // metric -> one value per repetition

type sample map[string]float64 // metric -> value, one repetition

func run(ctx context.Context) error {
	if os.Geteuid() != 0 {
		return errors.New("run as root: it starts nginx and HAProxy and reads their /proc entries")
	}
	if err := ensureTools(ctx); err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "mmtls-harness-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	self, err := os.Executable()
	if err != nil {
		return err
	}
	bin := *mmtlsBin
	if bin == "" {
		bin = filepath.Join(dir, "mmtls")
		if out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/mmtls").CombinedOutput(); err != nil {
			return fmt.Errorf("build mmtls: %v: %s", err, out)
		}
	}
	chain, err := pki.NewChain(pki.Leaf{DNSNames: []string{serverName}}, time.Now())
	if err != nil {
		return err
	}
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, chain.FullChain(), 0o600)
	os.WriteFile(keyFile, chain.Leaf.KeyPEM, 0o600)
	roots := x509.NewCertPool()
	roots.AddCert(chain.Root.Cert)

	results := map[string]map[string]figures{} // mode -> target -> figures
	configs := map[string]string{}
	start := time.Now()
	for _, tlsMode := range []bool{false, true} {
		mode := "raw TCP"
		if tlsMode {
			mode = "TLS"
		}
		var backends []string
		for range 2 {
			cf, kf := "", ""
			if tlsMode {
				cf, kf = certFile, keyFile
			}
			addr, p, err := startBackend(self, cf, kf)
			if err != nil {
				return err
			}
			defer p.stop()
			backends = append(backends, addr)
		}
		targets := []target{{name: "direct", direct: true}, mmtlsTarget(bin, backends, dir), nginxTarget(backends, dir), haproxyTarget(backends, dir)}
		if *only != "" {
			targets = slices.DeleteFunc(targets, func(t target) bool { return !strings.Contains(*only, t.name) })
		}
		results[mode] = map[string]figures{}
		for rep := range *reps {
			order := append(targets[rep%len(targets):], targets[:rep%len(targets)]...)
			for _, t := range order {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				f, conf, err := measure(t, tlsMode, backends, roots)
				if err != nil {
					return fmt.Errorf("%s, %s: %w", mode, t.name, err)
				}
				if conf != "" {
					// The results name no path of this machine.
					configs[t.name+" ("+mode+")"] = strings.ReplaceAll(strings.ReplaceAll(conf, dir, "$TMPDIR"), bin, "mmtls")
				}
				if results[mode][t.name] == nil {
					results[mode][t.name] = figures{}
				}
				for k, v := range f {
					results[mode][t.name][k] = append(results[mode][t.name][k], v)
				}
				fmt.Fprintf(os.Stderr, "%s rep %d %s: %v\n", mode, rep+1, t.name, f)
			}
		}
	}
	report(results, configs, time.Since(start))
	return nil
}

func measure(t target, tlsMode bool, backends []string, roots *x509.CertPool) (sample, string, error) {
	f := sample{}
	cl := &client{roots: roots, tlsMode: tlsMode}
	pids := func() []int { return nil }
	conf := ""
	if t.direct {
		cl.addrFor = func(src int) string { return backends[src%2] }
	} else {
		addr, p, stop, c, err := t.start(tlsMode)
		if err != nil {
			return nil, "", err
		}
		defer stop()
		cl.addrFor = func(int) string { return addr }
		pids, conf = p, c
	}
	// Memory first, on the freshly started proxy.
	runtime.GC()
	before := snapshot(pids())
	closeIdle, err := cl.idleConns(*idle)
	if err != nil {
		return nil, "", fmt.Errorf("idle connections: %w", err)
	}
	time.Sleep(time.Second)
	after := snapshot(pids())
	closeIdle()
	n := float64(*idle)
	f["rss_kib"] = float64(after.rssKiB-before.rssKiB) / n
	f["kernel_kib"] = float64(after.sunreclaim-before.sunreclaim) / n
	f["fds"] = float64(after.fds-before.fds) / n
	time.Sleep(500 * time.Millisecond) // let the closes settle

	down, err := cl.throughput('D', 4, *dur)
	if err != nil {
		return nil, "", fmt.Errorf("download: %w", err)
	}
	up, err := cl.throughput('U', 4, *dur)
	if err != nil {
		return nil, "", fmt.Errorf("upload: %w", err)
	}
	rate, err := cl.connRate(8, *dur)
	if err != nil {
		return nil, "", fmt.Errorf("connections: %w", err)
	}
	p50, p99, err := cl.rtt(2000)
	if err != nil {
		return nil, "", fmt.Errorf("round trips: %w", err)
	}
	f["down_mbs"], f["up_mbs"], f["conns_s"], f["rtt_p50_us"], f["rtt_p99_us"] = down, up, rate, p50, p99
	return f, conf, nil
}

func ensureTools(ctx context.Context) error {
	var need []string
	if _, err := exec.LookPath("nginx"); err != nil {
		need = append(need, "nginx")
	}
	if _, err := os.Stat("/usr/lib/nginx/modules/ngx_stream_module.so"); err != nil {
		need = append(need, "libnginx-mod-stream")
	}
	if _, err := exec.LookPath("haproxy"); err != nil {
		need = append(need, "haproxy")
	}
	if len(need) == 0 {
		return nil
	}
	fmt.Fprintln(os.Stderr, "installing", need)
	for _, args := range [][]string{{"update", "-q"}, append([]string{"install", "-y", "-q", "--no-install-recommends"}, need...)} {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("apt-get %s: %v: %s", args[0], err, out)
		}
	}
	return nil
}

func stats(v []float64) (med, lo, hi float64) {
	s := slices.Clone(v)
	sort.Float64s(s)
	return s[len(s)/2], s[0], s[len(s)-1]
}

func report(results map[string]map[string]figures, configs map[string]string, took time.Duration) {
	host, _ := os.Hostname()
	_ = host
	fmt.Printf("mmtls balance side by side, %s, %d cores, Go %s, %d repetitions, %s each, %d idle connections; run took %s\n\n",
		time.Now().UTC().Format("2006-01-02"), runtime.NumCPU(), runtime.Version(), *reps, *dur, *idle, took.Round(time.Second))
	metrics := []struct{ key, label, unit string }{
		{"down_mbs", "throughput to client", "MB/s"},
		{"up_mbs", "throughput to upstream", "MB/s"},
		{"conns_s", "new connections", "/s"},
		{"rtt_p50_us", "64 B round trip p50", "µs"},
		{"rtt_p99_us", "64 B round trip p99", "µs"},
		{"rss_kib", "RSS per idle connection", "KiB"},
		{"kernel_kib", "kernel (SUnreclaim) per idle connection", "KiB"},
		{"fds", "descriptors per idle connection", ""},
	}
	for _, mode := range []string{"raw TCP", "TLS"} {
		r := results[mode]
		if r == nil {
			continue
		}
		names := []string{"direct", "mmtls", "nginx", "haproxy"}
		fmt.Printf("### %s (median, min-max; ratio to direct where it applies)\n\n| figure | %s |\n|---|%s\n", mode, strings.Join(names, " | "), strings.Repeat("---|", len(names)))
		for _, m := range metrics {
			row := []string{m.label + " (" + m.unit + ")"}
			if m.unit == "" {
				row[0] = m.label
			}
			dmed := 0.0
			if d := r["direct"][m.key]; len(d) > 0 {
				dmed, _, _ = stats(d)
			}
			for _, n := range names {
				v := r[n][m.key]
				if len(v) == 0 {
					row = append(row, "-")
					continue
				}
				med, lo, hi := stats(v)
				cell := fmt.Sprintf("%.1f (%.1f-%.1f)", med, lo, hi)
				if (m.key == "down_mbs" || m.key == "up_mbs" || m.key == "conns_s") && n != "direct" && dmed > 0 {
					cell += fmt.Sprintf(" = %.2fx", med/dmed)
				}
				if (m.key == "rtt_p99_us" || m.key == "rtt_p50_us") && n != "direct" && dmed > 0 {
					cell += fmt.Sprintf(" = %.2fx", med/dmed)
				}
				if m.key == "kernel_kib" && n != "direct" {
					cell += fmt.Sprintf(" (%.1f beyond direct)", med-dmed)
				}
				row = append(row, cell)
			}
			fmt.Printf("| %s |\n", strings.Join(row, " | "))
		}
		fmt.Println()
	}
	fmt.Print("### Configurations\n\n")
	keys := make([]string, 0, len(configs))
	for k := range configs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Printf("%s:\n\n```\n%s\n```\n\n", k, strings.TrimSpace(configs[k]))
	}
}
