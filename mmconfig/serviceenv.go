package mmconfig

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/mmtls/mmtls/certs"
)

// DefaultUnitDirs are the directories systemd loads units from, highest
// precedence first.
func DefaultUnitDirs() []string {
	return []string{"/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system"}
}

// EnvVar is one variable of a service's environment.
type EnvVar struct {
	Name  string `json:"name"`
	Value string `json:"value"`
	// Source is where it was set: "FILE:LINE".
	Source string `json:"source"`
	// Untrusted is set when Source is a file that a user other than root
	// can change (the mattermost user's EnvironmentFile): whatever it
	// names must pass the checks mmtls applies to the mattermost user's
	// tree.
	Untrusted bool `json:"untrusted,omitempty"`
}

// ServiceEnv is the environment systemd gives a service through its unit's
// Environment= and EnvironmentFile= lines, drop-ins included. It is not the
// environment of the shell running mmtls, which Mattermost never sees.
type ServiceEnv struct {
	// Unit is the unit file found, or "" when the service has none.
	Unit string `json:"unit,omitempty"`
	// Vars holds the effective variables in the order systemd applies them.
	Vars []EnvVar `json:"vars,omitempty"`
	// DropIn, when set, is mmtls's own drop-in, left out of Vars (see
	// Without): the environment is what else sets the owned keys.
	DropIn string `json:"drop_in,omitempty"`
}

// Without returns the environment without the variables that file sets.
func (e *ServiceEnv) Without(file string) *ServiceEnv {
	out := &ServiceEnv{Unit: e.Unit}
	for _, v := range e.Vars {
		if !strings.HasPrefix(v.Source, file+":") {
			out.Vars = append(out.Vars, v)
		}
	}
	return out
}

// Lookup returns the variable name, matched exactly.
func (e *ServiceEnv) Lookup(name string) (EnvVar, bool) {
	if e == nil {
		return EnvVar{}, false
	}
	for i := len(e.Vars) - 1; i >= 0; i-- {
		if e.Vars[i].Name == name {
			return e.Vars[i], true
		}
	}
	return EnvVar{}, false
}

// Override returns the variable that overrides section.key, matched without
// regard to case as Mattermost matches MM_SECTION_KEY.
func (e *ServiceEnv) Override(section, key string) (EnvVar, bool) {
	if e == nil {
		return EnvVar{}, false
	}
	want := "MM_" + section + "_" + key
	for i := len(e.Vars) - 1; i >= 0; i-- {
		if strings.EqualFold(e.Vars[i].Name, want) {
			return e.Vars[i], true
		}
	}
	return EnvVar{}, false
}

// LoadServiceEnv reads the unit named unit (such as "mattermost.service")
// and its drop-ins from dirs (nil: DefaultUnitDirs) and returns the
// environment it sets. A missing unit is not an error: the result is empty.
// An EnvironmentFile that is missing is an error unless its path starts
// with "-", as systemd treats it.
func LoadServiceEnv(unit string, dirs []string) (*ServiceEnv, error) {
	if dirs == nil {
		dirs = DefaultUnitDirs()
	}
	env := &ServiceEnv{}
	var files []string
	for _, d := range dirs {
		p := filepath.Join(d, unit)
		if _, err := os.Stat(p); err == nil {
			env.Unit = p
			files = append(files, p)
			break
		}
	}
	// Drop-ins from every directory, ordered by file name; a name in a
	// higher-precedence directory hides the same name below it.
	dropins := map[string]string{}
	for i := len(dirs) - 1; i >= 0; i-- {
		matches, _ := filepath.Glob(filepath.Join(dirs[i], unit+".d", "*.conf"))
		for _, m := range matches {
			dropins[filepath.Base(m)] = m
		}
	}
	names := make([]string, 0, len(dropins))
	for n := range dropins {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		files = append(files, dropins[n])
	}

	var assigns, envFiles []assignment
	for _, f := range files {
		a, ef, err := parseUnit(f)
		if err != nil {
			return nil, err
		}
		for _, x := range a {
			if x.reset {
				assigns = nil
				continue
			}
			assigns = append(assigns, x)
		}
		for _, x := range ef {
			if x.reset {
				envFiles = nil
				continue
			}
			envFiles = append(envFiles, x)
		}
	}
	for _, a := range assigns {
		env.Vars = append(env.Vars, a.vars...)
	}
	// Variables from EnvironmentFile= override those from Environment=.
	for _, f := range envFiles {
		path := f.value
		optional := strings.HasPrefix(path, "-")
		path = strings.TrimPrefix(path, "-")
		vars, err := parseEnvFile(path)
		if errors.Is(err, fs.ErrNotExist) && optional {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%s: EnvironmentFile: %w", f.source, err)
		}
		env.Vars = append(env.Vars, vars...)
	}
	return env, nil
}

