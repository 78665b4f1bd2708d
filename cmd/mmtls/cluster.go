package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/mmtls/mmtls/agent"
	"github.com/mmtls/mmtls/agent/clusterdb"
	"github.com/mmtls/mmtls/agent/push"
)

// clusterFlags locate the cluster's database (and key): --dsn, else the
// agent's config file's [cluster], else Mattermost's own config here.
type clusterFlags struct {
	dsn, config, key string
}

func (cf *clusterFlags) add(cmd *cobra.Command, withKey bool) {
	f := cmd.Flags()
	f.StringVar(&cf.dsn, "dsn", "", "the cluster's PostgreSQL DSN (default: [cluster] dsn in --config, else Mattermost's SqlSettings.DataSource on this host)")
	f.StringVar(&cf.config, "config", "", "the agent's config file, for [cluster] and [push] settings")
	if withKey {
		f.StringVar(&cf.key, "cluster-key", "", "the cluster key file (default: [cluster] key_file, else "+clusterdb.DefaultKeyFile+")")
	}
}

// settings returns the [cluster] and [push] settings with the flags laid over.
func (cf *clusterFlags) settings() (agent.ClusterConfig, push.Options, error) {
	c := &agent.Config{}
	if cf.config != "" {
		var err error
		if c, err = agent.LoadConfig(cf.config); err != nil {
			return agent.ClusterConfig{}, push.Options{}, usageError(err)
		}
	}
	cc := c.Cluster
	if cf.dsn != "" {
		cc.DSN = cf.dsn
	}
	if cf.key != "" {
		cc.KeyFile = cf.key
	}
	return cc, c.Push, nil
}

func newClusterCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "The cluster's certificate rollout: key, status",
		Long: `cluster works with the certificate rollout kept in the cluster's own
PostgreSQL: "keygen" makes the cluster key that seals published keys,
"status" shows the current bundle and every node.`,
		Example: `  mmtls cluster keygen --out /etc/mmtls/cluster.key
  mmtls cluster status --dsn 'postgres://mmuser:...@db/mattermost'`,
		Args: usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(newKeygenCmd(), newClusterStatusCmd(a))
	return cmd
}

func newKeygenCmd() *cobra.Command {
	var out string
	cmd := &cobra.Command{
		Use:   "keygen --out FILE",
		Short: "Make the cluster key that seals published private keys",
		Long: `keygen writes 32 random bytes (base64) to a new file, root's, mode 0400.
Copy the same file to the publisher and to every node (default place
/etc/mmtls/cluster.key). It never overwrites a key: every published bundle
was sealed with it.`,
		Example: `  mmtls cluster keygen --out /etc/mmtls/cluster.key`,
		Args:    usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := clusterdb.GenerateKey(out); err != nil {
				return err
			}
			_, err := fmt.Fprintf(cmd.OutOrStdout(), "wrote %s; copy it to the publisher and to every node (root's, mode 0400)\n", out)
			return err
		},
	}
	cmd.Flags().StringVar(&out, "out", clusterdb.DefaultKeyFile, "where to write the key")
	return cmd
}

// statusJSON is `cluster status --json`.
type statusJSON struct {
	Bundle *bundleJSON `json:"bundle"`
	Nodes  []nodeJSON  `json:"nodes"`
}

type bundleJSON struct {
	ID          int64     `json:"id"`
	Fingerprint string    `json:"fingerprint"`
	NotAfter    time.Time `json:"not_after"`
	State       string    `json:"state"`
	HaltedBy    string    `json:"halted_by,omitempty"`
	Reason      string    `json:"reason,omitempty"`
	PublishedBy string    `json:"published_by"`
	PublishedAt time.Time `json:"published_at"`
}

type nodeJSON struct {
	Node     string    `json:"node"`
	Address  string    `json:"address"`
	Served   string    `json:"served_fingerprint"`
	ProbeErr string    `json:"probe_error,omitempty"`
	Reported string    `json:"reported_fingerprint"`
	State    string    `json:"state"`
	Changed  time.Time `json:"changed"`
	Beat     time.Time `json:"heartbeat"`
	Silent   bool      `json:"agent_silent"`
	Message  string    `json:"message,omitempty"`
}

