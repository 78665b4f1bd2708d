package mmconfig

import (
	"fmt"
	"os"
	"path/filepath"
)

// Location is where Mattermost's config was found.
type Location struct {
	// Path is the absolute path of config.json; empty for a database
	// store.
	Path string `json:"path"`
	// DSN is the database store's (PostgreSQL) data source name, when
	// Mattermost keeps its config there.
	DSN string `json:"-"`
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
// its config/ directory. A PostgreSQL DSN is a database store (DSN set);
// MySQL is refused with ErrMySQL.
func Locate(flag string, env *ServiceEnv, mattermostDir string) (Location, error) {
	loc := Location{Path: flag, Origin: "--mm-config"}
	if flag == "" {
		if v, ok := env.Lookup("MM_CONFIG"); ok && v.Value != "" {
			loc = Location{Path: v.Value, Origin: "MM_CONFIG (" + v.Source + ")", Untrusted: v.Untrusted}
		} else {
			loc = Location{Path: filepath.Join(mattermostDir, "config", "config.json"), Origin: "default"}
		}
	}
	switch databaseDriver(loc.Path) {
	case "postgres":
		return Location{DSN: loc.Path, Origin: loc.Origin + ", a database store", Untrusted: loc.Untrusted}, nil
	case "mysql":
		return Location{}, fmt.Errorf("mattermost config from %s: %w", loc.Origin, ErrMySQL)
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
