package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/mmtls/mmtls/agent"
	"github.com/mmtls/mmtls/agent/clusterdb"
	"github.com/mmtls/mmtls/agent/push"
)

func newPublishCmd(a *app) *cobra.Command {
	var (
		cf                clusterFlags
		cert, key         string
		siteURL, caFile   string
		retry, wait       bool
		timeout, interval time.Duration
	)
	cmd := &cobra.Command{
		Use:   "publish --cert FILE --key FILE",
		Short: "Publish a certificate to the cluster: every node rolls it out in turn",
		Long: `publish validates the pair as push does (the key matches, the chain, the
expiry, the key usage and size; the host only with --site-url, since each
node checks it against its own SiteURL), seals the key with the cluster key
and stores the bundle in the cluster's PostgreSQL, with a notification, in
one transaction: a failure stores nothing. Every node's agent ([source]
from = "cluster") then pushes it, one node at a time; the first node whose
push fails (rolled back) halts the rollout, and the others keep the previous
certificate. Publishing the current pair again does nothing and says so;
--retry resumes a halted rollout of the same pair once the cause is fixed.

--wait follows the rollout, a line per node transition, and exits 0 when
every live node serves the bundle, 4 when it halted (naming the node and the
reason), 1 when --timeout passes first.

As a certbot deploy hook, on the host that holds the certificate:
  certbot renew --deploy-hook 'mmtls publish --cert $RENEWED_LINEAGE/fullchain.pem --key $RENEWED_LINEAGE/privkey.pem'
or let the agent do it: [cluster] publish = true with [source] cert and key.

` + exitCodeHelp,
		Example: `  mmtls cluster keygen --out /etc/mmtls/cluster.key
  mmtls publish --cert /etc/letsencrypt/live/chat.example.com/fullchain.pem \
                --key /etc/letsencrypt/live/chat.example.com/privkey.pem \
                --dsn 'postgres://mmuser:...@db/mattermost' --wait
  mmtls publish --cert fullchain.pem --key privkey.pem --retry --wait`,
		Args: usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch {
			case cert == "":
				return usageError(fmt.Errorf("--cert is required: the certificate file (such as certbot's fullchain.pem)"))
			case key == "":
				return usageError(fmt.Errorf("--key is required: the private key file (such as certbot's privkey.pem)"))
			case timeout <= 0:
				return usageError(fmt.Errorf("--timeout %s: must be positive", timeout))
			}
			cc, po, err := cf.settings()
			if err != nil {
				return err
			}
			store, k, err := agent.OpenCluster(cc, po, nil, a.log)
			if err != nil {
				return err
			}
			host, _ := os.Hostname()
			if caFile == "" {
				caFile = po.CAFile
			}
			pub := &agent.Publisher{Store: store, Key: k, By: host, SiteURL: siteURL, CAFile: caFile, Retry: retry, Logger: a.log}
			res, _, err := pub.Publish(cmd.Context(), cert, key)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			b := res.Bundle
			switch {
			case res.Unchanged:
				fmt.Fprintf(out, "nothing to do: bundle %d (%s) is this pair already, rollout %s\n", b.ID, b.LeafFingerprint, b.State)
			case res.Retried:
				fmt.Fprintf(out, "retrying bundle %d (%s): the rollout resumes\n", b.ID, b.LeafFingerprint)
			default:
				fmt.Fprintf(out, "published bundle %d (%s, expires %s) to %s\n", b.ID, b.LeafFingerprint, b.NotAfter.UTC().Format(time.RFC3339), store.Redacted())
			}
			if !wait {
				return nil
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			return followRollout(ctx, out, store, b.ID, interval)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cert, "cert", "", "certificate file: the leaf and its intermediates, PEM (required)")
	f.StringVar(&key, "key", "", "private key file, PEM (required)")
	f.StringVar(&siteURL, "site-url", "", "check that the certificate covers this https:// URL's host (by default each node checks its own SiteURL)")
	f.StringVar(&caFile, "ca-file", "", "verify the chain against these roots instead of the system's")
	f.BoolVar(&retry, "retry", false, "resume a halted rollout of the current pair")
	f.BoolVar(&wait, "wait", false, "follow the rollout until every node serves it, or it halts")
	f.DurationVar(&timeout, "timeout", 30*time.Minute, "with --wait, how long to follow")
	f.DurationVar(&interval, "poll", time.Second, "with --wait, how often to look")
	cf.add(cmd, true)
	return cmd
}

// followRollout prints node transitions until the bundle's rollout is
// complete (nil), halted (push.ErrRolledBack: exit 4) or ctx ends.
func followRollout(ctx context.Context, w io.Writer, store *clusterdb.Store, id int64, every time.Duration) error {
	start := time.Now()
	seen := map[string]string{}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		state, err := store.State(ctx, id)
		if err == nil {
			if nodes, err := store.Nodes(ctx); err == nil {
				for _, n := range nodes {
					now := fmt.Sprintf("%s (bundle %d)", n.State, n.InstalledBundle)
					if seen[n.Node] != now {
						seen[n.Node] = now
						fmt.Fprintf(w, "%8s  %-20s %s\n", time.Since(start).Round(100*time.Millisecond), n.Node, now)
					}
				}
			}
			switch state {
			case clusterdb.StateComplete:
				fmt.Fprintf(w, "%8s  complete: every live node serves bundle %d\n", time.Since(start).Round(100*time.Millisecond), id)
				return nil
			case clusterdb.StateHalted:
				b, _ := store.Current(ctx)
				if b != nil && b.ID == id {
					return fmt.Errorf("rollout of bundle %d halted at %s: %s; fix the cause, then mmtls publish --retry: %w", id, b.HaltedBy, b.HaltReason, push.ErrRolledBack)
				}
				return fmt.Errorf("rollout of bundle %d halted: %w", id, push.ErrRolledBack)
			case "":
				return fmt.Errorf("bundle %d is no longer in the database (a newer publish replaced it)", id)
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the rollout of bundle %d was not complete within --timeout (%s); see mmtls cluster status", id, ctx.Err())
		case <-t.C:
		}
	}
}
