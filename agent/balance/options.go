package balance

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/mmtls/mmtls/agent/passthrough"
	"github.com/mmtls/mmtls/certs"
)

// Defaults of Options beyond those of passthrough.Config.
const (
	// DefaultControlSocket is under /run/mmtls, which the service's
	// RuntimeDirectory= makes root's.
	DefaultControlSocket = "/run/mmtls/balance.sock"
	// DefaultShutdownTimeout is how long a stopping balancer waits for live
	// connections: inside systemd's default TimeoutStopSec (90s).
	DefaultShutdownTimeout = 30 * time.Second
)

// ErrInvalid is wrapped by every error that comes from bad Options: the
// command maps it to the usage exit code.
var ErrInvalid = errors.New("invalid balancer settings")

// Options are `mmtls balance`'s settings: each field is one flag (the flag
// tag) and one key of the agent's config file's [balance] section (the toml
// tag). Zero values mean the defaults of passthrough.Config (see Defaults);
// SNIPeek and LogConnections nil mean true.
type Options struct {
	Listen             []string      `toml:"listen" flag:"listen" help:"address to listen on, [host]:port (repeatable; required)"`
	Upstreams          []string      `toml:"upstreams" flag:"upstream" help:"a Mattermost node, HOST:PORT[,weight=N] (repeatable; required)"`
	Method             string        `toml:"method" flag:"method" help:"hash (nginx's hash $remote_addr consistent), round-robin or least-conn"`
	HealthCheck        string        `toml:"health_check" flag:"health-check" help:"active health check: none, tcp, tls or ping"`
	HealthInterval     time.Duration `toml:"health_interval" flag:"health-interval" help:"time between health checks (down after 3 failures, up after 2 successes)"`
	HealthServerName   string        `toml:"health_server_name" flag:"health-server-name" help:"server name for tls and ping checks (SiteURL's host)"`
	AgentCheckPort     int           `toml:"agent_check_port" flag:"agent-check-port" help:"poll each node's agent (HAProxy's agent-check protocol; mmtls run's [cluster] agent_check) at its host and this port: drain, maint, down and NN% take effect (0: off)"`
	AgentCheckInterval time.Duration `toml:"agent_check_interval" flag:"agent-check-interval" help:"time between agent checks"`
	CAFile             string        `toml:"ca_file" flag:"ca-file" help:"roots that verify the nodes' certificates in tls and ping checks (default: the system's)"`
	SNIPeek            *bool         `toml:"sni_peek" flag:"sni-peek" help:"read the ClientHello to log the server name and close non-TLS traffic"`
	LogConnections     *bool         `toml:"log_connections" flag:"log-connections" help:"log one line per connection as it ends (client, server name, node, bytes, duration, why) and each refusal"`
	SNIAllow           []string      `toml:"sni_allow" flag:"sni-allow" help:"only accept this server name (repeatable; needs --sni-peek)"`
	ConnectTimeout     time.Duration `toml:"connect_timeout" flag:"connect-timeout" help:"timeout of one connect to a node"`
	IdleTimeout        time.Duration `toml:"idle_timeout" flag:"idle-timeout" help:"close a connection idle both ways this long"`
	DrainTimeout       time.Duration `toml:"drain_timeout" flag:"drain-timeout" help:"how long a drained node's connections may live (0: until they end)"`
	MaxConns           int           `toml:"max_conns" flag:"max-conns" help:"cap on concurrent connections (0: none)"`
	ControlSocket      string        `toml:"control_socket" flag:"control-socket" flagset:"persistent" help:"control socket for status, drain and undrain"`
	// RedirectHTTP, if set, listens for plain HTTP there and redirects to
	// SiteURL's host, serving ACME challenges from ACMEWebroot.
	RedirectHTTP string `toml:"redirect_http" flag:"redirect-http" help:"also listen for plain HTTP here and redirect it to --site-url's host (301)"`
	SiteURL      string `toml:"site_url" flag:"site-url" help:"Mattermost's SiteURL (https://host), where --redirect-http sends clients"`
	ACMEWebroot  string `toml:"acme_webroot" flag:"acme-webroot" help:"serve /.well-known/acme-challenge/ from this directory on --redirect-http (certbot --webroot)"`
}

// Defaults returns the options with every default written out: what the
// flags show, what `mmtls config check` prints, and what runs.
func Defaults() Options {
	peek, logConns := true, true
	return Options{
		Method:             string(passthrough.MethodHash),
		HealthCheck:        string(passthrough.HealthNone),
		HealthInterval:     passthrough.DefaultHealthInterval,
		AgentCheckInterval: passthrough.DefaultAgentInterval,
		SNIPeek:            &peek,
		LogConnections:     &logConns,
		ConnectTimeout:     passthrough.DefaultConnectTimeout,
		IdleTimeout:        passthrough.DefaultIdleTimeout,
		ControlSocket:      DefaultControlSocket,
	}
}

// WithDefaults returns o with its zero fields set from Defaults.
func (o Options) WithDefaults() Options {
	d := Defaults()
	if o.Method == "" {
		o.Method = d.Method
	}
	if o.HealthCheck == "" {
		o.HealthCheck = d.HealthCheck
	}
	if o.HealthInterval == 0 {
		o.HealthInterval = d.HealthInterval
	}
	if o.SNIPeek == nil {
		o.SNIPeek = d.SNIPeek
	}
	if o.AgentCheckInterval == 0 {
		o.AgentCheckInterval = d.AgentCheckInterval
	}
	if o.LogConnections == nil {
		o.LogConnections = d.LogConnections
	}
	if o.ConnectTimeout == 0 {
		o.ConnectTimeout = d.ConnectTimeout
	}
	if o.IdleTimeout == 0 {
		o.IdleTimeout = d.IdleTimeout
	}
	if o.ControlSocket == "" {
		o.ControlSocket = d.ControlSocket
	}
	return o
}

// Enabled reports whether the options ask for a balancer at all.
func (o Options) Enabled() bool { return len(o.Listen) > 0 || len(o.Upstreams) > 0 }

// Config turns the options into the balancer's configuration. Errors name
// the flag (the config key is the flag's name with underscores).
func (o Options) Config(log *slog.Logger) (passthrough.Config, error) {
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
		Method: passthrough.Method(o.Method), ConnectTimeout: o.ConnectTimeout, IdleTimeout: o.IdleTimeout,
		DisableSNIPeek: !peek, DrainTimeout: o.DrainTimeout, MaxConns: o.MaxConns, Logger: log,
		LogConnections: o.LogConnections == nil || *o.LogConnections,
		Health:         passthrough.HealthConfig{Mode: passthrough.HealthMode(o.HealthCheck), Interval: o.HealthInterval, ServerName: o.HealthServerName},
		Agent:          passthrough.AgentConfig{Port: o.AgentCheckPort, Interval: o.AgentCheckInterval},
	}
	if o.AgentCheckPort < 0 || o.AgentCheckPort > 65535 {
		bad("--agent-check-port %d: want a port, 1-65535 (0: off)", o.AgentCheckPort)
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
		pool, err := certs.LoadRoots(o.CAFile)
		if err != nil {
			bad("--ca-file: %v", err)
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
	if err := cfg.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return cfg, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return cfg, nil
}
