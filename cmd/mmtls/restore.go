package main

import (
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/mmtls/mmtls/agent/push"
)

func newRestoreCmd(a *app) *cobra.Command {
	var (
		pf   *pushFlags
		r    pushRun
		list bool
	)
	cmd := &cobra.Command{
		Use:   "restore [BACKUP]",
		Short: "Put a backed-up certificate, key and listen address back in force",
		Long: `restore puts back the state a push backed up: each push keeps the whole
state it replaced (the pair and Mattermost's config.json) in --state-dir's
backups, the last 10 of them. Without BACKUP, the newest: the state before
the last push.

The backup goes through an ordinary push: validated (an expired backup is
refused), installed, Mattermost restarted and verified, and rolled back if
that fails; the state it replaces is backed up in turn, so a restore can be
restored. Only the keys push owns are set from the backup's config.json;
every other key keeps its current value.

A backup made before the first push (Mattermost on plain HTTP) holds no
pair: restore does not turn TLS off.

` + exitCodeHelp,
		Example: `  mmtls restore --list
  mmtls restore                                  # the state before the last push
  mmtls restore 20261201T101500.000000000Z-123456 --dry-run`,
		Args: usageArgs(cobra.MaximumNArgs(1)),
		RunE: func(cmd *cobra.Command, args []string) error {
			o := pf.options()
			if list {
				all, err := push.ListBackups(o)
				if err != nil {
					return err
				}
				if r.asJSON {
					enc := json.NewEncoder(cmd.OutOrStdout())
					enc.SetIndent("", "  ")
					return enc.Encode(all)
				}
				return printBackups(cmd.OutOrStdout(), all, time.Now())
			}
			name := ""
			if len(args) == 1 {
				name = args[0]
			}
			b, err := push.FindBackup(o, name)
			if err != nil {
				return err
			}
			if o, err = b.PushOptions(o); err != nil {
				return err
			}
			a.log.Info("restoring a backup", "backup", b.Dir, "fingerprint", b.Certificate.Fingerprint, "listen", o.Listen)
			return runPush(cmd, a, o, r)
		},
	}
	f := cmd.Flags()
	pf = addPushFlags(f)
	for _, n := range []string{"cert", "key"} {
		f.MarkHidden(n) // the backup's
	}
	addRunFlags(f, &r)
	f.BoolVar(&list, "list", false, "list the backups, oldest first, and exit")
	return cmd
}

func printBackups(w io.Writer, all []push.Backup, now time.Time) error {
	if len(all) == 0 {
		_, err := fmt.Fprintln(w, "no backups")
		return err
	}
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "BACKUP\tCERTIFICATE\tEXPIRES\tLISTEN\tNOTE")
	for _, b := range all {
		cert, expires := "-", "-"
		if c := b.Certificate; c != nil {
			cert = c.Subject + " " + c.Fingerprint[:min(len(c.Fingerprint), 19)]
			expires = fmt.Sprintf("%s (%d days)", c.NotAfter.Format("2006-01-02"), int(c.NotAfter.Sub(now).Hours()/24))
		}
		listen := b.ListenAddress
		if b.ConnectionSecurity != "TLS" {
			listen += " (plain HTTP)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", b.Name, cert, expires, listen, b.Problem)
	}
	return tw.Flush()
}
