package agent

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/mmtls/mmtls/agent/balance"
	"github.com/mmtls/mmtls/agent/clusterdb"
	"github.com/mmtls/mmtls/agent/issuer"
	"github.com/mmtls/mmtls/agent/push"
	"github.com/mmtls/mmtls/mmconfig"
)

// DefaultConfigFile is where the agent's config file lives.
const DefaultConfigFile = "/etc/mmtls/mmtls.toml"

// Config is the agent's config file, /etc/mmtls/mmtls.toml. Every key is
// optional; a zero value means the documented default. Command-line flags
// override the file. Each section is the options struct of the room that
// uses it, so a setting is declared once.
type Config struct {
	Source  SourceConfig  `toml:"source"`
	Push    push.Options  `toml:"push"`
	Watch   WatchOptions  `toml:"watch"`
	Cluster ClusterConfig `toml:"cluster"`
	Metrics MetricsConfig `toml:"metrics"`
	// Balance, when it names listeners and upstreams, runs the balancer
	// (mmtls balance) in the agent too.
	Balance balance.Options `toml:"balance"`
	// ACME, on the host that answers port 80 (the balancer's
	// redirect_http), obtains and renews the certificate itself.
	ACME issuer.Options `toml:"acme"`
}

// SourceConfig names the pair the agent watches and pushes.
type SourceConfig struct {
	Cert string `toml:"cert"` // such as /etc/letsencrypt/live/NAME/fullchain.pem
	Key  string `toml:"key"`  // such as /etc/letsencrypt/live/NAME/privkey.pem
	// From = "cluster" takes the pair from the cluster's database, where
	// `mmtls publish` put it, instead of Cert and Key.
	From string `toml:"from"`
}

// FromCluster reports whether the node follows the cluster's bundles.
func (s SourceConfig) FromCluster() bool { return s.From == "cluster" }

// ClusterConfig makes nodes of one cluster restart one at a time.
type ClusterConfig struct {
	// Mode is "auto" (PostgreSQL advisory lock when Mattermost's database
	// is PostgreSQL, else a random splay), "postgres", "splay" or "off".
	// "" means DefaultClusterMode.
	Mode string `toml:"mode"`
	// DSN of the database the cluster shares; empty means Mattermost's
	// SqlSettings.DataSource (or MM_SQLSETTINGS_DATASOURCE in its service).
	DSN string `toml:"dsn"`
	// LockWait: 0 means DefaultLockWait. Splay: 0 means DefaultSplay.
	LockWait time.Duration `toml:"lock_wait"`
	Splay    time.Duration `toml:"splay"`
	// KeyFile is the cluster key that seals published keys; "" means
	// clusterdb.DefaultKeyFile.
	KeyFile string `toml:"key_file"`
	// Node names this node in the rollout; "" means the host name.
	Node string `toml:"node"`
	// Advertise is host:port where this node's Mattermost serves TLS as the
	// balancer reaches it; "" means the push's listen address with this
	// host's name.
	Advertise string `toml:"advertise"`
	// Publish makes the watch loop publish the source pair to the cluster
	// instead of pushing it here (the host that holds the certificate).
	Publish bool `toml:"publish"`
	// AgentCheck is ADDR:PORT where this node answers the balancers' agent
	// checks (HAProxy's protocol): "drain" before it restarts Mattermost;
	// "" means off. AgentCheckAllow lists who may poll it (CIDRs; nil
	// means DefaultAgentCheckAllow, loopback). Before a restart the node
	// waits up to DrainWait for every balancer to see the drain, then
	// DrainGrace; back, it keeps the restart lock RejoinWait once the
	// balancers have seen it ready. 0 means the Default; negative, none.
	AgentCheck      string        `toml:"agent_check"`
	AgentCheckAllow []string      `toml:"agent_check_allow"`
	DrainWait       time.Duration `toml:"drain_wait"`
	DrainGrace      time.Duration `toml:"drain_grace"`
	RejoinWait      time.Duration `toml:"rejoin_wait"`
}

