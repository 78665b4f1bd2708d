package main

import (
	"time"

	"github.com/spf13/pflag"

	"github.com/mmtls/mmtls/agent"
)

// pushFlags binds every push setting to a flag, so push, watch and run
// share them, and lays the flags the user set over settings from the
// agent's config file.
type pushFlags struct {
	o agent.PushOptions
	// set copies one flag's value into a PushOptions, by flag name.
	set map[string]func(*agent.PushOptions)
}

func addPushFlags(f *pflag.FlagSet) *pushFlags {
	pf := &pushFlags{set: map[string]func(*agent.PushOptions){}}
	o := &pf.o
	str := func(p *string, name, def, usage string, copy func(*agent.PushOptions, string)) {
		f.StringVar(p, name, def, usage)
		pf.set[name] = func(dst *agent.PushOptions) { copy(dst, *p) }
	}
	dur := func(p *agent.PushOptions, name string, field func(*agent.PushOptions) *time.Duration, def time.Duration, usage string) {
		f.DurationVar(field(p), name, def, usage)
		pf.set[name] = func(dst *agent.PushOptions) { *field(dst) = *field(p) }
	}
	str(&o.CertFile, "cert", "", "certificate file: the leaf and its intermediates, PEM, any order (required)", func(d *agent.PushOptions, v string) { d.CertFile = v })
	str(&o.KeyFile, "key", "", "private key file, PEM: PKCS#1, PKCS#8 or SEC1, unencrypted (required)", func(d *agent.PushOptions, v string) { d.KeyFile = v })
	str(&o.MattermostDir, "mattermost-dir", agent.DefaultMattermostDir, "Mattermost's install directory", func(d *agent.PushOptions, v string) { d.MattermostDir = v })
	str(&o.MMConfig, "mm-config", "", "Mattermost's config.json (default: MM_CONFIG from its service, else <mattermost-dir>/config/config.json)", func(d *agent.PushOptions, v string) { d.MMConfig = v })
	str(&o.DestDir, "dest-dir", "", "where to install the pair (default <mattermost-dir>/config)", func(d *agent.PushOptions, v string) { d.DestDir = v })
	str(&o.CertName, "cert-name", agent.DefaultCertName, "installed certificate file name", func(d *agent.PushOptions, v string) { d.CertName = v })
	str(&o.KeyName, "key-name", agent.DefaultKeyName, "installed key file name", func(d *agent.PushOptions, v string) { d.KeyName = v })
	str(&o.Owner, "owner", agent.DefaultOwner, "user that owns the installed files (the user Mattermost runs as)", func(d *agent.PushOptions, v string) { d.Owner = v })
	str(&o.Group, "group", "", "group that owns the installed files (default: the owner's primary group)", func(d *agent.PushOptions, v string) { d.Group = v })
	str(&o.Listen, "listen", ":443", "ServiceSettings.ListenAddress to set", func(d *agent.PushOptions, v string) { d.Listen = v })
	str(&o.SiteURL, "site-url", "", "set ServiceSettings.SiteURL too (must be https://)", func(d *agent.PushOptions, v string) { d.SiteURL = v })
	str(&o.CAFile, "ca-file", "", "verify the chain against the roots in this PEM file instead of the system roots", func(d *agent.PushOptions, v string) { d.CAFile = v })
	f.BoolVar(&o.AllowHostMismatch, "allow-host-mismatch", false, "install even if the certificate does not cover SiteURL's host")
	pf.set["allow-host-mismatch"] = func(d *agent.PushOptions) { d.AllowHostMismatch = o.AllowHostMismatch }
	str(&o.StateDir, "state-dir", agent.DefaultStateDir, "mmtls's own root-owned directory for backups and the lock", func(d *agent.PushOptions, v string) { d.StateDir = v })
	dur(o, "lock-timeout", func(p *agent.PushOptions) *time.Duration { return &p.LockTimeout }, agent.DefaultLockTimeout, "how long to wait for another mmtls run to finish")
	str(&o.Service, "service", agent.DefaultService, "systemd unit Mattermost runs as: restarted with systemctl, and its environment read",
		func(d *agent.PushOptions, v string) { d.Service, d.RestartCommand = v, "" })
	str(&o.RestartCommand, "restart-command", "", "restart Mattermost with this command (run by /bin/sh -c) instead of systemctl",
		func(d *agent.PushOptions, v string) { d.RestartCommand, d.Service = v, "" })
	dur(o, "restart-timeout", func(p *agent.PushOptions) *time.Duration { return &p.RestartTimeout }, agent.DefaultRestartTimeout, "how long the restart may take")
	str(&o.VerifyAddress, "verify-address", "", "where to connect to verify, host:port (default: the listen address, on loopback)", func(d *agent.PushOptions, v string) { d.VerifyAddress = v })
	dur(o, "verify-timeout", func(p *agent.PushOptions) *time.Duration { return &p.VerifyTimeout }, agent.DefaultVerifyTimeout, "how long Mattermost may take to serve the new certificate")
	return pf
}

// options returns the flags' values alone (push without a config file).
func (pf *pushFlags) options(f *pflag.FlagSet) agent.PushOptions {
	o := pf.o
	if f.Changed("restart-command") && !f.Changed("service") {
		o.Service = "" // the default unit name is not a choice the admin made
	}
	return o
}

// over returns base with the flags the user set laid over it.
func (pf *pushFlags) over(f *pflag.FlagSet, base agent.PushOptions) agent.PushOptions {
	f.Visit(func(fl *pflag.Flag) {
		if set, ok := pf.set[fl.Name]; ok {
			set(&base)
		}
	})
	return base
}
