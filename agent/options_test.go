package agent

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestPushOptionsValidate(t *testing.T) {
	ok := PushOptions{CertFile: "c.pem", KeyFile: "k.pem"}
	tests := []struct {
		name string
		mod  func(*PushOptions)
		want string // "" means valid
	}{
		{"minimal", func(*PushOptions) {}, ""},
		{"no cert", func(o *PushOptions) { o.CertFile = "" }, "--cert is required"},
		{"no key", func(o *PushOptions) { o.KeyFile = "" }, "--key is required"},
		{"same file", func(o *PushOptions) { o.KeyFile = o.CertFile }, `--cert and --key name the same file "c.pem"`},
		{"relative state dir", func(o *PushOptions) { o.StateDir = "state" }, `--state-dir "state": must be an absolute path`},
		{"relative mattermost dir", func(o *PushOptions) { o.MattermostDir = "opt/mm" }, `--mattermost-dir "opt/mm": must be an absolute path`},
		{"cert name with slash", func(o *PushOptions) { o.CertName = "../x.pem" }, `--cert-name "../x.pem": must be a plain file name`},
		{"hidden key name", func(o *PushOptions) { o.KeyName = ".key" }, `--key-name ".key": must be a plain file name`},
		{"same names", func(o *PushOptions) { o.CertName, o.KeyName = "a.pem", "a.pem" }, `--cert-name and --key-name are both "a.pem"`},
		{"http site url", func(o *PushOptions) { o.SiteURL = "http://chat.example.com" }, `--site-url "http://chat.example.com": must start with https://`},
		{"negative timeout", func(o *PushOptions) { o.VerifyTimeout = -time.Second }, "--verify-timeout -1s: must not be negative"},
		{"service and command", func(o *PushOptions) { o.Service, o.RestartCommand = "mm", "x" }, "--service and --restart-command are mutually exclusive"},
		{"blank command", func(o *PushOptions) { o.RestartCommand = "  " }, "--restart-command is blank"},
		{"no-restart and command", func(o *PushOptions) { o.NoRestart, o.RestartCommand = true, "x" }, "--no-restart and --restart-command contradict each other"},
		{"bad verify address", func(o *PushOptions) { o.VerifyAddress = "localhost" }, `--verify-address "localhost": want host:port`},
		{"named listen port", func(o *PushOptions) { o.Listen = ":https" }, `--listen ":https": want [host]:port with a numeric port`},
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
	o := PushOptions{MattermostDir: "/srv/mm"}.WithDefaults()
	if o.DestDir != "/srv/mm/config" || o.CertName != "fullchain.pem" || o.KeyName != "privkey.pem" ||
		o.Owner != "mattermost" || o.StateDir != "/var/lib/mmtls" || o.LockTimeout != 5*time.Minute ||
		o.VerifyTimeout != 3*time.Minute || o.RestartTimeout != 2*time.Minute || o.Service != "mattermost" {
		t.Errorf("defaults: %+v", o)
	}
}
