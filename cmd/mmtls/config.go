package main

import (
	"bytes"
	"encoding/json"

	"github.com/BurntSushi/toml"
	"github.com/spf13/cobra"

	"github.com/mmtls/mmtls/agent"
)

func newConfigCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "config",
		Short:   "Check the agent's config file",
		Long:    "config works with the agent's config file, /etc/mmtls/mmtls.toml.",
		Example: `  mmtls config check --config /etc/mmtls/mmtls.toml`,
		Args:    usageArgs(cobra.NoArgs),
		RunE:    func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	var (
		path   string
		asJSON bool
	)
	check := &cobra.Command{
		Use:   "check",
		Short: "Validate the agent's config file and print the effective settings",
		Long: `check reads the config file as the agent does (it must be owned by root
and writable by no one else), reports an unknown key or a bad value with its
key and line, and prints every setting with the defaults filled in. It then
checks that the paths the config names exist (the source pair, Mattermost's
directory and config, the destination, the cluster key) and exits 2 naming
each key whose path does not.`,
		Example: `  mmtls config check --config /etc/mmtls/mmtls.toml
  mmtls config check --config /etc/mmtls/mmtls.toml --json`,
		Args: usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := agent.LoadConfig(path)
			if err == nil {
				err = c.RequireSource(path)
			}
			if err != nil {
				return usageError(err)
			}
			var buf bytes.Buffer
			if err := toml.NewEncoder(&buf).Encode(c.Effective()); err != nil {
				return err
			}
			// The settings print either way; paths that do not exist fail
			// the check (exit 2), each named by its key.
			paths := c.CheckPaths(path, nil)
			if paths != nil {
				paths = usageError(paths)
			}
			if !asJSON {
				if _, err := cmd.OutOrStdout().Write(buf.Bytes()); err != nil {
					return err
				}
				return paths
			}
			// The same keys and values as the file takes (durations as
			// "5s"), not Go's field names.
			var m map[string]any
			if _, err := toml.Decode(buf.String(), &m); err != nil {
				return err
			}
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			if err := enc.Encode(m); err != nil {
				return err
			}
			return paths
		},
	}
	check.Flags().StringVar(&path, "config", agent.DefaultConfigFile, "the agent's config file")
	check.Flags().BoolVar(&asJSON, "json", false, "print the effective settings as JSON")
	cmd.AddCommand(check)
	return cmd
}