func newClusterStatusCmd(a *app) *cobra.Command {
	var (
		cf     clusterFlags
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the current bundle's rollout and what every node serves",
		Long: `status reads the cluster's database and shows the current bundle and its
rollout (rolling, complete, or halted at a node with the reason), then one
line per node: what it serves, probed now with a TLS handshake to its
address, beside what its agent reported; its state; its last change; and its
heartbeat ("agent silent" after three of its reconcile intervals).

It exits 0 when every node whose agent is alive serves the current bundle,
1 otherwise: a monitoring check.`,
		Example: `  mmtls cluster status
  mmtls cluster status --dsn 'postgres://mmuser@db/mattermost?sslmode=require' --json`,
		Args: usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			cc, po, err := cf.settings()
			if err != nil {
				return err
			}
			store, err := agent.OpenClusterStore(cc, po, nil, a.log)
			if err != nil {
				return err
			}
			st, ok, err := clusterStatus(cmd.Context(), store)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				if err := enc.Encode(st); err != nil {
					return err
				}
			} else if err := printStatus(cmd.OutOrStdout(), st, time.Now()); err != nil {
				return err
			}
			if !ok {
				return errors.New("not every node with a live agent serves the current bundle")
			}
			return nil
		},
	}
	cf.add(cmd, false)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return cmd
}

// clusterStatus reads the bundle and the nodes and probes each node; ok
// reports whether every node with a live heartbeat serves the bundle.
func clusterStatus(ctx context.Context, store *clusterdb.Store) (*statusJSON, bool, error) {
	b, err := store.Current(ctx)
	if err != nil {
		return nil, false, err
	}
	nodes, err := store.Nodes(ctx)
	if err != nil {
		return nil, false, err
	}
	st := &statusJSON{Nodes: []nodeJSON{}}
	if b != nil {
		st.Bundle = &bundleJSON{ID: b.ID, Fingerprint: b.LeafFingerprint, NotAfter: b.NotAfter, State: b.State, HaltedBy: b.HaltedBy,
			Reason: b.HaltReason, PublishedBy: b.PublishedBy, PublishedAt: b.PublishedAt}
	}
	ok := b != nil
	for _, n := range nodes {
		nj := nodeJSON{Node: n.Node, Address: n.Address, Reported: n.Served, State: n.State, Changed: n.Changed, Beat: n.Heartbeat, Message: n.Message}
		nj.Silent = time.Since(n.Heartbeat) > 3*n.HeartbeatEvery
		nj.Served, err = probeLeaf(ctx, n.Address)
		if err != nil {
			nj.ProbeErr = err.Error()
		}
		if !nj.Silent && (b == nil || nj.Served != b.LeafFingerprint) {
			ok = false
		}
		st.Nodes = append(st.Nodes, nj)
	}
	return st, ok, nil
}

// probeLeaf returns the fingerprint of the leaf addr serves now.
func probeLeaf(ctx context.Context, addr string) (string, error) {
	if addr == "" {
		return "", errors.New("no address reported")
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	d := &tls.Dialer{NetDialer: &net.Dialer{}, Config: &tls.Config{InsecureSkipVerify: true}} // only its leaf is compared
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	sum := sha256.Sum256(c.(*tls.Conn).ConnectionState().PeerCertificates[0].Raw)
	return "sha256:" + hex.EncodeToString(sum[:]), nil
}

func printStatus(w io.Writer, st *statusJSON, now time.Time) error {
	if b := st.Bundle; b == nil {
		fmt.Fprintln(w, "bundle: none published")
	} else {
		state := b.State
		if b.State == clusterdb.StateHalted {
			state = fmt.Sprintf("HALTED at %s: %s", b.HaltedBy, b.Reason)
		}
		fmt.Fprintf(w, "bundle %d: %s, expires %s, published by %s %s ago\nrollout: %s\n",
			b.ID, b.Fingerprint, b.NotAfter.UTC().Format(time.RFC3339), b.PublishedBy, now.Sub(b.PublishedAt).Round(time.Second), state)
	}
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tADDRESS\tSERVES NOW\tREPORTED\tSTATE\tCHANGED\tHEARTBEAT")
	short := func(fp string) string {
		if len(fp) > 19 {
			return fp[:19] + "…"
		}
		return fp
	}
	for _, n := range st.Nodes {
		serves := short(n.Served)
		if n.ProbeErr != "" {
			serves = "unreachable"
		} else if st.Bundle != nil && n.Served == st.Bundle.Fingerprint {
			serves += " (current)"
		}
		beat := now.Sub(n.Beat).Round(time.Second).String() + " ago"
		if n.Silent {
			beat = "agent silent, " + beat
		}
		state := n.State
		if n.Message != "" && n.State != clusterdb.NodeIdle {
			state += ": " + strings.SplitN(n.Message, "\n", 2)[0]
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s ago\t%s\n", n.Node, n.Address, serves, short(n.Reported), state, now.Sub(n.Changed).Round(time.Second), beat)
	}
	return tw.Flush()
}