// WithDefaults returns c with its zero fields set to their defaults.
func (c ClusterConfig) WithDefaults() ClusterConfig {
	if c.Mode == "" {
		c.Mode = DefaultClusterMode
	}
	if c.LockWait == 0 {
		c.LockWait = DefaultLockWait
	}
	if c.Splay == 0 {
		c.Splay = DefaultSplay
	}
	if c.KeyFile == "" {
		c.KeyFile = clusterdb.DefaultKeyFile
	}
	if c.AgentCheckAllow == nil {
		c.AgentCheckAllow = DefaultAgentCheckAllow
	}
	if c.DrainWait == 0 {
		c.DrainWait = DefaultDrainWait
	}
	if c.DrainGrace == 0 {
		c.DrainGrace = DefaultDrainGrace
	}
	if c.RejoinWait == 0 {
		c.RejoinWait = DefaultRejoinWait
	}
	return c
}

// MetricsConfig turns on the Prometheus endpoint.
type MetricsConfig struct {
	Listen string `toml:"listen"` // such as 127.0.0.1:9469; empty: off
}

// ConfigError names the key (and line) of a bad setting in the file.
type ConfigError struct {
	File string
	Line int // 0 when unknown
	Key  string
	Err  error
}

func (e *ConfigError) Error() string {
	loc := e.File
	if e.Line > 0 {
		loc = fmt.Sprintf("%s:%d", e.File, e.Line)
	}
	if e.Key == "" {
		return fmt.Sprintf("config %s: %v", loc, e.Err)
	}
	return fmt.Sprintf("config %s: %s: %v", loc, e.Key, e.Err)
}

func (e *ConfigError) Unwrap() error { return e.Err }

// LoadConfig reads the agent's config file. The file names a command that
// runs as root (restart_command), so it must be owned by root and not
// writable by group or others. An unknown key or a bad value is an error
// naming the key and its line.
func LoadConfig(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, &ConfigError{File: path, Err: err}
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, &ConfigError{File: path, Err: err}
	}
	st := fi.Sys().(*syscall.Stat_t)
	if st.Uid != 0 || fi.Mode().Perm()&0o022 != 0 {
		return nil, &ConfigError{File: path, Err: fmt.Errorf("owned by uid %d with mode %04o; it names a command run as root, "+
			"so it must be owned by root and writable by no one else (chown root %s; chmod go-w %s)", st.Uid, fi.Mode().Perm(), path, path)}
	}
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(f); err != nil {
		return nil, &ConfigError{File: path, Err: err}
	}
	return ParseConfig(path, buf.Bytes())
}

// ParseConfig parses config file content; name is used in errors.
func ParseConfig(name string, data []byte) (*Config, error) {
	var c Config
	md, err := toml.Decode(string(data), &c)
	if err != nil {
		var pe toml.ParseError
		if !errors.As(err, &pe) {
			// Type errors are plain errors that carry the key and line
			// in their text only.
			if m := typeErrRE.FindStringSubmatch(err.Error()); m != nil {
				line, _ := strconv.Atoi(m[1])
				return nil, &ConfigError{File: name, Line: line, Key: m[2], Err: errors.New(m[3])}
			}
			return nil, &ConfigError{File: name, Err: err}
		}
		msg := pe.Message
		if d, ok := strings.CutPrefix(msg, "invalid duration: "); ok {
			msg = d + " is not a duration such as 90s, 10m or 1h30m"
		}
		ce := &ConfigError{File: name, Line: pe.Position.Line, Err: errors.New(msg)}
		if pe.LastKey != "" && keyLine(data, strings.Split(pe.LastKey, ".")) == pe.Position.Line {
			ce.Key = pe.LastKey // the error is about that key's value
		}
		return nil, ce
	}
	if und := md.Undecoded(); len(und) > 0 {
		k := und[0].String()
		return nil, &ConfigError{File: name, Line: keyLine(data, und[0]), Key: k, Err: errors.New("unknown key")}
	}
	if err := c.validate(); err != nil {
		var ce *ConfigError
		if errors.As(err, &ce) {
			ce.File = name
			ce.Line = keyLine(data, strings.Split(ce.Key, "."))
		}
		return nil, err
	}
	return &c, nil
}

