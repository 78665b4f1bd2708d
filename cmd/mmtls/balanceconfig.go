package main

import (
	"fmt"
	"io"
	"net"
	"net/url"
	"reflect"
	"strings"
	"time"

	"github.com/mmtls/mmtls/agent/balance"
	"github.com/mmtls/mmtls/agent/passthrough"
)

// The exports write what the balancer does in another engine's words. What
// an engine cannot say is written as a comment naming the setting and why,
// never dropped silently.

// writeNginx writes the nginx configuration equivalent to the balancer's
// settings: a stream {} block, and an http {} block for --redirect-http.
func writeNginx(w io.Writer, o balance.Options, cfg passthrough.Config) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# Equivalent of: mmtls balance %s\n", strings.Join(balanceArgs(o), " "))
	b.WriteString(`# stream {} goes at the top level of nginx.conf, next to http {} and not
# inside it (an include of this file inside http {} fails nginx -t). It needs
# the stream module (Debian: libnginx-mod-stream).
`)
	var left []string
	if cfg.Health.Mode != passthrough.HealthNone && cfg.Health.Mode != "" {
		left = append(left, fmt.Sprintf("--health-check %s: active health checks are nginx Plus only; the passive ones (max_fails, fail_timeout) stay", cfg.Health.Mode))
		if o.CAFile != "" {
			left = append(left, "--ca-file: it verifies the active checks' handshakes, which nginx does not make")
		}
	}
	if cfg.DrainTimeout > 0 {
		left = append(left, "--drain-timeout: nginx has no per-node drain; mark the server down and reload, live connections continue")
	}
	if cfg.Agent.Port > 0 {
		left = append(left, fmt.Sprintf("--agent-check-port %d: open-source nginx cannot read agent checks; to drain a node, add \"down\" to its server line and nginx -s reload (live connections continue)", cfg.Agent.Port))
	}
	writeLeftOut(&b, left)

	b.WriteString("stream {\n")
	b.WriteString("    log_format mmtls '$remote_addr [$time_local] sni=$ssl_preread_server_name '\n" +
		"                     'upstream=$upstream_addr status=$status up=$bytes_received '\n" +
		"                     'down=$bytes_sent time=${session_time}s';\n")
	b.WriteString("    access_log /var/log/nginx/mattermost-stream.log mmtls;\n\n")
	backend := "mattermost"
	if !cfg.DisableSNIPeek {
		// Non-TLS traffic has no protocol (and no server name): closed, as
		// the balancer does, through an upstream whose one server is down.
		backend = "$mmtls_backend"
		if len(cfg.SNIAllow) > 0 {
			b.WriteString("    # --sni-allow: other server names, and non-TLS traffic, are closed.\n    map $ssl_preread_server_name $mmtls_backend {\n")
			for _, n := range cfg.SNIAllow {
				fmt.Fprintf(&b, "        %s mattermost;\n", n)
			}
			b.WriteString("        default mmtls_refused;\n")
		} else {
			b.WriteString("    # Non-TLS traffic is closed.\n    map $ssl_preread_protocol $mmtls_backend {\n        \"\" mmtls_refused;\n        default mattermost;\n")
		}
		b.WriteString("    }\n    upstream mmtls_refused {\n        server 127.0.0.1:1 down;\n    }\n\n")
	}
	b.WriteString("    upstream mattermost {\n")
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
		fmt.Fprintf(&b, "        server %s%s max_fails=%d fail_timeout=%s;\n", u.Addr, weight, passthrough.DefaultMaxFails, nginxDuration(passthrough.DefaultFailTimeout))
	}
	b.WriteString("    }\n")
	if cfg.MaxConns > 0 {
		b.WriteString("    # --max-conns: one counter for every connection.\n    limit_conn_zone mmtls zone=mmtls_conns:1m;\n")
	}
	b.WriteString("\n    server {\n")
	for _, l := range o.Listen {
		fmt.Fprintf(&b, "        listen %s;\n", nginxListen(l))
	}
	if !cfg.DisableSNIPeek {
		b.WriteString("        ssl_preread on;\n")
	}
	if cfg.MaxConns > 0 {
		fmt.Fprintf(&b, "        limit_conn mmtls_conns %d;\n", cfg.MaxConns)
	}
	fmt.Fprintf(&b, "        proxy_pass %s;\n        proxy_connect_timeout %s;\n        proxy_timeout %s;\n", backend, nginxDuration(cfg.ConnectTimeoutOrDefault()), nginxDuration(cfg.IdleTimeoutOrDefault()))
	b.WriteString("        # proxy_next_upstream takes on|off in stream {} (on by default);\n        # the HTTP form \"error timeout\" fails nginx -t here, and so does ip_hash.\n        proxy_next_upstream on;\n")
	b.WriteString("    }\n}\n")

	if o.RedirectHTTP != "" {
		host := siteHost(o.SiteURL)
		b.WriteString("\n# --redirect-http: plain HTTP to https://" + host + ". If nginx.conf has an\n# http {} block already, put this server {} inside it.\nhttp {\n    server {\n")
		fmt.Fprintf(&b, "        listen %s;\n", nginxListen(o.RedirectHTTP))
		if o.ACMEWebroot != "" {
			fmt.Fprintf(&b, "        # --acme-webroot: certbot --webroot -w %s\n        location /.well-known/acme-challenge/ {\n            root %s;\n        }\n", o.ACMEWebroot, o.ACMEWebroot)
		}
		fmt.Fprintf(&b, "        location / {\n            return 301 https://%s$request_uri;\n        }\n    }\n}\n", host)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// writeHAProxy writes the HAProxy configuration equivalent: mode tcp, with
// the health checks HAProxy has for free and its logging.
func writeHAProxy(w io.Writer, o balance.Options, cfg passthrough.Config) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# Equivalent of: mmtls balance %s\n", strings.Join(balanceArgs(o), " "))
	b.WriteString("# HAProxy's consistent source hash is its own: clients map differently\n# than with nginx or mmtls.\n")
	var left []string
	if cfg.DrainTimeout > 0 {
		left = append(left, "--drain-timeout: HAProxy keeps a drained server's connections until they end (set the server to maint and shutdown sessions to cut them)")
	}
	if o.ACMEWebroot != "" {
		left = append(left, "--acme-webroot: HAProxy serves no files; challenges get 503 (serve them from a web server, or keep mmtls balance --redirect-http)")
	}
	writeLeftOut(&b, left)

	b.WriteString("global\n    # The system log (journald on Debian); \"log stdout format raw local0\" in a container.\n    log /dev/log local0\n\n")
	fmt.Fprintf(&b, "defaults\n    mode tcp\n    log global\n    timeout connect %ds\n    timeout client %ds\n    timeout server %ds\n    retries 1\n    option redispatch\n\n",
		int(cfg.ConnectTimeoutOrDefault().Seconds()), int(cfg.IdleTimeoutOrDefault().Seconds()), int(cfg.IdleTimeoutOrDefault().Seconds()))
	b.WriteString("frontend mattermost\n    option tcplog\n")
	if cfg.MaxConns > 0 {
		fmt.Fprintf(&b, "    maxconn %d\n", cfg.MaxConns)
	}
	for _, l := range o.Listen {
		fmt.Fprintf(&b, "    bind %s\n", l)
	}
	if !cfg.DisableSNIPeek {
		fmt.Fprintf(&b, "    # Wait for the ClientHello; close non-TLS traffic.\n    tcp-request inspect-delay %ds\n    tcp-request content reject unless { req.ssl_hello_type 1 }\n", int(passthrough.DefaultHelloTimeout.Seconds()))
		if len(cfg.SNIAllow) > 0 {
			fmt.Fprintf(&b, "    # --sni-allow\n    tcp-request content reject unless { req.ssl_sni -i %s }\n", strings.Join(cfg.SNIAllow, " "))
		}
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
	// A TCP connect check costs nothing in HAProxy and stands in for the
	// balancer's passive checks, which HAProxy does not have without one.
	check := " check"
	switch cfg.Health.Mode {
	case passthrough.HealthTLS, passthrough.HealthPing:
		ca := "@system-ca"
		if o.CAFile != "" {
			ca = o.CAFile
		}
		check = fmt.Sprintf(" check check-ssl check-sni %s verify required verifyhost %s ca-file %s", cfg.Health.ServerName, cfg.Health.ServerName, ca)
		if cfg.Health.Mode == passthrough.HealthPing {
			fmt.Fprintf(&b, "    option httpchk GET /api/v4/system/ping\n    http-check send hdr Host %s\n    http-check expect status 200\n", cfg.Health.ServerName)
		}
	}
	if a := cfg.Agent; a.Port > 0 {
		// The node's agent says drain before its Mattermost restarts.
		check += fmt.Sprintf(" agent-check agent-port %d agent-inter %dms", a.Port, o.AgentCheckInterval.Milliseconds())
	}
	fmt.Fprintf(&b, "    default-server inter %dms fall %d rise %d\n", cfg.Health.IntervalOrDefault().Milliseconds(), cfg.Health.FallOrDefault(), cfg.Health.RiseOrDefault())
	for i, u := range cfg.Upstreams {
		weight := ""
		if u.Weight > 1 {
			weight = fmt.Sprintf(" weight %d", u.Weight)
		}
		// The same ids on every balancer keep their state comparable.
		fmt.Fprintf(&b, "    server node%d %s id %d%s%s\n", i+1, u.Addr, i+1, weight, check)
	}

	if o.RedirectHTTP != "" {
		host := siteHost(o.SiteURL)
		b.WriteString("\n# --redirect-http: plain HTTP to https://" + host + "\nfrontend mattermost_http\n    mode http\n    option httplog\n    timeout client 30s\n")
		fmt.Fprintf(&b, "    bind %s\n", o.RedirectHTTP)
		fmt.Fprintf(&b, "    http-request redirect prefix https://%s code 301 unless { path_beg /.well-known/acme-challenge/ }\n", host)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// writeLeftOut writes a comment for each setting the engine cannot say.
func writeLeftOut(b *strings.Builder, left []string) {
	if len(left) == 0 {
		return
	}
	b.WriteString("# Left out, as this engine has no equivalent:\n")
	for _, l := range left {
		fmt.Fprintf(b, "#   %s.\n", l)
	}
}

// siteHost is SiteURL's host (and port), as the redirect sends clients.
func siteHost(siteURL string) string {
	u, err := url.Parse(siteURL)
	if err != nil {
		return siteURL
	}
	return u.Host
}

func nginxDuration(d time.Duration) string {
	sec := int(d.Seconds())
	if sec >= 60 && sec%60 == 0 {
		return fmt.Sprintf("%dm", sec/60)
	}
	return fmt.Sprintf("%ds", sec)
}

// balanceArgs is the command line that runs o: every setting that differs
// from its default, as its flag (the header of the exports, so none is
// hidden).
func balanceArgs(o balance.Options) []string {
	var args []string
	v, d := reflect.ValueOf(o), reflect.ValueOf(balance.Defaults())
	t := v.Type()
	for i := range t.NumField() {
		name := t.Field(i).Tag.Get("flag")
		if name == "" || t.Field(i).Tag.Get("flagset") == "persistent" {
			continue
		}
		f, def := v.Field(i), d.Field(i)
		switch x := f.Interface().(type) {
		case []string:
			for _, s := range x {
				args = append(args, "--"+name, shellQuote(s))
			}
		case *bool:
			on := x == nil || *x
			if def := def.Interface().(*bool); on != (def == nil || *def) {
				args = append(args, fmt.Sprintf("--%s=%t", name, on))
			}
		default:
			if !f.IsZero() && !f.Equal(def) {
				args = append(args, "--"+name, shellQuote(fmt.Sprint(x)))
			}
		}
	}
	return args
}

// shellQuote quotes s for a shell when it needs it.
func shellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_.,:/=@[]%+", r))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
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
