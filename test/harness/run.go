package main

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
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
	// n proxied connections are 2n descriptors in one proxy process:
	// the proxies are started with the soft limit at the hard one, and
	// an idle count they could not hold is refused here, not measured.
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("descriptor limit: %w", err)
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("raise the descriptor limit: %w", err)
	}
	for _, n := range idleCounts() {
		if uint64(2*n+100) > lim.Max {
			return fmt.Errorf("-idle %d: a proxy needs %d descriptors, the hard limit here is %d", n, 2*n+100, lim.Max)
		}
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
	for name, data := range map[string][]byte{certFile: chain.FullChain(), keyFile: chain.Leaf.KeyPEM, filepath.Join(dir, "root.pem"): pki.EncodeCerts(chain.Root.Cert)} {
		if err := os.WriteFile(name, data, 0o600); err != nil {
			return err
		}
	}
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
		targets := allTargets(self, bin, dir)
		if tlsMode {
			// The naive proxy does not look at the ClientHello: its
			// figures are raw TCP's.
			targets = slices.DeleteFunc(targets, func(t target) bool { return t.name == "naive" })
		}
		if *only != "" {
			targets = slices.DeleteFunc(targets, func(t target) bool { return !strings.Contains(*only, t.name) })
		}
		if len(targets) == 0 {
			continue
		}
		results[mode] = map[string]figures{}
		for rep := range *reps {
			for _, t := range repOrder(targets, rep) {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				cf, kf := "", ""
				if tlsMode {
					cf, kf = certFile, keyFile
				}
				f := sample{}
				var conf string
				for _, memory := range parts() {
					var part sample
					if *netns {
						part, conf, err = measureInNetns(self, bin, dir, t.name, tlsMode, memory)
					} else {
						part, conf, err = measure(self, t, tlsMode, cf, kf, roots, memory)
					}
					if err != nil {
						return fmt.Errorf("%s, %s: %w", mode, t.name, err)
					}
					maps.Copy(f, part)
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

// repOrder is the order of the targets in repetition rep: the rows of a
// Williams design, mirrored from the n-th repetition on. Over n
// repetitions each target runs once in each position, and (for an even
// n) right after each other target once, so that no target is always
// last in a run, always measured right after the same one, or always
// before or after the one it is compared with.
func repOrder[T any](targets []T, rep int) []T {
	n := len(targets)
	order := make([]T, 0, n)
	// The first row is 0, 1, n-1, 2, n-2, ...; row r adds r to each.
	for i := range n {
		j := (i + 1) / 2
		if i%2 == 0 && i > 0 {
			j = n - i/2
		}
		order = append(order, targets[(j+rep)%n])
	}
	if (rep/n)%2 == 1 {
		slices.Reverse(order)
	}
	return order
}

// parts lists the measurements that make up one target's figures: the
// memory figures (when -idle asks for any) and the load figures, each on
// a proxy started for it. Measured on the same proxy, the load phases
// came after 12,900 connections had been held and closed, among as many
// TIME_WAIT sockets toward the backends, which is what fresh backends and
// namespaces are there to keep out. It moved nginx's figures most: in
// one run with the memory figures first and one without, its CPU per TLS
// connection came out at 271 and 394 µs (mmtls's at 295 and 305).
func parts() []bool {
	if len(idleCounts()) == 0 {
		return []bool{false}
	}
	return []bool{true, false}
}

// measure takes one target's figures, over two backends of its own: the
// memory figures if memory is true, the load figures otherwise. Once
// the client has closed, a proxy closes its upstream side first, so each
// measurement leaves ten thousand or more TIME_WAIT sockets toward the
// backends on the proxy's side (for 60 s, and for minutes at times on
// this machine kind). A connect() toward a backend that many of them
// point at costs more (measured: 28-36 µs against 22 toward a fresh one,
// and batches at 260 µs each time a parity class of the ephemeral ports
// is used up, every 14,000 connects or so); with shared backends that
// cost lands on whichever proxy runs next. Fresh backends (fresh ports)
// give every measurement an empty 4-tuple space; the network namespace
// of each measurement (netns.go) gives it an empty port space too.
func measure(self string, t target, tlsMode bool, certFile, keyFile string, roots *x509.CertPool, memory bool) (sample, string, error) {
	var backends []string
	var backendPIDs []int
	for range 2 {
		addr, p, err := startBackend(self, certFile, keyFile)
		if err != nil {
			return nil, "", fmt.Errorf("backend: %w", err)
		}
		defer p.stop()
		backends = append(backends, addr)
		backendPIDs = append(backendPIDs, p.cmd.Process.Pid)
	}
	f := sample{}
	cl := &client{roots: roots, tlsMode: tlsMode}
	pids := func() []int { return nil }
	conf := ""
	if t.direct {
		cl.addrFor = func(src int) string { return backends[src%2] }
	} else {
		addr, p, stop, c, err := t.start(tlsMode, backends)
		if err != nil {
			return nil, "", err
		}
		defer stop()
		cl.addrFor = func(int) string { return addr }
		pids, conf = p, c
	}
	if memory {
		idleFigures(f, cl, pids, t.name)
		return f, conf, nil
	}

	// CPU is read around each phase: the proxy's, and for the direct
	// target the nodes' own (a sender's or receiver's cost per GiB, the
	// reference for what a proxy, which both receives and sends, adds).
	cpuPIDs := pids
	if t.direct {
		cpuPIDs = func() []int { return backendPIDs }
	}
	phase := func(name string, do func() (int64, error)) (int64, time.Duration, error) {
		c0 := cpuTime(cpuPIDs())
		n, err := do()
		if err != nil {
			return 0, 0, fmt.Errorf("%s: %w", name, err)
		}
		return n, cpuTime(cpuPIDs()) - c0, nil
	}
	down, downCPU, err := phase("download", func() (int64, error) { return cl.throughput('D', 4, *dur) })
	if err != nil {
		return nil, "", err
	}
	up, upCPU, err := phase("upload", func() (int64, error) { return cl.throughput('U', 4, *dur) })
	if err != nil {
		return nil, "", err
	}
	// The whole machine's CPU per connection (client, backends, proxy,
	// and the kernel's softirq work charged to none of them), and the
	// share of the phase the CPUs sat idle: a proxy that serialises
	// connections leaves them idle while the client waits on it.
	b0, i0, s0 := machineCPU()
	conns, connCPU, err := phase("connections", func() (int64, error) { return cl.connRate(8, *dur) })
	if err != nil {
		return nil, "", err
	}
	b1, i1, s1 := machineCPU()
	p50, p99, err := cl.rtt(2000)
	if err != nil {
		return nil, "", fmt.Errorf("round trips: %w", err)
	}
	secs := dur.Seconds()
	f["down_mbs"], f["up_mbs"], f["conns_s"] = float64(down)/secs/1e6, float64(up)/secs/1e6, float64(conns)/secs
	f["rtt_p50_us"], f["rtt_p99_us"] = p50, p99
	const gib = 1 << 30
	f["cpu_down_s_gib"] = downCPU.Seconds() / (float64(down) / gib)
	f["cpu_up_s_gib"] = upCPU.Seconds() / (float64(up) / gib)
	f["machine_conn_us"] = float64((b1 - b0).Microseconds()) / float64(conns)
	f["idle_conn_pct"] = 100 * (i1 - i0).Seconds() / (b1 - b0 + i1 - i0 + s1 - s0).Seconds()
	if !t.direct {
		f["cpu_conn_us"] = float64(connCPU.Microseconds()) / float64(conns)
	}
	return f, conf, nil
}

// idleFigures adds the memory and descriptors per idle connection, at
// each -idle count, on the freshly started proxy of pids.
func idleFigures(f sample, cl *client, pids func() []int, name string) {
	for _, n := range idleCounts() {
		runtime.GC()
		before := snapshot(pids())
		closeIdle, err := cl.idleConns(n)
		if err != nil {
			// A proxy that cannot hold n connections (the naive one runs
			// out of descriptors: six per connection) has no figure.
			fmt.Fprintf(os.Stderr, "%s: %d idle connections: %v\n", name, n, err)
			time.Sleep(time.Second)
			continue
		}
		time.Sleep(*settle)
		after := snapshot(pids())
		closeIdle()
		k := strconv.Itoa(n)
		f["rss_kib_"+k] = float64(after.rssKiB-before.rssKiB) / float64(n)
		f["kernel_kib_"+k] = float64(after.sunreclaim-before.sunreclaim) / float64(n)
		f["fds_"+k] = float64(after.fds-before.fds) / float64(n)
		time.Sleep(500 * time.Millisecond) // let the closes settle
	}
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

// idleCounts is the -idle flag's list.
func idleCounts() []int {
	var out []int
	for _, f := range strings.Split(*idle, ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(f)); err == nil && n > 0 {
			out = append(out, n)
		}
	}
	return out
}

func stats(v []float64) (med, lo, hi float64) {
	s := slices.Clone(v)
	sort.Float64s(s)
	return s[len(s)/2], s[0], s[len(s)-1]
}

func report(results map[string]map[string]figures, configs map[string]string, took time.Duration) {
	host, _ := os.Hostname()
	_ = host
	fmt.Printf("mmtls balance side by side, %s, %d cores, Go %s, %d repetitions, %s each, %s idle connections; run took %s\n\n",
		time.Now().UTC().Format("2006-01-02"), runtime.NumCPU(), runtime.Version(), *reps, *dur, *idle, took.Round(time.Second))
	metrics := []struct{ key, label, unit string }{
		{"down_mbs", "throughput to client", "MB/s"},
		{"up_mbs", "throughput to upstream", "MB/s"},
		{"cpu_down_s_gib", "proxy CPU per GiB to client (direct: the sending node's)", "s"},
		{"cpu_up_s_gib", "proxy CPU per GiB to upstream (direct: the receiving node's)", "s"},
		{"conns_s", "new connections", "/s"},
		{"cpu_conn_us", "proxy CPU per new connection", "µs"},
		{"machine_conn_us", "whole machine's CPU per new connection", "µs"},
		{"idle_conn_pct", "machine idle while making connections", "%"},
		{"rtt_p50_us", "64 B round trip p50", "µs"},
		{"rtt_p99_us", "64 B round trip p99", "µs"},
	}
	for _, n := range idleCounts() {
		k := strconv.Itoa(n)
		metrics = append(metrics,
			struct{ key, label, unit string }{"rss_kib_" + k, "RSS per idle connection at " + k, "KiB"},
			struct{ key, label, unit string }{"kernel_kib_" + k, "kernel (SUnreclaim) per idle connection at " + k, "KiB"},
			struct{ key, label, unit string }{"fds_" + k, "descriptors per idle connection at " + k, ""})
	}
	for _, mode := range []string{"raw TCP", "TLS"} {
		r := results[mode]
		if r == nil {
			continue
		}
		names := slices.DeleteFunc([]string{"direct", "mmtls", "nginx", "haproxy", "naive"}, func(n string) bool { return r[n] == nil })
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
				format := "%.1f (%.1f-%.1f)"
				if strings.HasPrefix(m.key, "cpu_") && strings.HasSuffix(m.key, "gib") {
					format = "%.2f (%.2f-%.2f)"
				}
				cell := fmt.Sprintf(format, med, lo, hi)
				if (m.key == "down_mbs" || m.key == "up_mbs" || m.key == "conns_s") && n != "direct" && dmed > 0 {
					cell += fmt.Sprintf(" = %.2fx", med/dmed)
				}
				if (m.key == "rtt_p99_us" || m.key == "rtt_p50_us") && n != "direct" && dmed > 0 {
					cell += fmt.Sprintf(" = %.2fx", med/dmed)
				}
				if strings.HasPrefix(m.key, "kernel_kib") && n != "direct" {
					cell += fmt.Sprintf(" (%.1f beyond direct)", med-dmed)
				}
				row = append(row, cell)
			}
			fmt.Printf("| %s |\n", strings.Join(row, " | "))
		}
		fmt.Println()
		pairedRatios(mode, r)
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

// pairedRatios prints mmtls's figures against each other proxy's taken in
// the same repetition: on a machine whose speed drifts from minute to
// minute, the median of these ratios compares; a ratio of medians taken
// minutes apart can mostly measure the drift.
func pairedRatios(mode string, r map[string]figures) {
	others := slices.DeleteFunc([]string{"nginx", "haproxy", "naive"}, func(n string) bool { return r[n] == nil })
	if r["mmtls"] == nil || len(others) == 0 {
		return
	}
	fmt.Printf("### %s: mmtls / each proxy within a repetition (median of the per-repetition ratios, min-max)\n\n| figure | %s |\n|---|%s\n",
		mode, strings.Join(others, " | "), strings.Repeat("---|", len(others)))
	for _, m := range []struct{ key, label string }{
		{"cpu_conn_us", "proxy CPU per new connection"},
		{"conns_s", "new connections per second"},
		{"rtt_p99_us", "64 B round trip p99"},
		{"cpu_down_s_gib", "proxy CPU per GiB to client"},
		{"cpu_up_s_gib", "proxy CPU per GiB to upstream"},
	} {
		row := []string{m.label}
		for _, n := range others {
			a, b := r["mmtls"][m.key], r[n][m.key]
			if len(a) == 0 || len(a) != len(b) {
				row = append(row, "-")
				continue
			}
			ratios := make([]float64, len(a))
			for i := range a {
				ratios[i] = a[i] / b[i]
			}
			med, lo, hi := stats(ratios)
			row = append(row, fmt.Sprintf("%.2f (%.2f-%.2f)", med, lo, hi))
		}
		fmt.Printf("| %s |\n", strings.Join(row, " | "))
	}
	fmt.Println()
}
