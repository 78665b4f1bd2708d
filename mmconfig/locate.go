package mmconfig

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// ErrDatabaseConfig is returned by Locate when Mattermost keeps its config in
// the database, which mmtls does not edit yet.
var ErrDatabaseConfig = errors.New("config in the database is not supported yet")

// Location is where Mattermost's config was found.
type Location struct {
	// Path is the absolute path of config.json.
	Path string `json:"path"`
	// Origin says how it was found: "--mm-config", "MM_CONFIG (FILE:LINE)"
	// or "default".
	Origin string `json:"origin"`
	// Untrusted is set when the path came from a file a user other than
	// root can change: the file it names must be the mattermost user's
	// own, as config.json is, never a file of root's.
	Untrusted bool `json:"untrusted,omitempty"`
}

// Locate finds Mattermost's config file: flag (the --mm-config value) if
// set, else MM_CONFIG from the service environment, else
// mattermostDir/config/config.json. A relative path is looked up as
// Mattermost does from its working directory, mattermostDir: there, then in
// its config/ directory. A database DSN is refused with ErrDatabaseConfig.
func Locate(flag string, env *ServiceEnv, mattermostDir string) (Location, error) {
	loc := Location{Path: flag, Origin: "--mm-config"}
	if flag == "" {
		if v, ok := env.Lookup("MM_CONFIG"); ok && v.Value != "" {
			loc = Location{Path: v.Value, Origin: "MM_CONFIG (" + v.Source + ")", Untrusted: v.Untrusted}
		} else {
			loc = Location{Path: filepath.Join(mattermostDir, "config", "config.json"), Origin: "default"}
		}
	}
	for _, scheme := range []string{"postgres://", "postgresql://", "mysql://"} {
		if strings.HasPrefix(strings.ToLower(loc.Path), scheme) {
			return Location{}, fmt.Errorf("mattermost config from %s is a %s database DSN: %w; mmtls edits config.json only",
				loc.Origin, strings.TrimSuffix(scheme, "://"), ErrDatabaseConfig)
		}
	}
	if !filepath.IsAbs(loc.Path) {
		rel := loc.Path
		loc.Path = ""
		for _, cand := range []string{filepath.Join(mattermostDir, rel), filepath.Join(mattermostDir, "config", rel)} {
			if _, err := os.Stat(cand); err == nil {
				loc.Path = cand
				break
			}
		}
		if loc.Path == "" {
			return Location{}, fmt.Errorf("mattermost config %q from %s: not found in %s or %s/config", rel, loc.Origin, mattermostDir, mattermostDir)
		}
	}
	loc.Path = filepath.Clean(loc.Path)
	return loc, nil
}
