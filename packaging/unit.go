package packaging

import (
	_ "embed"
	"fmt"
	"path/filepath"
	"strings"
	"text/template"
)

//go:embed mmtls.service.tmpl
var unitTemplate string

// ExampleConfig is the documented example of /etc/mmtls/mmtls.toml.
//
//go:embed mmtls.toml
var ExampleConfig string

// Unit describes the systemd unit to render.
type Unit struct {
	Binary        string // absolute path of the mmtls binary
	Config        string // absolute path of the agent's config file
	MattermostDir string // Mattermost's install directory: its config/ is writable
}

// Render returns the unit file.
func (u Unit) Render() (string, error) {
	for name, p := range map[string]string{"binary": u.Binary, "config": u.Config, "mattermost dir": u.MattermostDir} {
		if !filepath.IsAbs(p) || strings.ContainsAny(p, " \t\n\"'\\$%;") {
			return "", fmt.Errorf("unit: %s %q: want an absolute path without spaces, quotes or specifiers", name, p)
		}
	}
	t, err := template.New("unit").Option("missingkey=error").Parse(unitTemplate)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	if err := t.Execute(&b, u); err != nil {
		return "", err
	}
	return b.String(), nil
}
