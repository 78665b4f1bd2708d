// Command harness measures the balancer side by side with a direct
// connection, nginx stream and HAProxy mode tcp, on loopback, in one
// interleaved run: `go run ./test/harness` as root (it installs nginx,
// libnginx-mod-stream and haproxy from Debian's packages if missing).
//
// For raw TCP and for TLS it measures, over repetitions with the target
// order rotated: bulk throughput each way, new connections per second (a
// small request and reply each), the 64-byte round trip on a persistent
// connection (p50, p99), and the memory and descriptors per idle proxied
// connection at 3,000 idle connections on a freshly started proxy. It
// prints a Markdown table with medians and min-max, and the exact proxy
// configurations used. Everything it starts it stops, by PID.
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
	reps     = flag.Int("reps", 3, "repetitions (the target order is rotated)")
	dur      = flag.Duration("dur", 2*time.Second, "duration of each throughput and connection-rate measurement")
	idle     = flag.Int("idle", 3000, "idle connections for the memory figure")
	mmtlsBin = flag.String("mmtls", "", "mmtls binary (default: built from this module)")
	only     = flag.String("only", "", "comma-separated targets to run (direct,mmtls,nginx,haproxy)")
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "backend" {
		backendMain(os.Args[2:])
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