func (c *Config) validate() error {
	bad := func(key, format string, args ...any) error {
		return &ConfigError{Key: key, Err: fmt.Errorf(format, args...)}
	}
	switch c.Cluster.Mode {
	case "", "auto", "postgres", "splay", "off":
	default:
		return bad("cluster.mode", "%q: want auto, postgres, splay or off", c.Cluster.Mode)
	}
	switch {
	case c.Source.From != "" && !c.Source.FromCluster():
		return bad("source.from", "%q: want \"cluster\" (or leave it out and name cert and key)", c.Source.From)
	case c.Source.FromCluster() && (c.Source.Cert != "" || c.Source.Key != ""):
		return bad("source.from", "\"cluster\" takes the pair from the cluster's database: remove source.cert and source.key")
	case c.Source.FromCluster() && c.Cluster.Publish:
		return bad("cluster.publish", "a node that takes its pair from the cluster cannot publish it")
	case c.Cluster.Publish && !c.ACME.Enabled() && (c.Source.Cert == "" || c.Source.Key == ""):
		return bad("cluster.publish", "publishes the source pair: set source.cert and source.key (or [acme])")
	}
	if c.Watch.MaxRestartsPerHour < 0 {
		return bad("watch.max_restarts_per_hour", "%d: must not be negative", c.Watch.MaxRestartsPerHour)
	}
	for _, d := range []struct {
		key string
		d   time.Duration
	}{{"watch.quiet", c.Watch.Quiet}, {"watch.max_wait", c.Watch.MaxWait}, {"watch.reconcile", c.Watch.Reconcile},
		{"watch.report_mismatch_after", c.Watch.ReportMismatchAfter}, {"watch.backoff_min", c.Watch.BackoffMin},
		{"watch.backoff_max", c.Watch.BackoffMax}, {"watch.expiry_warning", c.Watch.ExpiryWarning},
		{"cluster.lock_wait", c.Cluster.LockWait}, {"cluster.splay", c.Cluster.Splay}} {
		if d.d < 0 {
			return bad(d.key, "%s: must not be negative", d.d)
		}
	}
	if c.Watch.MaxWait > 0 && c.Watch.Quiet > c.Watch.MaxWait {
		return bad("watch.max_wait", "%s is shorter than watch.quiet (%s)", c.Watch.MaxWait, c.Watch.Quiet)
	}
	if b := c.Balance; len(b.Upstreams) > 0 {
		if len(b.Listen) == 0 {
			b.Listen = []string{push.DefaultListen} // may come from --listen
		}
		if _, err := b.WithDefaults().Config(nil); err != nil {
			return &ConfigError{Key: "balance", Err: err}
		}
	}
	// The source may come from flags instead (mmtls watch --config):
	// RequireSource checks it where the file alone must do.
	o := c.PushOptions()
	if o.CertFile == "" || o.KeyFile == "" {
		o.CertFile, o.KeyFile = "source.cert", "source.key"
	}
	if err := o.Validate(); err != nil {
		// The messages name flags; each is the [push] key of the same
		// name with underscores (--site-url is push.site_url).
		return &ConfigError{Key: "push", Err: err}
	}
	return nil
}

// RequireSource reports a file that does not name the source pair: the
// service (mmtls run) has no flags to name it.
func (c *Config) RequireSource(file string) error {
	switch {
	case c.Source.FromCluster():
		return nil
	case c.Source.Cert == "":
		return &ConfigError{File: file, Key: "source.cert", Err: errors.New("is required: the certificate file the agent watches and pushes (such as certbot's live/NAME/fullchain.pem)")}
	case c.Source.Key == "":
		return &ConfigError{File: file, Key: "source.key", Err: errors.New("is required: the key file the agent watches and pushes (such as certbot's live/NAME/privkey.pem)")}
	}
	return nil
}

// PushOptions returns the push settings of the file, with the source pair.
func (c *Config) PushOptions() push.Options {
	o := c.Push
	o.CertFile, o.KeyFile = c.Source.Cert, c.Source.Key
	return o
}

// WatchOptions returns the file's watch settings with its push settings.
func (c *Config) WatchOptions() WatchOptions {
	w := c.Watch
	w.Push = c.PushOptions()
	return w
}

var typeErrRE = regexp.MustCompile(`^toml: line (\d+) \(last key "([^"]+)"\): (.*)$`)

var tableRE = regexp.MustCompile(`^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]`)

