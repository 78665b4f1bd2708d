package main

import (
	"github.com/spf13/pflag"

	"github.com/mmtls/mmtls/agent/push"
)

// pushFlags binds every push setting to a flag (push.Options' tags), so
// push, watch and run share them, and lays the flags the user set over
// settings from the agent's config file.
type pushFlags struct {
	o     push.Options
	bound *optionFlags
}

func addPushFlags(f *pflag.FlagSet) *pushFlags {
	defaults := push.Options{}.WithDefaults()
	defaults.DestDir = "" // derived from --mattermost-dir; its help says so
	pf := &pushFlags{}
	pf.bound = bindOptions(f, f, &pf.o, defaults)
	return pf
}

// options returns the flags' values alone (push without a config file).
func (pf *pushFlags) options() push.Options {
	var o push.Options
	pf.bound.values(&o)
	if pf.changed("restart-command") && !pf.changed("service") {
		o.Service = "" // the default unit name is not a choice the admin made
	}
	return o
}

// over returns base with the flags the user set laid over it. --service
// and --restart-command replace each other: the one given wins over the
// other from the file.
func (pf *pushFlags) over(base push.Options) push.Options {
	changed := pf.bound.over(&base)
	switch {
	case changed["service"] && !changed["restart-command"]:
		base.RestartCommand = ""
	case changed["restart-command"] && !changed["service"]:
		base.Service = ""
	}
	return base
}

func (pf *pushFlags) changed(name string) bool {
	for _, b := range pf.bound.flags {
		if b.f.Name == name {
			return b.f.Changed
		}
	}
	return false
}
