package passthrough

import (
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"
)

// Method is a balancing method.
type Method string

// Methods.
const (
	MethodHash       Method = "hash"        // nginx's hash $remote_addr consistent; the default
	MethodRoundRobin Method = "round-robin" // smooth weighted round-robin
	MethodLeastConn  Method = "least-conn"  // fewest active connections, weighted
)

// HealthMode is an active health check.
type HealthMode string

// Health check modes.
const (
	HealthNone HealthMode = "none" // the default: passive checks only
	HealthTCP  HealthMode = "tcp"  // a TCP connect
	HealthTLS  HealthMode = "tls"  // a TLS handshake, certificate verified
	HealthPing HealthMode = "ping" // HTTPS GET /api/v4/system/ping, 200 with "status":"OK"
)

// Upstream is one Mattermost node.
type Upstream struct {
	// Addr is host:port, as written in nginx's server directive; the ring
	// hashes this string.
	Addr string
	// Weight is 0 or more; 0 means 1.
	Weight int
}

// Config configures a Balancer. Zero values mean the documented defaults;
// negative durations disable where said.
type Config struct {
	Upstreams []Upstream
	Method    Method // "" means MethodHash

	// ConnectTimeout bounds one connect to an upstream. 0 means 5s.
	ConnectTimeout time.Duration
	// NextUpstreamTries bounds the upstreams tried per connection. 0 means
	// all of them.
	NextUpstreamTries int
	// NextUpstreamTimeout bounds the time spent trying upstreams. 0 means 30s.
	NextUpstreamTimeout time.Duration
	// MaxFails connect failures within FailTimeout take an upstream out
	// for FailTimeout, as nginx's max_fails and fail_timeout. 0 means 1
	// and 10s; a negative MaxFails disables passive checks.
	MaxFails    int
	FailTimeout time.Duration

	// IdleTimeout closes a connection with no bytes either way for this
	// long (nginx's proxy_timeout). 0 means 10m.
	IdleTimeout time.Duration
	// HelloTimeout bounds reading the ClientHello. 0 means 10s.
	HelloTimeout time.Duration
	// MaxConns caps concurrent client connections; at the cap the accept
	// loop pauses. 0 means no cap.
	MaxConns int

	// DisableSNIPeek forwards bytes blindly, as nginx without ssl_preread.
	// By default the ClientHello is read (and replayed to the upstream) to
	// log its server name, and non-TLS traffic is closed.
	DisableSNIPeek bool
	// SNIAllow, if not empty, closes connections whose server name is not
	// in it.
	SNIAllow []string

	Health HealthConfig
	// Agent configures agent checks (HAProxy's agent-check protocol).
	Agent AgentConfig

	// DrainTimeout bounds how long a drained upstream's connections may
	// live. 0 means they live until they end; Mattermost websockets never
	// end by themselves, so set it.
	DrainTimeout time.Duration

	// LogConnections logs one line at info for each connection when it
	// ends (client, server name, node, bytes each way, duration, why) and
	// each refused one; without it refusals are debug lines.
	LogConnections bool

	// Logger receives connection events and state changes. Nil discards.
	Logger *slog.Logger
}

// HealthConfig configures active health checks, with HAProxy's rise and
// fall semantics.
type HealthConfig struct {
	Mode     HealthMode    // "" means HealthNone
	Interval time.Duration // 0 means 2s
	Timeout  time.Duration // per check; 0 means Interval
	Rise     int           // consecutive successes to come up; 0 means 2
	Fall     int           // consecutive failures to go down; 0 means 3
	// ServerName is the SNI and the name verified (tls, ping).
	ServerName string
	// RootCAs verifies the upstream's certificate; nil means the system roots.
	RootCAs *x509.CertPool
	// CutOnDown closes an upstream's connections when it goes down. By
	// default they continue.
	CutOnDown bool
}

