package packaging

import (
	_ "embed"
	"errors"
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
	Binary string // absolute path of the mmtls binary
	Config string // absolute path of the agent's config file
	// WritablePaths are what the agent writes beside its own state:
	// Mattermost's config directory, where the pair goes, and the
	// directory of the unit drop-ins. Each may be absent.
	WritablePaths []string
}

// DropInDir is where systemd reads drop-ins of Mattermost's unit (and of
// mmtls's own): the agent writes its bind-privilege drop-in there.
const DropInDir = "/etc/systemd/system"

// Render returns the unit file.
func (u Unit) Render() (string, error) {
	check := func(name, p string) error {
		if !filepath.IsAbs(p) || strings.ContainsAny(p, " \t\n\"'\\$%;") {
			return fmt.Errorf("unit: %s %q: want an absolute path without spaces, quotes or specifiers", name, p)
		}
		return nil
	}
	if err := errors.Join(check("binary", u.Binary), check("config", u.Config)); err != nil {
		return "", err
	}
	for _, p := range u.WritablePaths {
		if err := check("writable path", p); err != nil {
			return "", err
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
