package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/kardianos/service"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/mmtls/mmtls/agent"
)

// agentFlags are the flags of watch and run: the agent's config file, the
// push flags laid over it, metrics and cluster mode.
type agentFlags struct {
	config        string
	metricsListen string
	clusterMode   string
	agentCheck    string
	push          *pushFlags
}

func addAgentFlags(f *pflag.FlagSet, configDefault string) *agentFlags {
	af := &agentFlags{push: addPushFlags(f)}
	f.StringVar(&af.config, "config", configDefault, "the agent's config file (TOML); flags override it")
	f.StringVar(&af.metricsListen, "metrics-listen", "", "serve Prometheus metrics here, [host:]port (127.0.0.1 when no host)")
	f.StringVar(&af.clusterMode, "cluster-mode", "", "restart coordination: auto, postgres, splay or off (default: the file's, else auto)")
	f.StringVar(&af.agentCheck, "agent-check", "", "answer the balancers' agent checks here, ADDR:PORT (HAProxy's protocol): drain before each restart of Mattermost (default: the file's [cluster] agent_check, else off)")
	return af
}

// settings loads the config file (if any) and lays the flags over it: the
// agent's loader, called at start and at every SIGHUP.
func (af *agentFlags) settings(f *pflag.FlagSet) (agent.Settings, error) {
	cfg := &agent.Config{}
	if af.config != "" {
		c, err := agent.LoadConfig(af.config)
		if err != nil {
			return agent.Settings{}, usageError(err)
		}
		cfg = c
	}
	s := agent.Settings{Watch: cfg.WatchOptions(), Cluster: cfg.Cluster, MetricsListen: cfg.Metrics.Listen}
	s.Watch.Push = af.push.over(s.Watch.Push)
	if cfg.Balance.Enabled() {
		b := cfg.Balance
		s.Balance = &b
	}
	s.FromCluster = cfg.Source.FromCluster()
	if cfg.ACME.Enabled() {
		o := cfg.ACME
		s.ACME = &o
	}
	// A balancer-only host: the file has [balance] and no source.
	s.NoWatch = s.Balance != nil && s.Watch.Push.CertFile == "" && s.Watch.Push.KeyFile == "" && !s.FromCluster
	if !s.NoWatch {
		o := s.Watch.Push
		if s.FromCluster {
			o.CertFile, o.KeyFile = "cluster.cert", "cluster.key" // set per bundle
		}
		if err := o.Validate(); err != nil {
			return agent.Settings{}, err
		}
	}
	if f.Changed("cluster-mode") {
		s.Cluster.Mode = af.clusterMode
	}
	if f.Changed("agent-check") {
		s.Cluster.AgentCheck = af.agentCheck
	}
	if f.Changed("metrics-listen") {
		s.MetricsListen = af.metricsListen
	}
	if _, err := agent.MetricsAddr(s.MetricsListen); err != nil {
		return agent.Settings{}, usageError(err)
	}
	return s, nil
}

// newAgent returns the agent that af's flags and config file describe. It
// tells systemd when it is ready (Type=notify; nothing elsewhere).
func (af *agentFlags) newAgent(f *pflag.FlagSet, a *app) *agent.Agent {
	return agent.NewAgent(agent.AgentConfig{Logger: a.log, Load: func() (agent.Settings, error) { return af.settings(f) }, Version: versionString(),
		Ready: func() {
			if err := agent.NotifyReady(); err != nil {
				a.log.Warn("could not tell systemd the agent is ready", "err", err)
			}
		}})
}

func newWatchCmd(a *app) *cobra.Command {
	var af *agentFlags
	cmd := &cobra.Command{
		Use:   "watch",
		Short: "Push the source pair now and at every renewal",
		Long: `watch pushes the source pair (--cert, --key, or [source] in --config) when
it is not in place, then watches it and pushes every new consistent pair:
certbot's live/ links, editors that rename over files, Kubernetes-style
..data swaps, a source directory deleted and re-created.

Changes are read once the source has been quiet for a while (and at most a
minute after the first change), so certbot's one-link-at-a-time renewal is
pushed once, complete; a mismatched pair is retried quietly and never
pushed. A failed push backs off; restarts are capped per hour. With a
cluster database, nodes restart Mattermost one at a time. SIGHUP re-reads
--config; SIGTERM lets a push in flight finish or roll back.

The service runs the same loop: see "mmtls run" and "mmtls service".`,
		Example: `  mmtls watch --cert /etc/letsencrypt/live/chat.example.com/fullchain.pem \
              --key /etc/letsencrypt/live/chat.example.com/privkey.pem

  mmtls watch --config /etc/mmtls/mmtls.toml --metrics-listen 9469`,
		Args: usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if _, err := af.settings(cmd.Flags()); err != nil {
				return err // before anything starts
			}
			ag := af.newAgent(cmd.Flags(), a)
			ctx, cancel := context.WithCancel(cmd.Context())
			defer cancel()
			if af.config != "" {
				wait := onSIGHUP(ctx, a.log, ag.Reload)
				defer wait()
				defer cancel() // runs first
			}
			return ag.Run(ctx)
		},
	}
	af = addAgentFlags(cmd.Flags(), "")
	return cmd
}

func newRunCmd(a *app) *cobra.Command {
	var af *agentFlags
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the agent as the OS service runs it",
		Long: `run is what the mmtls service executes: the watch loop of "mmtls watch",
configured by --config (default /etc/mmtls/mmtls.toml), with the metrics
endpoint when [metrics] listen is set. It runs under the OS service manager
(systemd) and stops on SIGTERM once a push in flight has finished or rolled
back; SIGHUP re-reads the config file.`,
		Example: `  mmtls run --config /etc/mmtls/mmtls.toml`,
		Args:    usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if _, err := af.settings(cmd.Flags()); err != nil {
				return err // before anything starts
			}
			ag := af.newAgent(cmd.Flags(), a)
			ctx := cmd.Context()
			prog := &agent.Program{Run: func(ctx context.Context) error {
				rctx, cancel := context.WithCancel(ctx)
				wait := onSIGHUP(rctx, a.log, ag.Reload)
				defer wait()
				defer cancel() // runs first
				return ag.Run(rctx)
			}}
			svc, err := service.New(prog, &service.Config{
				Name: serviceName,
				Option: service.KeyValue{"RunWait": func() {
					select {
					case <-ctx.Done(): // SIGTERM or SIGINT
					case <-prog.Done(): // the agent stopped by itself
					}
				}},
			})
			if err != nil {
				return fmt.Errorf("service: %w", err)
			}
			if err := svc.Run(); err != nil && !errors.Is(err, context.Canceled) {
				return err
			}
			return nil
		},
	}
	af = addAgentFlags(cmd.Flags(), agent.DefaultConfigFile)
	return cmd
}