// Defaults of Config, each the value of the nginx or HAProxy setting it
// mirrors, so that moving between them changes nothing.
const (
	// DefaultConnectTimeout is 5s, HAProxy's usual "timeout connect"
	// (nginx's proxy_connect_timeout defaults to 60s): a node that takes
	// longer to accept is better skipped for the next one.
	DefaultConnectTimeout = 5 * time.Second
	// DefaultNextUpstreamTimeout bounds trying node after node.
	DefaultNextUpstreamTimeout = 30 * time.Second
	// DefaultIdleTimeout is nginx's proxy_timeout: longer than Mattermost's
	// websocket ping interval, so live websockets are never cut.
	DefaultIdleTimeout = 10 * time.Minute
	// DefaultHelloTimeout bounds the ClientHello read (nginx's
	// preread_timeout is 30s; a real client sends it at once).
	DefaultHelloTimeout = 10 * time.Second
	// DefaultMaxFails and DefaultFailTimeout are nginx's max_fails and
	// fail_timeout defaults.
	DefaultMaxFails    = 1
	DefaultFailTimeout = 10 * time.Second
	// DefaultHealthInterval, DefaultRise and DefaultFall are HAProxy's
	// inter, rise and fall defaults.
	DefaultHealthInterval = 2 * time.Second
	DefaultRise           = 2
	DefaultFall           = 3
)

func (c *Config) refusalLevel() slog.Level {
	if c.LogConnections {
		return slog.LevelInfo
	}
	return slog.LevelDebug
}

func (c *Config) connectTimeout() time.Duration { return or(c.ConnectTimeout, DefaultConnectTimeout) }
func (c *Config) nextTimeout() time.Duration {
	return or(c.NextUpstreamTimeout, DefaultNextUpstreamTimeout)
}
func (c *Config) idleTimeout() time.Duration  { return or(c.IdleTimeout, DefaultIdleTimeout) }
func (c *Config) helloTimeout() time.Duration { return or(c.HelloTimeout, DefaultHelloTimeout) }
func (c *Config) failTimeout() time.Duration  { return or(c.FailTimeout, DefaultFailTimeout) }
func (c *Config) maxFails() int {
	if c.MaxFails == 0 {
		return DefaultMaxFails
	}
	return c.MaxFails
}

// ConnectTimeoutOrDefault, IdleTimeoutOrDefault and the health accessors
// return the value in force, for those who write equivalent configurations.
func (c *Config) ConnectTimeoutOrDefault() time.Duration { return c.connectTimeout() }
func (c *Config) IdleTimeoutOrDefault() time.Duration    { return c.idleTimeout() }
func (h *HealthConfig) IntervalOrDefault() time.Duration { return h.interval() }
func (h *HealthConfig) RiseOrDefault() int               { return h.rise() }
func (h *HealthConfig) FallOrDefault() int               { return h.fall() }
func (c *Config) method() Method {
	if c.Method == "" {
		return MethodHash
	}
	return c.Method
}
func (h *HealthConfig) active() bool { return h.Mode != "" && h.Mode != HealthNone }

func (h *HealthConfig) interval() time.Duration { return or(h.Interval, DefaultHealthInterval) }
func (h *HealthConfig) timeout() time.Duration  { return or(h.Timeout, h.interval()) }
func (h *HealthConfig) rise() int               { return orInt(h.Rise, DefaultRise) }
func (h *HealthConfig) fall() int               { return orInt(h.Fall, DefaultFall) }

func or(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

func orInt(n, def int) int {
	if n <= 0 {
		return def
	}
	return n
}

// Validate reports the first problem with c.
func (c *Config) Validate() error {
	if len(c.Upstreams) == 0 {
		return errors.New("no upstreams")
	}
	seen := map[string]bool{}
	for _, u := range c.Upstreams {
		if _, _, err := net.SplitHostPort(u.Addr); err != nil {
			return fmt.Errorf("upstream %q: want host:port: %w", u.Addr, err)
		}
		if seen[u.Addr] {
			return fmt.Errorf("upstream %q: listed twice", u.Addr)
		}
		seen[u.Addr] = true
		if u.Weight < 0 {
			return fmt.Errorf("upstream %q: negative weight", u.Addr)
		}
	}
	switch c.method() {
	case MethodHash, MethodRoundRobin, MethodLeastConn:
	default:
		return fmt.Errorf("method %q: want hash, round-robin or least-conn", c.Method)
	}
	switch c.Health.Mode {
	case "", HealthNone, HealthTCP, HealthTLS, HealthPing:
	default:
		return fmt.Errorf("health check %q: want none, tcp, tls or ping", c.Health.Mode)
	}
	if c.Agent.Port < 0 || c.Agent.Port > 65535 {
		return fmt.Errorf("agent check port %d: want 1-65535", c.Agent.Port)
	}
	if (c.Health.Mode == HealthTLS || c.Health.Mode == HealthPing) && c.Health.ServerName == "" {
		return fmt.Errorf("health check %s needs a server name", c.Health.Mode)
	}
	return nil
}
