package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/mmtls/mmtls/agent/passthrough"
)

const defaultControlSocket = "/run/mmtls/balance.sock"

type balanceFlags struct {
	listen, upstreams, sniAllow          []string
	method, health, healthServer, caFile string
	healthInterval, drainTimeout         time.Duration
	connectTimeout, idleTimeout          time.Duration
	sniPeek                              bool
	maxConns                             int
	controlSocket, print                 string
}

func newBalanceCmd(a *app) *cobra.Command {
	bf := &balanceFlags{}
	cmd := &cobra.Command{
		Use:   "balance --listen ADDR --upstream HOST:PORT[,weight=N] [--upstream ...]",
		Short: "Run a TLS-passthrough balancer in front of the Mattermost nodes",
		Long: `balance forwards TCP connections to the Mattermost nodes without
terminating TLS, as an nginx stream {} block with proxy_pass does, so one
host can front the cluster while each node serves its own certificate.

Clients are spread by consistent hashing on their address, with exactly
nginx's mapping for "hash $remote_addr consistent" (moving between nginx and
mmtls does not reshuffle them); --method round-robin or least-conn instead.
A connect error or timeout tries the next node; nodes that fail are taken
out for a while (nginx's max_fails=1 fail_timeout=10s) and, with
--health-check, by active checks (tcp, tls, or Mattermost's ping over
https). The ClientHello is read (not consumed) to log the server name and
close non-TLS traffic; --sni-peek=false forwards bytes blindly.

"mmtls balance drain HOST:PORT" stops new connections to a node (existing
ones continue until --drain-timeout); "undrain" undoes it; "status" shows
every node. They talk to the running balancer over --control-socket (root
only). SIGTERM stops accepting and waits for connections up to 30s.

What passthrough costs: Mattermost sees the balancer's address as every
client's, so its per-IP rate limiting and audit logs see one client, and
Mattermost does not speak the PROXY protocol.

--print nginx or --print haproxy writes the equivalent configuration for
those engines instead of running.`,
		Example: `  mmtls balance --listen :443 --upstream app1:443 --upstream app2:443 \
      --health-check ping --health-server-name chat.example.com

  mmtls balance status
  mmtls balance drain app1:443
  mmtls balance --listen :443 --upstream app1:443 --upstream app2:443 --print nginx`,
		Args: usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := bf.config(a)
			if err != nil {
				return err
			}
			switch bf.print {
			case "":
			case "nginx":
				return writeNginx(cmd.OutOrStdout(), bf, cfg)
			case "haproxy":
				return writeHAProxy(cmd.OutOrStdout(), bf, cfg)
			default:
				return usageError(fmt.Errorf("--print %q: want nginx or haproxy", bf.print))
			}
			return runBalancer(cmd.Context(), a, bf, cfg)
		},
	}
	f := cmd.Flags()
	f.StringArrayVar(&bf.listen, "listen", nil, "address to listen on, [host]:port (repeatable; required)")
	f.StringArrayVar(&bf.upstreams, "upstream", nil, "a Mattermost node, HOST:PORT[,weight=N] (repeatable; required)")
	f.StringVar(&bf.method, "method", "hash", "hash (nginx's hash $remote_addr consistent), round-robin or least-conn")
	f.StringVar(&bf.health, "health-check", "none", "active health check: none, tcp, tls or ping")
	f.DurationVar(&bf.healthInterval, "health-interval", 2*time.Second, "time between health checks (down after 3 failures, up after 2 successes)")
	f.StringVar(&bf.healthServer, "health-server-name", "", "server name for tls and ping checks (SiteURL's host)")
	f.StringVar(&bf.caFile, "ca-file", "", "roots that verify the nodes' certificates in tls and ping checks (default: the system's)")
	f.BoolVar(&bf.sniPeek, "sni-peek", true, "read the ClientHello to log the server name and close non-TLS traffic")
	f.StringArrayVar(&bf.sniAllow, "sni-allow", nil, "only accept this server name (repeatable; implies --sni-peek)")
	f.DurationVar(&bf.connectTimeout, "connect-timeout", 5*time.Second, "timeout of one connect to a node")
	f.DurationVar(&bf.idleTimeout, "idle-timeout", 10*time.Minute, "close a connection idle both ways this long")
	f.DurationVar(&bf.drainTimeout, "drain-timeout", 0, "how long a drained node's connections may live (0: until they end)")
	f.IntVar(&bf.maxConns, "max-conns", 0, "cap on concurrent connections (0: none)")
	cmd.PersistentFlags().StringVar(&bf.controlSocket, "control-socket", defaultControlSocket, "control socket for status, drain and undrain")
	f.StringVar(&bf.print, "print", "", "print the equivalent nginx or haproxy configuration and exit")

	for _, verb := range []string{"status", "drain", "undrain"} {
		cmd.AddCommand(newBalanceControlCmd(verb, &bf.controlSocket))
	}
	return cmd
}

