package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/mmtls/mmtls/agent"
	"github.com/mmtls/mmtls/agent/push"
	"github.com/mmtls/mmtls/certs"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

func newPushCmd(a *app) *cobra.Command {
	var (
		pf *pushFlags
		r  pushRun
	)
	cmd := &cobra.Command{
		Use:   "push --cert FILE --key FILE",
		Short: "Validate a certificate and key and install them for Mattermost",
		Long: `push validates a certificate and its key, installs them where Mattermost
reads them and points Mattermost's config at them.

Validation: the key matches the leaf; the chain is put in order (leaf first)
and verifies to the system roots or --ca-file; the leaf is valid now, not
within 21 days of expiry (a warning), not a weak key, usable for TLS server
authentication, and covers the host of Mattermost's SiteURL.

Install: fullchain.pem and privkey.pem in <mattermost-dir>/config, owned by
mattermost, mode 0400, written atomically, never through a link planted in
that directory, never readable by others for an instant. The previous pair
and config are backed up in --state-dir.

Config: ServiceSettings ListenAddress, ConnectionSecurity "TLS",
TLSCertFile, TLSKeyFile and UseLetsEncrypt false are set; every other key
keeps its value and place. Mattermost's config is --mm-config, else MM_CONFIG
in the Mattermost service's environment, else <mattermost-dir>/config/config.json.

Then Mattermost is restarted (systemctl restart <service>, or
--restart-command) and verified: TLS 1.2 and 1.3 handshakes must present
exactly the new leaf with a chain that verifies, and /api/v4/system/ping must
answer OK. If anything after the install fails, the previous pair and config
are put back, Mattermost is restarted and the previous state verified.
A push killed half-way is finished or rolled back by the next mmtls run.

In a cluster, the restart waits for a PostgreSQL advisory lock in the
database Mattermost's config names (--cluster-mode), so a certbot deploy hook
that pushes on every node at once restarts them one at a time:
  certbot renew --deploy-hook 'mmtls push --cert $RENEWED_LINEAGE/fullchain.pem --key $RENEWED_LINEAGE/privkey.pem' 

Running push again with the same input changes nothing; if Mattermost does
not serve what is on disk (after --no-restart), it is restarted.

` + exitCodeHelp,
		Example: `  # Install certbot's pair, restart Mattermost, verify, roll back on failure.
  mmtls push --cert /etc/letsencrypt/live/chat.example.com/fullchain.pem \
             --key /etc/letsencrypt/live/chat.example.com/privkey.pem

  # Another init system.
  mmtls push --cert fullchain.pem --key privkey.pem \
             --restart-command 'rc-service mattermost restart'

  # Install only; restart Mattermost yourself afterwards.
  mmtls push --cert /etc/letsencrypt/live/chat.example.com/fullchain.pem \
             --key /etc/letsencrypt/live/chat.example.com/privkey.pem --no-restart

  # Show what would change, as JSON, without changing anything.
  mmtls push --cert fullchain.pem --key privkey.pem --dry-run --json

  # A private CA, and a SiteURL that is still http.
  mmtls push --cert tls.crt --key tls.key --ca-file /etc/pki/corp-root.pem \
             --site-url https://chat.corp.example --no-restart`,
		Args: usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runPush(cmd, a, pf.options(), r)
		},
	}
	f := cmd.Flags()
	pf = addPushFlags(f)
	addRunFlags(f, &r)
	return cmd
}

// pushRun is how a push is run: the flags push and restore share beyond
// push.Options.
type pushRun struct {
	noRestart, dryRun, asJSON bool
	clusterMode               string
}

// runPush runs one push of o and prints its result.
func runPush(cmd *cobra.Command, a *app, o push.Options, r pushRun) error {
	o.NoRestart, o.DryRun = r.noRestart, r.dryRun
	p := &push.Pusher{Logger: a.log}
	if !r.noRestart && !r.dryRun && o.Validate() == nil {
		// Every node's certbot hook may push at once: restarts take the
		// cluster's lock, as the agent's do.
		lock, err := agent.NewRestartLock(agent.ClusterConfig{Mode: r.clusterMode}, o, nil, a.log, nil)
		if err != nil {
			return usageError(fmt.Errorf("--cluster-mode: %w", err))
		}
		p.Cluster = lock
	}
	res, err := p.Push(cmd.Context(), o)
	if r.asJSON {
		// One result whatever happened, for scripts: refusals and
		// rollbacks included, with the error and the exit code.
		out := pushJSON{Result: res, ExitCode: exitCode(err)}
		if res == nil {
			out.Result = &push.Result{Status: push.StatusFailed}
			if errors.Is(err, push.ErrRefused) || errors.Is(err, push.ErrUsage) {
				out.Result.Status = "refused"
			}
		}
		if err != nil {
			out.Error = err.Error()
		}
		enc := json.NewEncoder(cmd.OutOrStdout())
		enc.SetIndent("", "  ")
		if err := enc.Encode(out); err != nil {
			return err
		}
	} else if res != nil {
		if err := printPush(cmd.OutOrStdout(), res, time.Now()); err != nil {
			return err
		}
	}
	return err
}

