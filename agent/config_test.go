package agent

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mmtls/mmtls/test/fixture"
)

const goodConfig = `# mmtls agent
[source]
cert = "/etc/letsencrypt/live/chat/fullchain.pem"
key = "/etc/letsencrypt/live/chat/privkey.pem"

[push]
listen = ":8443"
verify_timeout = "90s"

[watch]
quiet = "2s"
max_wait = "30s"
max_restarts_per_hour = 2

[cluster]
mode = "splay"
`

func TestParseConfig(t *testing.T) {
	c, err := ParseConfig("mmtls.toml", []byte(goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	o := c.PushOptions()
	if o.CertFile != "/etc/letsencrypt/live/chat/fullchain.pem" || o.Listen != ":8443" || o.VerifyTimeout != 90*time.Second {
		t.Errorf("push options %+v", o)
	}
	if c.Watch.Quiet != 2*time.Second || c.Watch.MaxRestartsPerHour != 2 || c.Cluster.Mode != "splay" {
		t.Errorf("config %+v", c)
	}
}

func TestParseConfigErrors(t *testing.T) {
	tests := []struct {
		name, edit, want string
	}{
		{"unknown key", strings.Replace(goodConfig, `quiet = "2s"`, `quite = "2s"`, 1), `config mmtls.toml:11: watch.quite: unknown key`},
		{"unknown table", goodConfig + "\n[balancer]\nlisten = \":443\"\n", `config mmtls.toml:18: balancer: unknown key`},
		{"bad duration", strings.Replace(goodConfig, `"90s"`, `"ninety"`, 1), `config mmtls.toml:8: push.verify_timeout:`},
		{"wrong type", strings.Replace(goodConfig, `max_restarts_per_hour = 2`, `max_restarts_per_hour = "two"`, 1), `config mmtls.toml:13: watch.max_restarts_per_hour:`},
		{"bad mode", strings.Replace(goodConfig, `"splay"`, `"raft"`, 1), `config mmtls.toml:16: cluster.mode: "raft": want auto, postgres, splay or off`},
		{"quiet longer than max", strings.Replace(goodConfig, `max_wait = "30s"`, `max_wait = "1s"`, 1), `config mmtls.toml:12: watch.max_wait: 1s is shorter than watch.quiet (2s)`},
		{"bad push setting", strings.Replace(goodConfig, `listen = ":8443"`, `listen = "8443"`, 1), `config mmtls.toml:6: push: --listen "8443": want [host]:port`},
		{"syntax", goodConfig + "\n[watch\n", `config mmtls.toml:19: expected '.' or ']' to end table name`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseConfig("mmtls.toml", []byte(tt.edit))
			var ce *ConfigError
			if !errors.As(err, &ce) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("ParseConfig = %v\nwant %q", err, tt.want)
			}
		})
	}
}

func TestLoadConfigPermissions(t *testing.T) {
	fixture.RequireRoot(t)
	path := filepath.Join(t.TempDir(), "mmtls.toml")
	os.WriteFile(path, []byte(goodConfig), 0o644)
	if _, err := LoadConfig(path); err != nil {
		t.Fatalf("root-owned 0644: %v", err)
	}
	os.Chmod(path, 0o664)
	if _, err := LoadConfig(path); err == nil || !strings.Contains(err.Error(), "must be owned by root and writable by no one else") {
		t.Errorf("group-writable: %v", err)
	}
	os.Chmod(path, 0o644)
	os.Chown(path, 4242, 0)
	if _, err := LoadConfig(path); err == nil || !strings.Contains(err.Error(), "owned by uid 4242") {
		t.Errorf("not root's: %v", err)
	}
}

func TestRequireSource(t *testing.T) {
	c, err := ParseConfig("mmtls.toml", []byte(strings.Replace(goodConfig, `cert = "/etc/letsencrypt/live/chat/fullchain.pem"`, ``, 1)))
	if err != nil {
		t.Fatalf("a file without the source parses (flags may give it): %v", err)
	}
	if err := c.RequireSource("mmtls.toml"); err == nil || err.Error() != "config mmtls.toml: source.cert: is required: the certificate file the agent watches and pushes (such as certbot's live/NAME/fullchain.pem)" {
		t.Errorf("RequireSource = %v", err)
	}
}
