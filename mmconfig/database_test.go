package mmconfig

import (
	"strings"
	"testing"
)

func TestRenderDropIn(t *testing.T) {
	s := TLS{ListenAddress: ":443", CertFile: "/opt/mattermost/config/fullchain.pem", KeyFile: "/opt/mattermost/config/privkey.pem"}.Settings()
	b, err := RenderDropIn(s)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"[Service]\n", `Environment="MM_SERVICESETTINGS_LISTENADDRESS=:443"`, `Environment="MM_SERVICESETTINGS_CONNECTIONSECURITY=TLS"`,
		`Environment="MM_SERVICESETTINGS_USELETSENCRYPT=false"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("drop-in lacks %s:\n%s", want, b)
		}
	}
	if _, err := RenderDropIn(TLS{CertFile: "/a%b/c.pem", KeyFile: "/k"}.Settings()); err == nil || !strings.Contains(err.Error(), "ServiceSettings.TLSCertFile") {
		t.Errorf("a %% in a value: %v", err)
	}
}

// The environment's overrides win over the stored document, as in
// Mattermost, matched without regard to case; a bad boolean is an error.
func TestLayered(t *testing.T) {
	doc := []byte(`{"ServiceSettings": {"SiteURL": "https://old.example", "ListenAddress": ":8065", "UseLetsEncrypt": true}}`)
	env := &ServiceEnv{Vars: []EnvVar{{Name: "MM_SERVICESETTINGS_SITEURL", Value: "https://chat.example", Source: "f:1"},
		{Name: "mm_servicesettings_useletsencrypt", Value: "false", Source: "f:2"}}}
	out, err := Layered(doc, env)
	if err != nil {
		t.Fatal(err)
	}
	ss, err := Effective(out)
	if err != nil {
		t.Fatal(err)
	}
	if *ss.SiteURL != "https://chat.example" || *ss.ListenAddress != ":8065" || *ss.UseLetsEncrypt {
		t.Errorf("layered: %s", out)
	}
	env.Vars[1].Value = "maybe"
	if _, err := Layered(doc, env); err == nil || !strings.Contains(err.Error(), "f:2") {
		t.Errorf("a bad boolean: %v", err)
	}
}

func TestLocalModeSocket(t *testing.T) {
	if _, err := LocalModeSocket([]byte(`{"ServiceSettings": {}}`)); err == nil || !strings.Contains(err.Error(), "EnableLocalMode") {
		t.Errorf("local mode off: %v", err)
	}
	if s, err := LocalModeSocket([]byte(`{"ServiceSettings": {"EnableLocalMode": true}}`)); err != nil || s != DefaultLocalModeSocket {
		t.Errorf("default socket: %q %v", s, err)
	}
	if s, _ := LocalModeSocket([]byte(`{"ServiceSettings": {"EnableLocalMode": true, "LocalModeSocketLocation": "/run/mm.sock"}}`)); s != "/run/mm.sock" {
		t.Errorf("socket %q", s)
	}
}
