package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/mmtls/mmtls/agent"
	"github.com/mmtls/mmtls/agent/doctor"
	"github.com/mmtls/mmtls/agent/push"
)

// errDoctorFailed is doctor's exit 1: a check failed (the checks said why).
var errDoctorFailed = errors.New("a check failed")

func newDoctorCmd(a *app) *cobra.Command {
	var (
		pf                         *pushFlags
		config, balancer, httpAddr string
		asJSON                     bool
	)
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Check everything between this node and a working TLS sign-in",
		Long: `doctor checks, read-only, what stands between this Mattermost node and a
working TLS sign-in (Office 365 / Entra ID and the other SSO providers need
an https SiteURL that the certificate covers and the server really serves).
Each check prints ok, warn, FAIL or skip, one line, and for anything not ok
the fix. It changes nothing, takes no lock a push waits for, and every
network check has a short timeout.

Check ids (stable; --json prints them): site-url, office365-redirect,
pair-matches, cert-host, cert-chain, cert-expiry, files, config,
bind-privilege, served, served-chain, tls-policy, lets-encrypt,
http-redirect, source, service, balancer, cluster, acme.

Exit codes: 0 nothing failed (warnings alone: 0), 1 a check failed, 2 usage.`,
		Example: `  mmtls doctor
  mmtls doctor --config /etc/mmtls/mmtls.toml --balancer lb.example.com:443 --http-redirect lb.example.com:80
  mmtls doctor --json`,
		Args: usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			o := doctor.Options{Push: pf.options(), Balancer: balancer, HTTPRedirect: httpAddr, Service: doctor.ServiceState("mmtls.service")}
			if config != "" {
				c, err := agent.LoadConfig(config)
				if err != nil {
					return usageError(err)
				}
				o.Push = pf.over(c.WatchOptions().Push)
				if !c.Source.FromCluster() {
					o.SourceCert, o.SourceKey = c.Source.Cert, c.Source.Key
				}
				if c.Cluster.DSN != "" || c.Source.FromCluster() {
					cc, po := c.Cluster, o.Push
					o.Cluster = func(ctx context.Context) (bool, string, error) {
						store, err := agent.OpenClusterStore(cc, po, nil, a.log)
						if err != nil {
							return false, "", err
						}
						st, ok, err := clusterStatus(ctx, store)
						if err != nil {
							return false, "", err
						}
						return ok, clusterSummary(st), nil
					}
				}
				if c.ACME.Enabled() {
					acme := c.ACME
					o.ACME = &acme
				}
				if o.Balancer == "" && len(c.Balance.Listen) > 0 {
					o.Balancer = push.DialAddr(c.Balance.Listen[0])
				}
				if o.HTTPRedirect == "" && c.Balance.RedirectHTTP != "" {
					o.HTTPRedirect = push.DialAddr(c.Balance.RedirectHTTP)
				}
			}
			checks := doctor.Run(cmd.Context(), o)
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				if err := enc.Encode(map[string]any{"checks": checks}); err != nil {
					return err
				}
			} else if err := printChecks(cmd.OutOrStdout(), checks); err != nil {
				return err
			}
			if doctor.Failed(checks) {
				return errDoctorFailed
			}
			return nil
		},
	}
	f := cmd.Flags()
	pf = addPushFlags(f)
	for _, n := range []string{"cert", "key"} {
		f.MarkHidden(n) // doctor looks at what is installed
	}
	f.StringVar(&config, "config", "", "the agent's config file: its [source], [push], [cluster] and [balance] are checked too")
	f.StringVar(&balancer, "balancer", "", "the balancer's TLS address, HOST:PORT: a handshake through it must reach this certificate")
	f.StringVar(&httpAddr, "http-redirect", "", "where plain HTTP for SiteURL's host is answered, HOST:PORT: it must redirect to https")
	f.BoolVar(&asJSON, "json", false, `print {"checks": [{"id", "status", "message", "fix"}]}`)
	return cmd
}

func clusterSummary(st *statusJSON) string {
	if st.Bundle == nil {
		return "nothing published yet"
	}
	var lag []string
	for _, n := range st.Nodes {
		if !n.Silent && n.Served != st.Bundle.Fingerprint {
			lag = append(lag, n.Node)
		}
	}
	if len(lag) > 0 {
		return fmt.Sprintf("bundle %d (%s): %s not serving it", st.Bundle.ID, st.Bundle.State, strings.Join(lag, ", "))
	}
	return fmt.Sprintf("bundle %d (%s): every live node serves it", st.Bundle.ID, st.Bundle.State)
}

func printChecks(w io.Writer, checks []doctor.Check) error {
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	for _, c := range checks {
		st := string(c.Status)
		if c.Status == doctor.Fail {
			st = "FAIL"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", st, c.ID, c.Message)
		if c.Fix != "" && c.Status != doctor.OK && c.Status != doctor.Skip {
			fmt.Fprintf(tw, "\t\tfix: %s\n", c.Fix)
		}
	}
	return tw.Flush()
}
