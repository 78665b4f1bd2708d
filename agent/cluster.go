package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/url"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/mmtls/mmtls/agent/clock"
	"github.com/mmtls/mmtls/agent/clusterdb"
	"github.com/mmtls/mmtls/agent/push"
	"github.com/mmtls/mmtls/certs"
	"github.com/mmtls/mmtls/mmconfig"
)

// Defaults of ClusterConfig.
const (
	// DefaultClusterMode finds the cluster's database in Mattermost's own
	// config: nothing to set up on a node that already runs Mattermost.
	DefaultClusterMode = "auto"
	// DefaultLockWait covers another node's restart, verification and
	// rollback, with room to spare.
	DefaultLockWait = 15 * time.Minute
	// DefaultSplay spreads restarts where no lock can be had: wider than
	// one Mattermost restart (about 5 s), short enough for a renewal.
	DefaultSplay = 2 * time.Minute
	// lockRetry is the pause between attempts to reach the database.
	lockRetry = 2 * time.Second
	// lockConnectTimeout bounds one connection to the database.
	lockConnectTimeout = 10 * time.Second
	// unlockTimeout bounds releasing the lock; closing the connection
	// releases it anyway.
	unlockTimeout = 10 * time.Second
	// clusterLockKey is the PostgreSQL advisory lock every mmtls agent of a
	// cluster takes around its restart.
	clusterLockKey = clusterdb.RestartLockKey
	// acmeLockKey is the advisory lock of the balancer hosts that order
	// the cluster's certificate.
	acmeLockKey = clusterdb.OrderLockKey
)

// PostgresLock holds a PostgreSQL advisory lock in the database the
// cluster shares. A node that cannot take it within Wait (the database is
// unreachable, or the lock is not released) falls back to a random splay
// and says so.
type PostgresLock struct {
	DSN string
	// Key is the advisory lock's key; 0 means the cluster restart lock's.
	// Name says which lock in logs; "" means the cluster restart lock.
	Key     int64
	Name    string
	Wait    time.Duration // 0 means DefaultLockWait
	Splay   time.Duration // 0 means DefaultSplay
	Logger  *slog.Logger  // nil discards
	Metrics *Metrics      // nil records nothing
	Clock   clock.Clock   // nil means the system clock
}

func (l *PostgresLock) String() string { return "postgres advisory lock" }

func (l *PostgresLock) key() int64 {
	if l.Key == 0 {
		return clusterLockKey
	}
	return l.Key
}

func (l *PostgresLock) name() string {
	if l.Name == "" {
		return "the cluster restart lock"
	}
	return "the " + l.Name
}

// Acquire takes the lock, retrying the connection until Wait passes.
func (l *PostgresLock) Acquire(ctx context.Context) (func(), error) {
	log, clk := logger(l.Logger), clock.Or(l.Clock)
	start := clk.Now()
	wait := ClusterConfig{LockWait: l.Wait}.WithDefaults().LockWait
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	retry := clk.NewTimer(lockRetry)
	defer retry.Stop()
	var lastErr error
	for attempt := 0; ; attempt++ {
		conn, err := l.lock(wctx)
		if err == nil {
			l.Metrics.lockWaited(clock.Since(clk, start))
			log.Info("holding "+l.name(), "waited", clock.Since(clk, start).Round(time.Millisecond))
			return func() {
				rctx, cancel := context.WithTimeout(context.Background(), unlockTimeout)
				defer cancel()
				if _, err := conn.Exec(rctx, "SELECT pg_advisory_unlock($1)", l.key()); err != nil {
					log.Warn("releasing "+l.name()+" failed; closing the connection releases it", "err", err)
				}
				conn.Close(rctx)
			}, nil
		}
		lastErr = err
		if attempt == 0 {
			log.Info("waiting for "+l.name(), "err", err)
		}
		select {
		case <-wctx.Done():
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			log.Warn("could not take the cluster restart lock; restarting after a random splay instead", "waited", wait, "err", lastErr)
			if err := splay(ctx, clk, ClusterConfig{Splay: l.Splay}.WithDefaults().Splay, log); err != nil {
				return nil, err
			}
			l.Metrics.lockWaited(clock.Since(clk, start))
			return func() {}, nil
		case <-retry.C():
			retry.Reset(lockRetry)
		}
	}
}

