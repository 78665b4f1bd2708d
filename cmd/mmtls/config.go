package main

import (
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
key and line, and prints every setting with the defaults filled in.`,
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
			eff := c.Effective()
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(eff)
			}
			return toml.NewEncoder(cmd.OutOrStdout()).Encode(eff)
		},
	}
	check.Flags().StringVar(&path, "config", agent.DefaultConfigFile, "the agent's config file")
	check.Flags().BoolVar(&asJSON, "json", false, "print the effective settings as JSON")
	cmd.AddCommand(check)
	return cmd
}
