package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mmtls/mmtls/agent/passthrough"
)

// Balancer defaults.
const (
	DefaultControlSocket   = "/run/mmtls/balance.sock"
	DefaultShutdownTimeout = 30 * time.Second
)

// BalanceOptions are `mmtls balance`'s settings, one per flag and per key
// of the config file's [balance] section. Zero values mean the defaults of
// passthrough.Config; SNIPeek nil means true.
type BalanceOptions struct {
	Listen           []string `toml:"listen"`
	Upstreams        []string `toml:"upstreams"` // HOST:PORT[,weight=N]
	Method           string   `toml:"method"`
	HealthCheck      string   `toml:"health_check"`
	HealthInterval   Duration `toml:"health_interval"`
	HealthServerName string   `toml:"health_server_name"`
	CAFile           string   `toml:"ca_file"`
	SNIPeek          *bool    `toml:"sni_peek"`
	SNIAllow         []string `toml:"sni_allow"`
	ConnectTimeout   Duration `toml:"connect_timeout"`
	IdleTimeout      Duration `toml:"idle_timeout"`
	DrainTimeout     Duration `toml:"drain_timeout"`
	MaxConns         int      `toml:"max_conns"`
	ControlSocket    string   `toml:"control_socket"`
	// RedirectHTTP, if set, listens for plain HTTP there and redirects to
	// SiteURL's host, serving ACME challenges from ACMEWebroot.
	RedirectHTTP string `toml:"redirect_http"`
	SiteURL      string `toml:"site_url"`
	ACMEWebroot  string `toml:"acme_webroot"`
}

// Enabled reports whether the options ask for a balancer at all.
func (o BalanceOptions) Enabled() bool { return len(o.Listen) > 0 || len(o.Upstreams) > 0 }