// lock connects and blocks in pg_advisory_lock until it is granted or ctx ends.
func (l *PostgresLock) lock(ctx context.Context) (*pgx.Conn, error) {
	cctx, cancel := context.WithTimeout(ctx, lockConnectTimeout)
	conn, err := clusterdb.Connect(cctx, l.DSN)
	cancel()
	if err != nil {
		return nil, err // says "connect to the cluster database"
	}
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", l.key()); err != nil {
		conn.Close(context.Background())
		return nil, fmt.Errorf("pg_advisory_lock: %w", err)
	}
	return conn, nil
}

// SplayLock takes no lock: it waits a random time below Splay, so nodes
// renewing together are unlikely to restart together. For MySQL clusters
// and when the database is out of reach.
type SplayLock struct {
	Splay  time.Duration // 0 means DefaultSplay
	Logger *slog.Logger  // nil discards
	Clock  clock.Clock   // nil means the system clock
}

func (s *SplayLock) String() string { return "random splay" }

// Acquire waits the splay.
func (s *SplayLock) Acquire(ctx context.Context) (func(), error) {
	if err := splay(ctx, clock.Or(s.Clock), ClusterConfig{Splay: s.Splay}.WithDefaults().Splay, logger(s.Logger)); err != nil {
		return nil, err
	}
	return func() {}, nil
}

func splay(ctx context.Context, clk clock.Clock, max time.Duration, log *slog.Logger) error {
	d := time.Duration(rand.Int64N(int64(max) + 1))
	log.Info("waiting a random splay before restarting", "splay", d.Round(time.Millisecond))
	t := clk.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C():
		return nil
	}
}

// NewRestartLock chooses the cluster coordination for mode ("auto",
// "postgres", "splay", "off"; "" is "auto"). With no DSN given, it reads
// Mattermost's SqlSettings and ClusterSettings.Enable (or MM_* overrides in
// its service's environment): "auto" coordinates only a cluster node
// (ClusterSettings.Enable); PostgreSQL gets the advisory lock, MySQL a
// splay with a warning. It returns nil for "off" and a single node.
func NewRestartLock(c ClusterConfig, o push.Options, unitDirs []string, log *slog.Logger, m *Metrics) (push.RestartLock, error) {
	log = logger(log)
	c = c.WithDefaults()
	mode, dsn, wait, splayMax := c.Mode, c.DSN, c.LockWait, c.Splay
	switch mode {
	case "off":
		return nil, nil
	case "splay":
		return &SplayLock{Splay: splayMax, Logger: log}, nil
	case "auto", "postgres":
	default:
		return nil, fmt.Errorf("cluster mode %q: want auto, postgres, splay or off", mode)
	}
	driver := "postgres"
	if dsn == "" {
		var err error
		var cluster bool
		if driver, dsn, cluster, err = mattermostCluster(o.WithDefaults(), unitDirs); err != nil {
			return nil, err
		}
		if !cluster && mode == "auto" {
			// A single node: its config names a database (often
			// Mattermost's default, unreachable), and waiting for a lock
			// there would only delay the restart.
			log.Debug("Mattermost's ClusterSettings.Enable is off: a single node, restarts are not coordinated (set cluster.mode or cluster.dsn to force it)")
			return nil, nil
		}
	}
	if driver == "mysql" || strings.HasPrefix(dsn, "mysql://") {
		if mode == "postgres" {
			return nil, errors.New("cluster mode postgres: Mattermost's database is MySQL")
		}
		log.Warn("Mattermost's database is MySQL: nodes restart after a random splay, without a cluster-wide lock")
		return &SplayLock{Splay: splayMax, Logger: log}, nil
	}
	if dsn == "" {
		if mode == "postgres" {
			return nil, errors.New("cluster mode postgres: no database DSN in Mattermost's SqlSettings.DataSource; set cluster.dsn")
		}
		log.Info("no cluster database found in Mattermost's config; restarts are not coordinated with other nodes")
		return nil, nil
	}
	if err := checkDSNFiles(dsn); err != nil {
		// The DSN comes from Mattermost's config, which the mattermost
		// user can write: a FIFO there would hang the connection with the
		// state lock held.
		if mode == "postgres" {
			return nil, err
		}
		log.Warn("not using the cluster database: nodes restart after a random splay", "err", err)
		return &SplayLock{Splay: splayMax, Logger: log}, nil
	}
	return &PostgresLock{DSN: clusterdb.NormalizeDSN(dsn), Wait: wait, Splay: splayMax, Logger: log, Metrics: m}, nil
}

