// Command harness measures the balancer side by side with a direct
// connection, nginx stream and HAProxy mode tcp, on loopback, in one
// interleaved run: `go run ./test/harness` as root (it installs nginx,
// libnginx-mod-stream and haproxy from Debian's packages if missing).
//
// For raw TCP and for TLS it measures, over repetitions in a balanced
// order (repOrder): bulk throughput each way, new connections per second (a
// small request and reply each), the 64-byte round trip on a persistent
// connection (p50, p99), the memory and descriptors per idle proxied
// connection at 3,000 and 9,900 idle connections on a freshly started
// proxy (the load figures come from another; by default: a hard limit
// of 20,000 descriptors leaves one proxy process no room for 10,000
// connections and their upstreams; -idle takes other counts where the
// limit allows), the proxy's CPU time
// (utime+stime of its processes) per new connection and per GiB of bulk
// transfer, and while connections are made the whole machine's CPU per
// connection and the share of time its CPUs sat idle. Each measurement
// runs in a network namespace of its own (netns.go). Beside nginx and HAProxy it
// runs a naive Go proxy (io.Copy both ways, which Go turns into splice(2)
// through a pipe pair per direction) as a reference. It prints a Markdown
// table with medians and min-max, and the exact proxy configurations
// used. Everything it starts it stops, by PID.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"
)

var (
	reps         = flag.Int("reps", 3, "repetitions (in a balanced order of the targets: as many as there are targets balance it fully)")
	dur          = flag.Duration("dur", 2*time.Second, "duration of each throughput and connection-rate measurement")
	idle         = flag.String("idle", "3000,9900", "idle connection counts for the memory figures, comma-separated (2n+100 must fit the descriptor limit)")
	settle       = flag.Duration("settle", 3*time.Second, "how long the idle connections sit quiet before their memory is read")
	mmtlsBin     = flag.String("mmtls", "", "mmtls binary (default: built from this module)")
	only         = flag.String("only", "", "comma-separated targets to run (direct,mmtls,nginx,haproxy,naive)")
	nginxWorkers = flag.String("nginx-workers", "auto", "nginx's worker_processes")
	netns        = flag.Bool("netns", true, "run each measurement in a network namespace of its own (see netns.go)")
)

func main() {
	if child() {
		return
	}
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "harness:", err)
		os.Exit(1)
	}
}

// child runs the harness's own processes (a backend, the naive proxy, a
// measurement in its own network namespace) when os.Args names one.
func child() bool {
	if len(os.Args) < 2 {
		return false
	}
	switch os.Args[1] {
	case "backend":
		backendMain(os.Args[2:])
	case "naive":
		naiveMain(os.Args[2:])
	case "measure":
		measureMain(os.Args[2:])
	default:
		return false
	}
	return true
}
