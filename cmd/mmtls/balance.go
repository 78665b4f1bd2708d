package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/mmtls/mmtls/agent"
	"github.com/mmtls/mmtls/agent/balance"
	"github.com/mmtls/mmtls/agent/passthrough"
	"github.com/mmtls/mmtls/agent/push"
)

// balanceFlags binds the balancer's settings to flags (balance.Options'
// tags) and lays the ones the user set over the config file's [balance]
// section.
type balanceFlags struct {
	o             balance.Options
	bound         *optionFlags
	config, print string
	metricsListen string
}

func addBalanceFlags(cmd *cobra.Command) *balanceFlags {
	bf := &balanceFlags{}
	f := cmd.Flags()
	bf.bound = bindOptions(f, cmd.PersistentFlags(), &bf.o, balance.Defaults())
	f.StringVar(&bf.config, "config", "", "the agent's config file; its [balance] section holds these settings, which flags override")
	f.StringVar(&bf.metricsListen, "metrics-listen", "", "serve Prometheus metrics here, [host:]port (127.0.0.1 when no host)")
	f.StringVar(&bf.print, "print", "", "print the equivalent nginx or haproxy configuration and exit")
	return bf
}

// options loads the config file, if any, and lays the set flags over it.
func (bf *balanceFlags) options(f *pflag.FlagSet) (balance.Options, string, error) {
	var base balance.Options
	metrics := bf.metricsListen
	if bf.config != "" {
		c, err := agent.LoadConfig(bf.config)
		if err != nil {
			return base, "", usageError(err)
		}
		base = c.Balance
		if !f.Changed("metrics-listen") {
			metrics = c.Metrics.Listen
		}
	} else {
		bf.bound.values(&base) // every flag, defaults included
	}
	bf.bound.over(&base)
	return base.WithDefaults(), metrics, nil
}

func newBalanceCmd(a *app) *cobra.Command {
	var bf *balanceFlags
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

--agent-check-port reads each node's agent (HAProxy's agent-check
protocol; the agent's [cluster] agent_check): a node about to restart
Mattermost says "drain" and gets no new connections until it is verified.

"mmtls balance drain HOST:PORT" stops new connections to a node (existing
ones continue until --drain-timeout); "undrain" undoes it; "status" shows
every node. They talk to the running balancer over --control-socket (root
only). SIGHUP re-reads --config's [balance] section (live connections and
listeners are kept); SIGTERM stops accepting and waits up to 30s for live
connections.

What passthrough costs: Mattermost sees the balancer's address as every
client's, so its per-IP rate limiting and audit logs see one client, and
Mattermost does not speak the PROXY protocol.

--print nginx or --print haproxy writes the equivalent configuration for
those engines instead of running.`,
		Example: `  mmtls balance --listen :443 --upstream app1:443 --upstream app2:443 \
      --health-check ping --health-server-name chat.example.com

  mmtls balance --config /etc/mmtls/mmtls.toml
  mmtls balance status
  mmtls balance drain app1:443
  mmtls balance --listen :443 --upstream app1:443 --upstream app2:443 --print nginx`,
		Args: usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			f := cmd.Flags()
			o, metrics, err := bf.options(f)
			if err != nil {
				return err
			}
			switch bf.print {
			case "":
			case "nginx", "haproxy":
				if len(o.Listen) == 0 {
					o.Listen = []string{push.DefaultListen}
				}
				cfg, err := o.Config(a.log)
				if err != nil {
					return err
				}
				if bf.print == "nginx" {
					return writeNginx(cmd.OutOrStdout(), o, cfg)
				}
				return writeHAProxy(cmd.OutOrStdout(), o, cfg)
			default:
				return usageError(fmt.Errorf("--print %q: want nginx or haproxy", bf.print))
			}
			if _, err := o.Config(a.log); err != nil {
				return err
			}
			return runBalance(cmd.Context(), a, bf, f, o, metrics)
		},
	}
	bf = addBalanceFlags(cmd)
	for _, verb := range []string{"status", "drain", "undrain"} {
		cmd.AddCommand(newBalanceControlCmd(verb, &bf.o.ControlSocket))
	}
	return cmd
}

func runBalance(ctx context.Context, a *app, bf *balanceFlags, f *pflag.FlagSet, o balance.Options, metrics string) error {
	m := agent.NewMetrics()
	svc := &balance.Service{Options: o, Logger: a.log, Started: m.WatchBalancer}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wait := onSIGHUP(ctx, a.log, func() error {
		fresh, _, err := bf.options(f)
		if err != nil {
			return err
		}
		return svc.Reload(fresh)
	})
	defer wait()
	defer cancel() // runs first
	if metrics != "" {
		wait, err := agent.StartMetrics(ctx, metrics, m, a.log)
		if err != nil {
			return err
		}
		defer wait()
		defer cancel() // runs first
	}
	return svc.Run(ctx)
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
	fmt.Fprintln(tw, "UPSTREAM\tWEIGHT\tHEALTH\tDRAINING\tAGENT\tCONNECTIONS\tTOTAL")
	for _, u := range ups {
		agent := u.Agent
		switch {
		case agent == "" && u.AgentError == "":
			agent = "-"
		case agent == "":
			agent = "no answer yet: " + u.AgentError
		case u.AgentError != "":
			agent += " (last poll failed: " + u.AgentError + ")"
		}
		health := "up"
		switch {
		case !u.Healthy:
			health = "down (health check)"
		case u.PassiveDown:
			health = "down (connect failures)"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%v\t%s\t%d\t%d\n", u.Addr, u.Weight, health, u.Draining, agent, u.Active, u.Total)
	}
	return tw.Flush()
}
