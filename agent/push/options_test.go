package push

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestPushOptionsValidate(t *testing.T) {
	ok := Options{CertFile: "c.pem", KeyFile: "k.pem"}
	tests := []struct {
		name string
		mod  func(*Options)
		want string // "" means valid
	}{
		{"minimal", func(*Options) {}, ""},
		{"no cert", func(o *Options) { o.CertFile = "" }, "--cert is required"},
		{"no key", func(o *Options) { o.KeyFile = "" }, "--key is required"},
		{"same file", func(o *Options) { o.KeyFile = o.CertFile }, `--cert and --key name the same file "c.pem"`},
		{"relative state dir", func(o *Options) { o.StateDir = "state" }, `--state-dir "state": must be an absolute path`},
		{"relative mattermost dir", func(o *Options) { o.MattermostDir = "opt/mm" }, `--mattermost-dir "opt/mm": must be an absolute path`},
		{"cert name with slash", func(o *Options) { o.CertName = "../x.pem" }, `--cert-name "../x.pem": must be a plain file name`},
		{"hidden key name", func(o *Options) { o.KeyName = ".key" }, `--key-name ".key": must be a plain file name`},
		{"same names", func(o *Options) { o.CertName, o.KeyName = "a.pem", "a.pem" }, `--cert-name and --key-name are both "a.pem"`},
		{"http site url", func(o *Options) { o.SiteURL = "http://chat.example.com" }, `--site-url "http://chat.example.com": must start with https://`},
		{"negative timeout", func(o *Options) { o.VerifyTimeout = -time.Second }, "--verify-timeout -1s: must not be negative"},
		{"service and command", func(o *Options) { o.Service, o.RestartCommand = "mm", "x" }, "--service and --restart-command are mutually exclusive"},
		{"blank command", func(o *Options) { o.RestartCommand = "  " }, "--restart-command is blank"},
		{"no-restart and command", func(o *Options) { o.NoRestart, o.RestartCommand = true, "x" }, "--no-restart and --restart-command contradict each other"},
		{"bad verify address", func(o *Options) { o.VerifyAddress = "localhost" }, `--verify-address "localhost": want host:port`},
		{"named listen port", func(o *Options) { o.Listen = ":https" }, `--listen ":https": want [host]:port with a numeric port`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := ok
			tt.mod(&o)
			err := o.Validate()
			if tt.want == "" {
				if err != nil {
					t.Errorf("Validate: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) || !errors.Is(err, ErrUsage) {
				t.Errorf("Validate = %v, want usage error containing %q", err, tt.want)
			}
		})
	}
}

func TestWithDefaults(t *testing.T) {
	o := Options{MattermostDir: "/srv/mm"}.WithDefaults()
	if o.DestDir != "/srv/mm/config" || o.CertName != "fullchain.pem" || o.KeyName != "privkey.pem" ||
		o.Owner != "mattermost" || o.StateDir != "/var/lib/mmtls" || o.LockTimeout != 5*time.Minute ||
		o.VerifyTimeout != 3*time.Minute || o.RestartTimeout != 2*time.Minute || o.Service != "mattermost" {
		t.Errorf("defaults: %+v", o)
	}
}
