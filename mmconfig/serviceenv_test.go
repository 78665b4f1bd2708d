package mmconfig

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestLoadServiceEnv(t *testing.T) {
	root := t.TempDir()
	etc, lib := filepath.Join(root, "etc"), filepath.Join(root, "lib")
	envFile := filepath.Join(root, "mattermost.environment")
	writeFile(t, filepath.Join(lib, "mattermost.service"), `[Unit]
Description=Mattermost
Environment=NOT_SERVICE=1

[Service]
Type=notify
Environment="MM_SERVICESETTINGS_SITEURL=https://from-unit.example.com" PLAIN=a\ b
Environment=DROPPED=1
Environment=
Environment='MM_LOGSETTINGS_CONSOLELEVEL=DEBUG' \
  KEPT=yes
EnvironmentFile=`+envFile+`
EnvironmentFile=-/nonexistent/optional.env
`)
	writeFile(t, envFile, "# database config\nMM_CONFIG=postgres://mmuser:pw@db/mattermost\nQUOTED=\"two words\"\n")
	writeFile(t, filepath.Join(lib, "mattermost.service.d", "10-site.conf"), "[Service]\nEnvironment=MM_SERVICESETTINGS_SITEURL=https://from-lib-dropin.example.com\n")
	writeFile(t, filepath.Join(etc, "mattermost.service.d", "10-site.conf"), "[Service]\nEnvironment=mm_servicesettings_listenaddress=:8443\n")

	env, err := LoadServiceEnv("mattermost.service", []string{etc, lib})
	if err != nil {
		t.Fatal(err)
	}
	if env.Unit != filepath.Join(lib, "mattermost.service") {
		t.Errorf("Unit = %q", env.Unit)
	}
	get := func(name string) string {
		v, _ := env.Lookup(name)
		return v.Value
	}
	for name, want := range map[string]string{
		"MM_CONFIG":                   "postgres://mmuser:pw@db/mattermost",
		"QUOTED":                      "two words",
		"KEPT":                        "yes",
		"MM_LOGSETTINGS_CONSOLELEVEL": "DEBUG",
		"DROPPED":                     "",
		"PLAIN":                       "",
		"NOT_SERVICE":                 "",
	} {
		if got := get(name); got != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
	// The /etc drop-in hides the /lib one of the same name.
	if v, ok := env.Override("ServiceSettings", "SiteURL"); ok {
		t.Errorf("SiteURL override %+v survived a reset and a hidden drop-in", v)
	}
	v, ok := env.Override("ServiceSettings", "ListenAddress")
	if !ok || v.Value != ":8443" || !strings.HasSuffix(v.Source, "etc/mattermost.service.d/10-site.conf:2") {
		t.Errorf("ListenAddress override = %+v, %v", v, ok)
	}
}

func TestLoadServiceEnvMissing(t *testing.T) {
	env, err := LoadServiceEnv("mattermost.service", []string{t.TempDir()})
	if err != nil || env.Unit != "" || len(env.Vars) != 0 {
		t.Errorf("missing unit: %+v, %v", env, err)
	}
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "mattermost.service"), "[Service]\nEnvironmentFile=/nonexistent/mm.env\n")
	_, err = LoadServiceEnv("mattermost.service", []string{dir})
	if !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "mattermost.service:2: EnvironmentFile") {
		t.Errorf("missing required EnvironmentFile: %v", err)
	}
}

func TestLocate(t *testing.T) {
	mmDir := t.TempDir()
	writeFile(t, filepath.Join(mmDir, "config", "config.json"), "{}")
	envWith := func(v string) *ServiceEnv {
		return &ServiceEnv{Vars: []EnvVar{{Name: "MM_CONFIG", Value: v, Source: "unit:3"}}}
	}
	tests := []struct {
		name       string
		flag       string
		env        *ServiceEnv
		wantPath   string
		wantOrigin string
		wantErr    string
	}{
		{name: "default", wantPath: filepath.Join(mmDir, "config", "config.json"), wantOrigin: "default"},
		{name: "flag wins", flag: "/etc/mm.json", env: envWith("/x.json"), wantPath: "/etc/mm.json", wantOrigin: "--mm-config"},
		{name: "service MM_CONFIG", env: envWith("/srv/mm/config.json"), wantPath: "/srv/mm/config.json", wantOrigin: "MM_CONFIG (unit:3)"},
		{name: "relative MM_CONFIG", env: envWith("config.json"), wantPath: filepath.Join(mmDir, "config", "config.json"), wantOrigin: "MM_CONFIG (unit:3)"},
		{name: "relative missing", env: envWith("nope.json"), wantErr: `mattermost config "nope.json" from MM_CONFIG (unit:3): not found`},
		{name: "database", env: envWith("postgres://u:p@db/mm"), wantOrigin: "MM_CONFIG (unit:3), a database store"},
		{name: "mysql flag", flag: "mysql://u:p@tcp(db)/mm", wantErr: "mattermost config from --mm-config: Mattermost's config is in a MySQL database"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			loc, err := Locate(tt.flag, tt.env, mmDir)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("Locate error = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if loc.Path != tt.wantPath || loc.Origin != tt.wantOrigin {
				t.Errorf("Locate = %+v, want %s from %s", loc, tt.wantPath, tt.wantOrigin)
			}
		})
	}
}