// keyLine finds the line of a key in TOML text: the library reports
// unknown keys without positions.
func keyLine(data []byte, key []string) int {
	if len(key) == 0 {
		return 0
	}
	table, name := strings.Join(key[:len(key)-1], "."), key[len(key)-1]
	keyRE := regexp.MustCompile(`^\s*"?` + regexp.QuoteMeta(name) + `"?\s*=`)
	cur := ""
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if m := tableRE.FindStringSubmatch(line); m != nil {
			cur = m[1]
			if len(key) == 1 && cur == name {
				return n // an unknown table
			}
			continue
		}
		if cur == table && keyRE.MatchString(line) {
			return n
		}
	}
	return 0
}

// Effective returns a copy of c with every default filled in, as the agent
// will run it: what `mmtls config check` prints.
func (c *Config) Effective() *Config {
	e := *c
	e.Push = c.Push.WithDefaults()
	e.Watch = c.Watch.WithDefaults()
	e.Watch.Push = push.Options{}
	e.Cluster = c.Cluster.WithDefaults()
	if c.Balance.Enabled() {
		e.Balance = c.Balance.WithDefaults()
	}
	if m, err := MetricsAddr(c.Metrics.Listen); err == nil {
		e.Metrics.Listen = m
	}
	return &e
}

// WritablePaths lists the directories outside its own state directory that
// the agent writes, as the config names them: where the pair is installed,
// Mattermost's config.json's directory, a state directory other than the
// default one, and the systemd drop-in directory (the bind privilege). The
// service unit makes exactly these writable.
func (c *Config) WritablePaths(unitDirs []string) []string {
	o := c.Push.WithDefaults()
	var out []string
	add := func(p string) {
		if p != "" && filepath.IsAbs(p) && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	add(o.DestDir)
	cfg := o.MMConfig
	if cfg == "" {
		if env, err := mmconfig.LoadServiceEnv(o.Service+".service", unitDirs); err == nil {
			if v, ok := env.Lookup("MM_CONFIG"); ok {
				cfg = v.Value
			}
		}
	}
	if cfg == "" {
		cfg = filepath.Join(o.MattermostDir, "config", "config.json")
	}
	if !strings.Contains(cfg, "://") {
		add(filepath.Dir(cfg))
	}
	if o.StateDir != push.DefaultStateDir {
		add(o.StateDir)
	}
	if unitDirs == nil {
		unitDirs = mmconfig.DefaultUnitDirs()
	}
	add(unitDirs[0])
	return out
}

// CheckPaths reports the paths the config names that do not exist now (a
// typo in a path is the commonest mistake): the source pair, the cluster
// key, Mattermost's directory, its config file, and where the pair goes.
// `mmtls config check` runs it; the agent itself fails fast on a missing
// source at start.
func (c *Config) CheckPaths(file string, unitDirs []string) error {
	var errs []error
	missing := func(key, path, what string) {
		if path == "" {
			return
		}
		if _, err := os.Stat(path); err != nil {
			errs = append(errs, &ConfigError{File: file, Key: key, Err: fmt.Errorf("%q: %w (%s)", path, errors.Unwrap(err), what)})
		}
	}
	if !c.Source.FromCluster() {
		missing("source.cert", c.Source.Cert, "the certificate the agent watches")
		missing("source.key", c.Source.Key, "the key the agent watches")
	}
	if c.Source.FromCluster() || c.Cluster.Publish {
		missing("cluster.key_file", c.Cluster.WithDefaults().KeyFile, "make it with mmtls cluster keygen")
	}
	if (c.Source.Cert != "" || c.Source.FromCluster()) && !c.Cluster.Publish {
		o := c.Push.WithDefaults()
		missing("push.mattermost_dir", o.MattermostDir, "Mattermost's install directory")
		missing("push.dest_dir", o.DestDir, "where the pair is installed")
		if env, err := mmconfig.LoadServiceEnv(o.Service+".service", unitDirs); err == nil {
			if loc, err := mmconfig.Locate(o.MMConfig, env, o.MattermostDir); err == nil {
				missing("push.mm_config", loc.Path, "Mattermost's config, found "+loc.Origin)
			} else {
				errs = append(errs, &ConfigError{File: file, Key: "push.mm_config", Err: err})
			}
		}
	}
	return errors.Join(errs...)
}