// Config turns the options into the balancer's configuration. Errors name
// the flag (the config key is the flag's name with underscores).
func (o BalanceOptions) Config(log *slog.Logger) (passthrough.Config, error) {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if len(o.Listen) == 0 {
		bad("--listen is required")
	}
	for _, l := range o.Listen {
		if _, _, err := net.SplitHostPort(l); err != nil {
			bad("--listen %q: want [host]:port", l)
		}
	}
	if len(o.Upstreams) == 0 {
		bad("--upstream is required (one per Mattermost node)")
	}
	peek := o.SNIPeek == nil || *o.SNIPeek
	if len(o.SNIAllow) > 0 && !peek {
		bad("--sni-allow needs --sni-peek")
	}
	cfg := passthrough.Config{
		Method: passthrough.Method(o.Method), ConnectTimeout: o.ConnectTimeout.Duration, IdleTimeout: o.IdleTimeout.Duration,
		DisableSNIPeek: !peek, DrainTimeout: o.DrainTimeout.Duration, MaxConns: o.MaxConns, Logger: log,
		Health: passthrough.HealthConfig{Mode: passthrough.HealthMode(o.HealthCheck), Interval: o.HealthInterval.Duration, ServerName: o.HealthServerName},
	}
	for _, n := range o.SNIAllow {
		cfg.SNIAllow = append(cfg.SNIAllow, strings.ToLower(n))
	}
	for _, u := range o.Upstreams {
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
	if o.CAFile != "" {
		data, err := os.ReadFile(o.CAFile)
		pool := x509.NewCertPool()
		if err != nil || !pool.AppendCertsFromPEM(data) {
			bad("--ca-file %q: no PEM certificate could be read", o.CAFile)
		}
		cfg.Health.RootCAs = pool
	}
	if o.RedirectHTTP != "" {
		if _, _, err := net.SplitHostPort(o.RedirectHTTP); err != nil {
			bad("--redirect-http %q: want [host]:port", o.RedirectHTTP)
		}
		if _, err := RedirectHandler(o.SiteURL, o.ACMEWebroot); err != nil {
			bad("--redirect-http needs --site-url https://host: %v", err)
		}
	} else if o.ACMEWebroot != "" {
		bad("--acme-webroot goes with --redirect-http")
	}
	if err := errors.Join(errs...); err != nil {
		return cfg, usage(err)
	}
	if err := cfg.Validate(); err != nil {
		return cfg, usage(err)
	}
	return cfg, nil
}

func (o BalanceOptions) controlSocket() string {
	if o.ControlSocket == "" {
		return DefaultControlSocket
	}
	return o.ControlSocket
}

// BalanceService runs the balancer on its listeners with its control
// socket, as `mmtls balance` and `mmtls run` do.
type BalanceService struct {
	Options BalanceOptions
	Logger  *slog.Logger
	Metrics *Metrics // nil: none

	mu sync.Mutex
	b  *passthrough.Balancer // set by Run
}

// Run serves until ctx is cancelled, then stops accepting and waits for
// live connections up to DefaultShutdownTimeout before closing them.
func (s *BalanceService) Run(ctx context.Context) error {
	log := logger(s.Logger)
	cfg, err := s.Options.Config(log)
	if err != nil {
		return err
	}
	b, err := passthrough.New(cfg)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.b = b
	s.mu.Unlock()
	s.Metrics.watchBalancer(b)
	var lns []net.Listener
	closeAll := func() {
		for _, l := range lns {
			l.Close()
		}
	}
	// No TCP keep-alive probes on client connections (four setsockopt
	// calls per accept): the idle timeout ends dead connections.
	lc := net.ListenConfig{KeepAlive: -1}
	for _, addr := range s.Options.Listen {
		ln, err := lc.Listen(context.Background(), "tcp", addr)
		if err != nil {
			closeAll()
			b.Shutdown(context.Background())
			return fmt.Errorf("--listen %s: %w", addr, err)
		}
		lns = append(lns, ln)
	}
	socket := s.Options.controlSocket()
	ctl, err := listenControl(socket)
	if err != nil {
		closeAll()
		b.Shutdown(context.Background())
		return err
	}
	defer os.Remove(socket)

	serveCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if s.Options.RedirectHTTP != "" {
		wait, err := serveRedirect(serveCtx, s.Options.RedirectHTTP, s.Options.SiteURL, s.Options.ACMEWebroot, log)
		if err != nil {
			closeAll()
			ctl.Close()
			b.Shutdown(context.Background())
			return err
		}
		defer wait()
		defer cancel()
	}
	var wg sync.WaitGroup
	for _, ln := range lns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := b.Serve(serveCtx, ln); err != nil && !errors.Is(err, passthrough.ErrClosed) && serveCtx.Err() == nil {
				log.Error("listener stopped", "addr", ln.Addr().String(), "err", err)
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := b.ServeControl(serveCtx, ctl, 0); err != nil {
			log.Error("control socket stopped", "err", err)
		}
	}()
	log.Info("balancing", "listen", s.Options.Listen, "upstreams", s.Options.Upstreams, "method", cfg.Method)
	<-ctx.Done()
	log.Info("shutting down: no new connections; waiting for live ones", "connections", b.ActiveConns(), "deadline", DefaultShutdownTimeout)
	sctx, scancel := context.WithTimeout(context.Background(), DefaultShutdownTimeout)
	defer scancel()
	err = b.Shutdown(sctx)
	cancel()
	wg.Wait()
	if errors.Is(err, context.DeadlineExceeded) {
		return nil // the rest were closed, as asked
	}
	return err
}

// Reload applies new options to the running balancer (SIGHUP): upstreams,
// method, health checks and timeouts. Listeners, the control socket and
// live connections are kept.
func (s *BalanceService) Reload(o BalanceOptions) error {
	cfg, err := o.Config(s.Logger)
	if err != nil {
		return err
	}
	s.mu.Lock()
	b := s.b
	s.mu.Unlock()
	if b == nil {
		return errors.New("balancer not running")
	}
	if strings.Join(o.Listen, ",") != strings.Join(s.Options.Listen, ",") {
		logger(s.Logger).Warn("listen addresses changed in the config; they take effect at the next start")
	}
	return b.Update(cfg)
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