func (bf *balanceFlags) config(a *app) (passthrough.Config, error) {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if len(bf.listen) == 0 && bf.print == "" {
		bad("--listen is required")
	}
	for _, l := range bf.listen {
		if _, _, err := net.SplitHostPort(l); err != nil {
			bad("--listen %q: want [host]:port", l)
		}
	}
	if len(bf.upstreams) == 0 {
		bad("--upstream is required (one per Mattermost node)")
	}
	cfg := passthrough.Config{
		Method: passthrough.Method(bf.method), ConnectTimeout: bf.connectTimeout, IdleTimeout: bf.idleTimeout,
		DisableSNIPeek: !bf.sniPeek, SNIAllow: bf.sniAllow, DrainTimeout: bf.drainTimeout, MaxConns: bf.maxConns,
		Logger: a.log,
		Health: passthrough.HealthConfig{Mode: passthrough.HealthMode(bf.health), Interval: bf.healthInterval, ServerName: bf.healthServer},
	}
	if len(bf.sniAllow) > 0 && !bf.sniPeek {
		bad("--sni-allow needs --sni-peek")
	}
	for _, u := range bf.upstreams {
		addr, opt, _ := strings.Cut(u, ",")
		up := passthrough.Upstream{Addr: addr}
		if opt != "" {
			w, ok := strings.CutPrefix(opt, "weight=")
			n, err := strconv.Atoi(w)
			if !ok || err != nil || n < 1 {
				bad("--upstream %q: want HOST:PORT or HOST:PORT,weight=N with N >= 1", u)
			}
			up.Weight = n
		}
		cfg.Upstreams = append(cfg.Upstreams, up)
	}
	if bf.caFile != "" {
		data, err := os.ReadFile(bf.caFile)
		pool := x509.NewCertPool()
		if err != nil || !pool.AppendCertsFromPEM(data) {
			bad("--ca-file %q: no PEM certificate could be read (%v)", bf.caFile, err)
		}
		cfg.Health.RootCAs = pool
	}
	if err := errors.Join(errs...); err != nil {
		return cfg, usageError(err)
	}
	if err := cfg.Validate(); err != nil {
		return cfg, usageError(err)
	}
	return cfg, nil
}

func runBalancer(ctx context.Context, a *app, bf *balanceFlags, cfg passthrough.Config) error {
	b, err := passthrough.New(cfg)
	if err != nil {
		return err
	}
	var lns []net.Listener
	for _, addr := range bf.listen {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return fmt.Errorf("--listen %s: %w", addr, err)
		}
		lns = append(lns, ln)
	}
	ctl, err := listenControl(bf.controlSocket)
	if err != nil {
		for _, l := range lns {
			l.Close()
		}
		return err
	}
	defer os.Remove(bf.controlSocket)

	var wg sync.WaitGroup
	serveCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for _, ln := range lns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := b.Serve(serveCtx, ln); err != nil && !errors.Is(err, passthrough.ErrClosed) && serveCtx.Err() == nil {
				a.log.Error("listener stopped", "addr", ln.Addr().String(), "err", err)
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := b.ServeControl(serveCtx, ctl, 0); err != nil {
			a.log.Error("control socket stopped", "err", err)
		}
	}()
	a.log.Info("balancing", "listen", bf.listen, "upstreams", bf.upstreams, "method", cfg.Method)
	<-ctx.Done()
	a.log.Info("shutting down: no new connections; waiting for live ones", "connections", b.ActiveConns(), "deadline", "30s")
	sctx, scancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer scancel()
	err = b.Shutdown(sctx)
	cancel()
	wg.Wait()
	if errors.Is(err, context.DeadlineExceeded) {
		return nil // the rest were closed, as asked
	}
	return err
}

// listenControl makes the control socket, root's alone.
func listenControl(path string) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("--control-socket: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode().Type() == os.ModeSocket {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("--control-socket %s: another balancer is running", path)
		}
		os.Remove(path) // a stale socket
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("--control-socket: %w", err)
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("--control-socket: %w", err)
	}
	return ln, nil
}

func newBalanceControlCmd(verb string, socket *string) *cobra.Command {
	var asJSON bool
	short := map[string]string{
		"status":  "Show the running balancer's nodes: health, draining, connections",
		"drain":   "Stop new connections to a node; live ones continue until the drain deadline",
		"undrain": "Let a drained node take new connections again",
	}[verb]
	use, args := verb, usageArgs(cobra.NoArgs)
	if verb != "status" {
		use, args = verb+" HOST:PORT", usageArgs(cobra.ExactArgs(1))
	}
	cmd := &cobra.Command{
		Use:     use,
		Short:   short,
		Long:    short + ", through the running balancer's control socket (root only).",
		Example: "  mmtls balance " + strings.Replace(use, "HOST:PORT", "app1:443", 1),
		Args:    args,
		RunE: func(cmd *cobra.Command, args []string) error {
			req := passthrough.ControlRequest{Command: verb}
			if len(args) == 1 {
				req.Upstream = args[0]
			}
			resp, err := passthrough.Control(cmd.Context(), *socket, req)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(resp.Upstreams)
			}
			return printUpstreams(cmd.OutOrStdout(), resp.Upstreams)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return cmd
}

func printUpstreams(w io.Writer, ups []passthrough.UpstreamStatus) error {
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "UPSTREAM\tWEIGHT\tHEALTH\tDRAINING\tCONNECTIONS")
	for _, u := range ups {
		health := "up"
		switch {
		case !u.Healthy:
			health = "down (health check)"
		case u.PassiveDown:
			health = "down (connect failures)"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%v\t%d\n", u.Addr, u.Weight, health, u.Draining, u.Active)
	}
	return tw.Flush()
}
