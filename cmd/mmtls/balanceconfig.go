package main

import (
	"fmt"
	"io"
	"net"
	"strings"

	"github.com/mmtls/mmtls/agent/balance"
	"github.com/mmtls/mmtls/agent/passthrough"
)

// writeNginx writes the nginx stream configuration equivalent to the
// balancer's settings, for those who outgrow it.
func writeNginx(w io.Writer, o balance.Options, cfg passthrough.Config) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# Equivalent of: mmtls balance %s\n", strings.Join(balanceArgs(o), " "))
	b.WriteString("# Needs the stream module (Debian: libnginx-mod-stream). Active health\n# checks are nginx Plus only; this keeps the passive ones.\nstream {\n    upstream mattermost {\n")
	switch cfg.Method {
	case passthrough.MethodRoundRobin:
	case passthrough.MethodLeastConn:
		b.WriteString("        least_conn;\n")
	default:
		b.WriteString("        hash $remote_addr consistent;\n")
	}
	for _, u := range cfg.Upstreams {
		weight := ""
		if u.Weight > 1 {
			weight = fmt.Sprintf(" weight=%d", u.Weight)
		}
		fmt.Fprintf(&b, "        server %s%s max_fails=%d fail_timeout=%s;\n", u.Addr, weight, passthrough.DefaultMaxFails, nginxDuration(passthrough.DefaultFailTimeout.Seconds()))
	}
	b.WriteString("    }\n    server {\n")
	for _, l := range o.Listen {
		fmt.Fprintf(&b, "        listen %s;\n", nginxListen(l))
	}
	if !cfg.DisableSNIPeek {
		b.WriteString("        ssl_preread on;\n")
	}
	fmt.Fprintf(&b, "        proxy_pass mattermost;\n        proxy_connect_timeout %s;\n        proxy_timeout %s;\n", nginxDuration(cfg.ConnectTimeoutOrDefault().Seconds()), nginxDuration(cfg.IdleTimeoutOrDefault().Seconds()))
	b.WriteString("        # proxy_next_upstream takes on|off in stream {} (on by default);\n        # the HTTP form \"error timeout\" fails nginx -t here, and so does ip_hash.\n        proxy_next_upstream on;\n")
	b.WriteString("    }\n}\n")
	_, err := io.WriteString(w, b.String())
	return err
}

func nginxDuration(sec float64) string {
	if sec >= 60 && int(sec)%60 == 0 {
		return fmt.Sprintf("%dm", int(sec)/60)
	}
	return fmt.Sprintf("%ds", int(sec))
}

// writeHAProxy writes the HAProxy mode tcp equivalent.
func writeHAProxy(w io.Writer, o balance.Options, cfg passthrough.Config) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# Equivalent of: mmtls balance %s\n", strings.Join(balanceArgs(o), " "))
	b.WriteString("# HAProxy's consistent source hash is its own: clients map differently\n# than with nginx or mmtls.\n")
	fmt.Fprintf(&b, "defaults\n    mode tcp\n    timeout connect %ds\n    timeout client %ds\n    timeout server %ds\n    retries 1\n    option redispatch\n\n",
		int(cfg.ConnectTimeoutOrDefault().Seconds()), int(cfg.IdleTimeoutOrDefault().Seconds()), int(cfg.IdleTimeoutOrDefault().Seconds()))
	b.WriteString("frontend mattermost\n")
	for _, l := range o.Listen {
		fmt.Fprintf(&b, "    bind %s\n", l)
	}
	if !cfg.DisableSNIPeek {
		b.WriteString("    tcp-request inspect-delay 10s\n    tcp-request content accept if { req.ssl_hello_type 1 }\n")
	}
	b.WriteString("    default_backend mattermost\n\nbackend mattermost\n")
	switch cfg.Method {
	case passthrough.MethodRoundRobin:
		b.WriteString("    balance roundrobin\n")
	case passthrough.MethodLeastConn:
		b.WriteString("    balance leastconn\n")
	default:
		b.WriteString("    balance source\n    hash-type consistent\n")
	}
	check := ""
	switch cfg.Health.Mode {
	case passthrough.HealthTCP:
		check = " check"
	case passthrough.HealthTLS, passthrough.HealthPing:
		check = " check check-ssl verify none"
		if cfg.Health.Mode == passthrough.HealthPing {
			b.WriteString("    option httpchk GET /api/v4/system/ping\n    http-check expect status 200\n")
		}
	}
	if check != "" {
		fmt.Fprintf(&b, "    default-server inter %dms fall %d rise %d\n", cfg.Health.IntervalOrDefault().Milliseconds(), cfg.Health.FallOrDefault(), cfg.Health.RiseOrDefault())
	}
	for i, u := range cfg.Upstreams {
		weight := ""
		if u.Weight > 1 {
			weight = fmt.Sprintf(" weight %d", u.Weight)
		}
		fmt.Fprintf(&b, "    server node%d %s%s%s\n", i+1, u.Addr, weight, check)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func balanceArgs(o balance.Options) []string {
	var args []string
	for _, l := range o.Listen {
		args = append(args, "--listen", l)
	}
	for _, u := range o.Upstreams {
		args = append(args, "--upstream", u)
	}
	return args
}

// nginxListen writes a listen address as nginx's listen directive takes it:
// a port alone for every IPv4 address (nginx refuses ":443"), [::]:port for
// IPv6's wildcard.
func nginxListen(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	switch host {
	case "", "0.0.0.0":
		return port
	}
	return net.JoinHostPort(host, port)
}
