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
	push          *pushFlags
}

func addAgentFlags(f *pflag.FlagSet, configDefault string) *agentFlags {
	af := &agentFlags{push: addPushFlags(f)}
	f.StringVar(&af.config, "config", configDefault, "the agent's config file (TOML); flags override it")
	f.StringVar(&af.metricsListen, "metrics-listen", "", "serve Prometheus metrics here, [host:]port (127.0.0.1 when no host)")
	f.StringVar(&af.clusterMode, "cluster-mode", "", "restart coordination: auto, postgres, splay or off (default: the file's, else auto)")
	return af
}

// build loads the config file (if any) and lays the flags over it.
func (af *agentFlags) build(f *pflag.FlagSet, a *app) (*agent.Agent, error) {
	cfg := &agent.Config{}
	if af.config != "" {
		c, err := agent.LoadConfig(af.config)
		if err != nil {
			return nil, usageError(err)
		}
		cfg = c
	}
	ag := agent.NewAgent(a.log)
	ag.Watch = cfg.WatchOptions()
	ag.Watch.Push = af.push.over(f, ag.Watch.Push)
	if cfg.Balance.Enabled() {
		ag.Balance = &agent.BalanceService{Options: cfg.Balance, Logger: a.log}
	}
	// A balancer-only host: the file has [balance] and no source.
	ag.NoWatch = ag.Balance != nil && ag.Watch.Push.CertFile == "" && ag.Watch.Push.KeyFile == ""
	if !ag.NoWatch {
		if err := ag.Watch.Push.Validate(); err != nil {
			return nil, err
		}
	}
	ag.ClusterMode, ag.ClusterDSN = cfg.Cluster.Mode, cfg.Cluster.DSN
	ag.LockWait, ag.Splay = cfg.Cluster.LockWait.Duration, cfg.Cluster.Splay.Duration
	if f.Changed("cluster-mode") {
		ag.ClusterMode = af.clusterMode
	}
	ag.MetricsListen = cfg.Metrics.Listen
	if f.Changed("metrics-listen") {
		ag.MetricsListen = af.metricsListen
	}
	if _, err := agent.MetricsAddr(ag.MetricsListen); err != nil {
		return nil, usageError(err)
	}
	return ag, nil
}

// reload re-reads the config file and hands the running agent the new
// settings (SIGHUP).
func (af *agentFlags) reload(f *pflag.FlagSet, a *app, ag *agent.Agent) error {
	fresh, err := af.build(f, a)
	if err != nil {
		return err
	}
	if !ag.NoWatch {
		ag.Reload(fresh.Watch)
	}
	if ag.Balance != nil && fresh.Balance != nil {
		return ag.Balance.Reload(fresh.Balance.Options)
	}
	return nil
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
			ag, err := af.build(cmd.Flags(), a)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithCancel(cmd.Context())
			defer cancel()
			if af.config != "" {
				wait := onSIGHUP(ctx, a.log, func() error { return af.reload(cmd.Flags(), a, ag) })
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
			ag, err := af.build(cmd.Flags(), a)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			prog := &agent.Program{Run: func(ctx context.Context) error {
				rctx, cancel := context.WithCancel(ctx)
				wait := onSIGHUP(rctx, a.log, func() error { return af.reload(cmd.Flags(), a, ag) })
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