type assignment struct {
	reset  bool
	value  string   // EnvironmentFile= path
	vars   []EnvVar // Environment= variables
	source string
}

// parseUnit returns the Environment= and EnvironmentFile= assignments of a
// unit file's [Service] section.
func parseUnit(path string) (env, envFiles []assignment, err error) {
	data, _, err := certs.ReadRegular(path, maxUnitFile)
	if err != nil {
		return nil, nil, fmt.Errorf("read unit: %w", err)
	}
	section := ""
	lineNo := 0
	sc := bufio.NewScanner(bytes.NewReader(data))
	var cont strings.Builder
	for sc.Scan() {
		lineNo++
		line := strings.TrimSpace(sc.Text())
		if strings.HasSuffix(line, "\\") {
			cont.WriteString(strings.TrimSuffix(line, "\\") + " ")
			continue
		}
		if cont.Len() > 0 {
			line = cont.String() + line
			cont.Reset()
		}
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		if line[0] == '[' {
			section = strings.Trim(line, "[]")
			continue
		}
		if section != "Service" {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		src := fmt.Sprintf("%s:%d", path, lineNo)
		switch k {
		case "Environment":
			if v == "" {
				env = append(env, assignment{reset: true})
				continue
			}
			words, err := splitQuoted(v)
			if err != nil {
				return nil, nil, fmt.Errorf("%s: Environment: %w", src, err)
			}
			a := assignment{source: src}
			for _, w := range words {
				if n, val, ok := strings.Cut(w, "="); ok {
					a.vars = append(a.vars, EnvVar{Name: n, Value: val, Source: src})
				}
			}
			env = append(env, a)
		case "EnvironmentFile":
			envFiles = append(envFiles, assignment{reset: v == "", value: v, source: src})
		}
	}
	return env, envFiles, sc.Err()
}

// splitQuoted splits on spaces, honouring double and single quotes and
// backslash escapes as systemd does for Environment=.
func splitQuoted(s string) ([]string, error) {
	var (
		out   []string
		cur   strings.Builder
		quote rune
		inTok bool
	)
	rs := []rune(s)
	for i := 0; i < len(rs); i++ {
		r := rs[i]
		switch {
		case r == '\\' && i+1 < len(rs):
			i++
			cur.WriteRune(rs[i])
			inTok = true
		case quote != 0 && r == quote:
			quote = 0
		case quote != 0:
			cur.WriteRune(r)
		case r == '"' || r == '\'':
			quote = r
			inTok = true
		case r == ' ' || r == '\t':
			if inTok {
				out = append(out, cur.String())
				cur.Reset()
				inTok = false
			}
		default:
			cur.WriteRune(r)
			inTok = true
		}
	}
	if quote != 0 {
		return nil, fmt.Errorf("unterminated quote in %q", s)
	}
	if inTok {
		out = append(out, cur.String())
	}
	return out, nil
}

// parseEnvFile reads a systemd EnvironmentFile: KEY=VALUE lines, comments
// starting with # or ;, values optionally quoted.
func parseEnvFile(path string) ([]EnvVar, error) {
	data, st, err := certs.ReadRegular(path, maxUnitFile)
	if err != nil {
		return nil, err
	}
	untrusted := writableByOthers(path, st)
	var out []EnvVar
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if len(v) >= 2 && (v[0] == '"' && v[len(v)-1] == '"' || v[0] == '\'' && v[len(v)-1] == '\'') {
			v = v[1 : len(v)-1]
		}
		out = append(out, EnvVar{Name: k, Value: v, Source: fmt.Sprintf("%s:%d", path, i+1), Untrusted: untrusted})
	}
	return out, nil
}

// maxUnitFile bounds a unit file or EnvironmentFile: real ones are a few
// hundred bytes; /dev/zero behind a symlink is not one.
const maxUnitFile = 1 << 20

// writableByOthers reports whether someone other than root may change the
// file at path: its owner, its mode, or the directory holding it (which
// could swap it). Mattermost's install guide hands its config directory,
// where the database deployments keep mattermost.environment, to the
// mattermost user.
func writableByOthers(path string, st *certs.FileState) bool {
	if st.UID != 0 || st.Mode&0o022 != 0 {
		return true
	}
	fi, err := os.Stat(filepath.Dir(path))
	if err != nil {
		return true
	}
	dst, ok := fi.Sys().(*syscall.Stat_t)
	return !ok || dst.Uid != 0 || (fi.Mode().Perm()&0o022 != 0 && fi.Mode()&os.ModeSticky == 0)
}