// dsnFileParams are the parameters of a PostgreSQL DSN that name files the
// driver reads while parsing it, with no deadline.
var dsnFileParams = []string{"sslrootcert", "sslcert", "sslkey", "passfile", "servicefile"}

// checkDSNFiles refuses a DSN that names, for the driver to read, anything
// but a regular file (a FIFO blocks the read forever; a device is opened).
func checkDSNFiles(dsn string) error {
	params := map[string]string{}
	if u, err := url.Parse(dsn); err == nil && u.Scheme != "" {
		for k, v := range u.Query() {
			params[k] = v[len(v)-1]
		}
	} else {
		for _, kv := range strings.Fields(dsn) {
			if k, v, ok := strings.Cut(kv, "="); ok {
				params[k] = strings.Trim(v, "'")
			}
		}
	}
	for _, k := range dsnFileParams {
		p := params[k]
		if p == "" || p == "system" {
			continue
		}
		if _, _, err := certs.ReadRegular(p, certs.MaxFileSize); err != nil {
			return fmt.Errorf("the cluster database DSN's %s: %w", k, err)
		}
	}
	return nil
}

// mattermostDatabase reads SqlSettings.DriverName and DataSource as
// Mattermost sees them: the service environment wins over config.json.
func mattermostDatabase(o push.Options, unitDirs []string) (driver, dsn string, err error) {
	driver, dsn, _, err = mattermostCluster(o, unitDirs)
	return driver, dsn, err
}

// mattermostCluster is mattermostDatabase, and whether Mattermost runs as a
// cluster node (ClusterSettings.Enable, which its HA setup requires).
func mattermostCluster(o push.Options, unitDirs []string) (driver, dsn string, cluster bool, err error) {
	env, err := mmconfig.LoadServiceEnv(o.Service+".service", unitDirs)
	if err != nil {
		return "", "", false, err
	}
	loc, err := mmconfig.Locate(o.MMConfig, env, o.MattermostDir)
	if err != nil {
		return "", "", false, err
	}
	var doc []byte
	if loc.DSN != "" {
		// A database store: the cluster's database is that one.
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		doc, err = mmconfig.ReadDatabase(ctx, loc.DSN)
	} else {
		doc, err = push.ReadMattermostConfig(loc.Path)
	}
	if err != nil {
		return "", "", false, err
	}
	if driver, err = mmconfig.LookupString(doc, "SqlSettings", "DriverName"); err != nil {
		return "", "", false, err
	}
	if dsn, err = mmconfig.LookupString(doc, "SqlSettings", "DataSource"); err != nil {
		return "", "", false, err
	}
	if v, ok := env.Override("SqlSettings", "DriverName"); ok {
		driver = v.Value
	}
	if v, ok := env.Override("SqlSettings", "DataSource"); ok {
		dsn = v.Value
	}
	if driver == "" {
		driver = "postgres"
	}
	enabled, err := mmconfig.Lookup(doc, "ClusterSettings", "Enable")
	if err != nil {
		return "", "", false, err
	}
	cluster = string(enabled) == "true"
	if v, ok := env.Override("ClusterSettings", "Enable"); ok {
		cluster = strings.EqualFold(v.Value, "true")
	}
	return driver, dsn, cluster, nil
}

func logger(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}