// addRunFlags declares the flags of pushRun.
func addRunFlags(f *pflag.FlagSet, r *pushRun) {
	f.BoolVar(&r.noRestart, "no-restart", false, "install and configure only; do not restart Mattermost")
	f.BoolVar(&r.dryRun, "dry-run", false, "print the plan and change nothing")
	f.BoolVar(&r.asJSON, "json", false, "print the result as JSON on stdout")
	f.StringVar(&r.clusterMode, "cluster-mode", agent.DefaultClusterMode, "restart coordination with the other nodes: auto (a PostgreSQL lock in Mattermost's own database), postgres, splay or off")
}

// pushJSON is `push --json`'s one result: the push's, with the error (the
// cause of a rollback included) and the exit code.
type pushJSON struct {
	*push.Result
	Error    string `json:"error,omitempty"`
	ExitCode int    `json:"exit_code"`
}

func printPush(w io.Writer, res *push.Result, now time.Time) error {
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	head := map[push.Status]string{
		push.StatusPlanned:    "plan (dry run, nothing changed)",
		push.StatusUnchanged:  "nothing to do: already in place",
		push.StatusChanged:    "installed",
		push.StatusRestarted:  "already in place; Mattermost restarted to serve it",
		push.StatusRolledBack: "FAILED and rolled back: the previous certificate and config are in force (see the error below)",
		push.StatusFailed:     "FAILED (see the error below)",
	}[res.Status]
	if res.Status == push.StatusChanged && res.Verified {
		head = "installed, Mattermost restarted and verified"
	}
	if res.Recovered != "" {
		fmt.Fprintf(tw, "recovered:\t%s\n", res.Recovered)
	}
	c := res.Certificate
	fmt.Fprintf(tw, "push:\t%s\n", head)
	fmt.Fprintf(tw, "certificate:\t%s, names %s\n", c.Subject, strings.Join(c.DNSNames, ", "))
	fmt.Fprintf(tw, "\tissued by %s, chain of %d\n", c.Issuer, c.ChainLength)
	fmt.Fprintf(tw, "\texpires %s (in %d days)\n", c.NotAfter.Format(time.RFC3339), int(c.NotAfter.Sub(now).Hours()/24))
	fmt.Fprintf(tw, "\t%s\n", c.Fingerprint)
	fmt.Fprintf(tw, "site url:\t%s (from %s)\n", res.SiteURL, res.SiteOrigin)
	fmt.Fprintf(tw, "files:\towner %s, mode %s\n", res.Owner, res.Mode)
	for _, f := range res.Files {
		note := ""
		if f.Suspicious != "" {
			note = "  (was a " + f.Suspicious + ": replaced, not followed)"
		}
		action := string(f.Action)
		if res.Status == push.StatusRolledBack && f.Action != certs.ActionUnchanged {
			action = "put back as it was (" + action + " undone)"
		}
		fmt.Fprintf(tw, "\t%s\t%s%s\n", f.Path, action, note)
	}
	fmt.Fprintf(tw, "config:\t%s (%s)\n", res.Config.Path, res.Config.Origin)
	if len(res.Config.Changes) == 0 {
		fmt.Fprintf(tw, "\tno change\n")
	}
	for _, ch := range res.Config.Changes {
		old := string(ch.Old)
		if ch.Old == nil {
			old = "(absent)"
		}
		fmt.Fprintf(tw, "\t%s\t%s -> %s\n", ch.Key, old, ch.New)
	}
	if res.BindPrivilege != "" {
		fmt.Fprintf(tw, "bind:\t%s\n", res.BindPrivilege)
	}
	if res.Status == push.StatusPlanned {
		restart, verify := res.Restart, res.Verify
		if restart == "" {
			restart, verify = "none (--no-restart): Mattermost serves the new pair after its next restart", "none"
		}
		fmt.Fprintf(tw, "restart:\t%s\n", restart)
		fmt.Fprintf(tw, "verify:\t%s; else roll back\n", verify)
	}
	if res.Verified {
		fmt.Fprintf(tw, "verified:\tTLS 1.2 and 1.3 handshakes present this certificate; /api/v4/system/ping answers OK\n")
	}
	if res.Restarted && res.Verified {
		t := res.Timings
		fmt.Fprintf(tw, "timings:\tmmtls %.0f ms (plan %.0f, install %.0f, config %.0f); restart %.0f ms; until verified %.0f ms\n",
			t.Plan+t.Install+t.Configure, t.Plan, t.Install, t.Configure, t.Restart, t.Verify)
	}
	if res.BackupDir != "" {
		fmt.Fprintf(tw, "backup:\t%s\n", res.BackupDir)
	}
	for _, wn := range res.Warnings {
		fmt.Fprintf(tw, "warning:\t%s\n", wn.Message)
	}
	return tw.Flush()
}
