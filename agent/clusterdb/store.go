package clusterdb

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"time"

	"github.com/mmtls/mmtls/mmconfig"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Bundle states.
const (
	StateRolling  = "rolling"  // nodes are taking it, one at a time
	StateComplete = "complete" // every live node serves it
	StateHalted   = "halted"   // a node failed with it; others keep the previous one
)

// Channel is the NOTIFY channel a publish signals on.
const Channel = "mmtls_bundle"

// keepBundles is how many bundles the store keeps.
const keepBundles = 10

// Timeouts of the store's calls.
const (
	connectTimeout = 10 * time.Second
	queryTimeout   = 30 * time.Second
)

// ErrMySQL refuses a MySQL DSN: the rollout needs PostgreSQL (Mattermost is
// leaving MySQL).
var ErrMySQL = errors.New("the certificate rollout needs PostgreSQL; Mattermost's MySQL support is going away and mmtls does not use it")

// Bundle is one published certificate and its sealed key.
type Bundle struct {
	ID              int64
	ChainPEM        []byte
	KeySealed       []byte
	KeyID           string
	LeafFingerprint string
	KeyFingerprint  string
	NotAfter        time.Time
	PublishedBy     string
	PublishedAt     time.Time
	State           string
	HaltedBy        string
	HaltReason      string
	// Attempt counts publishes of this same pair: `publish --retry` after a
	// halt raises it, so nodes try again.
	Attempt int
}

// Identity binds a sealed key to its bundle.
func (b *Bundle) Identity() string { return b.LeafFingerprint + " " + b.KeyFingerprint }

// Node is what an agent last reported about itself.
type Node struct {
	Node            string
	Address         string
	InstalledBundle int64  // 0: none yet
	Served          string // the leaf its own verification saw served
	State           string
	Result          string
	Message         string
	Version         string
	Heartbeat       time.Time
	HeartbeatEvery  time.Duration
	Changed         time.Time
}

// Node states.
const (
	NodeIdle       = "idle"
	NodeWaiting    = "waiting for the lock"
	NodeRestarting = "restarting"
	NodeRolledBack = "rolled back"
	NodeFailed     = "failed"
)

// Store is the rollout state in the cluster's own PostgreSQL, in a schema
// of mmtls's own ("mmtls"); it never touches Mattermost's tables. Each call
// opens a connection with a timeout and closes it: callers are few and
// infrequent. Safe for concurrent use.
type Store struct {
	dsn string
	log *slog.Logger
}

// Open returns a store for dsn (a PostgreSQL URL or key=value DSN, as
// Mattermost's SqlSettings.DataSource holds it). Nothing is connected yet.
func Open(dsn string, log *slog.Logger) (*Store, error) {
	if strings.HasPrefix(strings.ToLower(dsn), "mysql") || strings.Contains(dsn, "@tcp(") {
		return nil, ErrMySQL
	}
	if dsn == "" {
		return nil, errors.New("no cluster database: set [cluster] dsn or --dsn, or run where Mattermost's config names its database")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Store{dsn: NormalizeDSN(dsn), log: log}, nil
}

// Redacted is the DSN without its password, for messages.
func (s *Store) Redacted() string { return Redact(s.dsn) }

// DSN is the store's data source name (with its password: not for logs).
func (s *Store) DSN() string { return s.dsn }

// Redact removes the password from a DSN.
func Redact(dsn string) string {
	if u, err := url.Parse(dsn); err == nil && u.User != nil {
		if _, has := u.User.Password(); has {
			u.User = url.UserPassword(u.User.Username(), "xxxxx")
		}
		return u.String()
	}
	var out []string
	for _, f := range strings.Fields(dsn) {
		if strings.HasPrefix(f, "password=") {
			f = "password=xxxxx"
		}
		out = append(out, f)
	}
	return strings.Join(out, " ")
}

// NormalizeDSN drops the lib/pq-only parameters Mattermost DSNs may carry,
// which pgx would otherwise send to the server as settings.
func NormalizeDSN(dsn string) string { return mmconfig.CleanDSN(dsn) }

// Connect opens a connection, bounded by ctx and connectTimeout whatever
// the driver does before it looks at ctx.
func Connect(ctx context.Context, dsn string) (*pgx.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	type result struct {
		c   *pgx.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := pgx.Connect(ctx, dsn)
		ch <- result{c, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("connect to the cluster database: %w", r.err)
		}
		return r.c, nil
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.c != nil {
				r.c.Close(context.Background())
			}
		}()
		return nil, fmt.Errorf("connect to the cluster database: %w", ctx.Err())
	}
}

// with runs f on a fresh connection, within queryTimeout.
func (s *Store) with(ctx context.Context, f func(ctx context.Context, c *pgx.Conn) error) error {
	ctx, cancel := context.WithTimeout(ctx, queryTimeout)
	defer cancel()
	c, err := Connect(ctx, s.dsn)
	if err != nil {
		return err
	}
	defer c.Close(context.Background())
	return f(ctx, c)
}

// migrations are applied in order, each once, recorded in
// mmtls.migrations; the first command that needs the schema runs them, as
// the database user Mattermost uses (its database's owner: no superuser).
var migrations = []string{
	`CREATE TABLE mmtls.bundles (
		id bigserial PRIMARY KEY,
		chain_pem text NOT NULL,
		key_sealed bytea NOT NULL,
		key_id text NOT NULL,
		leaf_fingerprint text NOT NULL,
		key_fingerprint text NOT NULL,
		not_after timestamptz NOT NULL,
		published_by text NOT NULL,
		published_at timestamptz NOT NULL DEFAULT now(),
		state text NOT NULL DEFAULT 'rolling',
		halted_by text NOT NULL DEFAULT '',
		halt_reason text NOT NULL DEFAULT '',
		attempt int NOT NULL DEFAULT 1
	);
	CREATE TABLE mmtls.nodes (
		node text PRIMARY KEY,
		address text NOT NULL DEFAULT '',
		installed_bundle bigint NOT NULL DEFAULT 0,
		served_fingerprint text NOT NULL DEFAULT '',
		state text NOT NULL DEFAULT '',
		last_result text NOT NULL DEFAULT '',
		message text NOT NULL DEFAULT '',
		agent_version text NOT NULL DEFAULT '',
		heartbeat timestamptz NOT NULL DEFAULT now(),
		heartbeat_every_s int NOT NULL DEFAULT 600,
		changed_at timestamptz NOT NULL DEFAULT now()
	)`,
}

// The PostgreSQL advisory lock keys of mmtls ("mmtls" and a number), in
// one place so that they never collide.
const (
	// RestartLockKey: every agent of a cluster holds it around its restart.
	RestartLockKey int64 = 0x6d6d746c7301
	// migrateLock serialises migrations across processes.
	migrateLock int64 = 0x6d6d746c7302
	// OrderLockKey: the balancer hosts hold it around an ACME order and its
	// publication.
	OrderLockKey int64 = 0x6d6d746c7303
)

// Migrate creates or updates mmtls's schema. It is idempotent and safe to
// run from several hosts at once.
func (s *Store) Migrate(ctx context.Context) error {
	return s.with(ctx, func(ctx context.Context, c *pgx.Conn) error {
		tx, err := c.Begin(ctx)
		if err != nil {
			return fmt.Errorf("migrate: %w", err)
		}
		defer tx.Rollback(ctx)
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, migrateLock); err != nil {
			return fmt.Errorf("migrate: %w", err)
		}
		if _, err := tx.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS mmtls;
			CREATE TABLE IF NOT EXISTS mmtls.migrations (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
			return fmt.Errorf("migrate: create schema mmtls (the database user needs CREATE on the database, as Mattermost's owner has): %w", err)
		}
		var have int
		if err := tx.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM mmtls.migrations`).Scan(&have); err != nil {
			return fmt.Errorf("migrate: %w", err)
		}
		for v := have + 1; v <= len(migrations); v++ {
			if _, err := tx.Exec(ctx, migrations[v-1]); err != nil {
				return fmt.Errorf("migrate to version %d: %w", v, err)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO mmtls.migrations (version) VALUES ($1)`, v); err != nil {
				return fmt.Errorf("migrate to version %d: %w", v, err)
			}
			s.log.Info("migrated the cluster database", "schema", "mmtls", "version", v)
		}
		return tx.Commit(ctx)
	})
}

// PublishResult says what Publish did.
type PublishResult struct {
	Bundle *Bundle
	// Unchanged: the pair was the current bundle already (and not halted,
	// or retry was not asked for); nothing was stored.
	Unchanged bool
	// Retried: the current, halted bundle was set rolling again.
	Retried bool
}

// Publish stores b as the current bundle and notifies the nodes, in one
// transaction: a failure stores nothing. Publishing the current pair again
// changes nothing, unless it halted and retry is set, which resumes it.
// Bundles beyond the newest ten are deleted.
func (s *Store) Publish(ctx context.Context, b *Bundle, retry bool) (*PublishResult, error) {
	res := &PublishResult{}
	err := s.with(ctx, func(ctx context.Context, c *pgx.Conn) error {
		tx, err := c.Begin(ctx)
		if err != nil {
			return err
		}
		defer tx.Rollback(ctx)
		cur, err := current(ctx, tx)
		if err != nil {
			return err
		}
		if cur != nil && cur.LeafFingerprint == b.LeafFingerprint && cur.KeyFingerprint == b.KeyFingerprint && cur.KeyID == b.KeyID {
			res.Bundle = cur
			if !retry || cur.State != StateHalted {
				res.Unchanged = true
				return nil
			}
			if _, err := tx.Exec(ctx, `UPDATE mmtls.bundles SET state = 'rolling', halted_by = '', halt_reason = '', attempt = attempt + 1 WHERE id = $1`, cur.ID); err != nil {
				return err
			}
			res.Retried = true
		} else {
			if err := tx.QueryRow(ctx, `INSERT INTO mmtls.bundles (chain_pem, key_sealed, key_id, leaf_fingerprint, key_fingerprint, not_after, published_by)
				VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id, published_at`,
				string(b.ChainPEM), b.KeySealed, b.KeyID, b.LeafFingerprint, b.KeyFingerprint, b.NotAfter, b.PublishedBy).Scan(&b.ID, &b.PublishedAt); err != nil {
				return err
			}
			b.State, b.Attempt = StateRolling, 1
			res.Bundle = b
			if _, err := tx.Exec(ctx, `DELETE FROM mmtls.bundles WHERE id NOT IN (SELECT id FROM mmtls.bundles ORDER BY id DESC LIMIT $1)`, keepBundles); err != nil {
				return err
			}
		}
		if _, err := tx.Exec(ctx, `SELECT pg_notify($1, $2)`, Channel, fmt.Sprint(res.Bundle.ID)); err != nil {
			return err
		}
		return tx.Commit(ctx)
	})
	if err != nil {
		return nil, fmt.Errorf("publish to the cluster database: %w", err)
	}
	if res.Retried {
		res.Bundle, err = s.Current(ctx)
	}
	return res, err
}

const bundleColumns = `id, chain_pem, key_sealed, key_id, leaf_fingerprint, key_fingerprint, not_after, published_by, published_at, state, halted_by, halt_reason, attempt`

func scanBundle(row pgx.Row) (*Bundle, error) {
	var b Bundle
	var chain string
	err := row.Scan(&b.ID, &chain, &b.KeySealed, &b.KeyID, &b.LeafFingerprint, &b.KeyFingerprint, &b.NotAfter, &b.PublishedBy, &b.PublishedAt,
		&b.State, &b.HaltedBy, &b.HaltReason, &b.Attempt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	b.ChainPEM = []byte(chain)
	return &b, nil
}

func current(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}) (*Bundle, error) {
	b, err := scanBundle(q.QueryRow(ctx, `SELECT `+bundleColumns+` FROM mmtls.bundles ORDER BY id DESC LIMIT 1`))
	if noSchema(err) {
		return nil, nil // nothing was ever published
	}
	return b, err
}

// noSchema reports an error saying mmtls's tables do not exist yet.
func noSchema(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "42P01" || pe.Code == "3F000") // undefined_table, invalid_schema_name
}

// Current returns the newest bundle, or nil when none was published.
func (s *Store) Current(ctx context.Context) (*Bundle, error) {
	var b *Bundle
	err := s.with(ctx, func(ctx context.Context, c *pgx.Conn) error {
		var err error
		b, err = current(ctx, c)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("read the current bundle: %w", err)
	}
	return b, nil
}

// State returns a bundle's state ("" when it is gone).
func (s *Store) State(ctx context.Context, id int64) (string, error) {
	var st string
	err := s.with(ctx, func(ctx context.Context, c *pgx.Conn) error {
		err := c.QueryRow(ctx, `SELECT state FROM mmtls.bundles WHERE id = $1`, id).Scan(&st)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		return err
	})
	return st, err
}

// Halt marks a rolling bundle halted by node, with the reason. The first
// node to fail wins; a bundle halted already keeps its first reason.
func (s *Store) Halt(ctx context.Context, id int64, node, reason string) error {
	return s.with(ctx, func(ctx context.Context, c *pgx.Conn) error {
		_, err := c.Exec(ctx, `UPDATE mmtls.bundles SET state = 'halted', halted_by = $2, halt_reason = $3 WHERE id = $1 AND state = 'rolling'`,
			id, node, reason)
		if err == nil {
			_, err = c.Exec(ctx, `SELECT pg_notify($1, $2)`, Channel, fmt.Sprint(id))
		}
		return err
	})
}

// Complete marks a rolling bundle complete if every node with a live
// heartbeat has installed it, and reports whether it is complete now.
func (s *Store) Complete(ctx context.Context, id int64) (bool, error) {
	var done bool
	err := s.with(ctx, func(ctx context.Context, c *pgx.Conn) error {
		tag, err := c.Exec(ctx, `UPDATE mmtls.bundles SET state = 'complete' WHERE id = $1 AND state = 'rolling' AND NOT EXISTS (
			SELECT 1 FROM mmtls.nodes WHERE installed_bundle <> $1 AND heartbeat > now() - 3 * heartbeat_every_s * interval '1 second')`, id)
		if err != nil {
			return err
		}
		done = tag.RowsAffected() == 1
		if done {
			_, err = c.Exec(ctx, `SELECT pg_notify($1, $2)`, Channel, fmt.Sprint(id))
		}
		return err
	})
	return done, err
}

// Report records a node's state and heartbeat.
func (s *Store) Report(ctx context.Context, n Node) error {
	return s.with(ctx, func(ctx context.Context, c *pgx.Conn) error {
		_, err := c.Exec(ctx, `INSERT INTO mmtls.nodes AS n (node, address, installed_bundle, served_fingerprint, state, last_result, message, agent_version, heartbeat, heartbeat_every_s, changed_at)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now(), $9, now())
			ON CONFLICT (node) DO UPDATE SET address = $2, installed_bundle = $3, served_fingerprint = $4, state = $5, last_result = $6, message = $7,
				agent_version = $8, heartbeat = now(), heartbeat_every_s = $9,
				changed_at = CASE WHEN n.state IS DISTINCT FROM $5 OR n.installed_bundle IS DISTINCT FROM $3 THEN now() ELSE n.changed_at END`,
			n.Node, n.Address, n.InstalledBundle, n.Served, n.State, n.Result, n.Message, n.Version, int(n.HeartbeatEvery/time.Second))
		// No NOTIFY: followers care about bundles, not about each other's
		// heartbeats; publish --wait and status read the table.
		return err
	})
}

// Nodes returns every node's last report, by name.
func (s *Store) Nodes(ctx context.Context) ([]Node, error) {
	var out []Node
	err := s.with(ctx, func(ctx context.Context, c *pgx.Conn) error {
		rows, err := c.Query(ctx, `SELECT node, address, installed_bundle, served_fingerprint, state, last_result, message, agent_version, heartbeat, heartbeat_every_s, changed_at
			FROM mmtls.nodes ORDER BY node`)
		if noSchema(err) {
			return nil
		}
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var n Node
			var every int
			if err := rows.Scan(&n.Node, &n.Address, &n.InstalledBundle, &n.Served, &n.State, &n.Result, &n.Message, &n.Version, &n.Heartbeat, &every, &n.Changed); err != nil {
				return err
			}
			n.HeartbeatEvery = time.Duration(every) * time.Second
			out = append(out, n)
		}
		return rows.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("read the nodes: %w", err)
	}
	return out, nil
}

// Listen delivers a signal on ch at every notification on Channel, and
// once at each (re)connection (a notification may have been missed while
// disconnected). It reconnects with backoff until ctx ends, logging a
// change of state once.
func (s *Store) Listen(ctx context.Context, ch chan<- struct{}) {
	signal := func() {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
	backoff := time.Second
	down := false
	for ctx.Err() == nil {
		err := s.listenOnce(ctx, func() {
			if down {
				s.log.Info("cluster database reachable again; listening for bundles")
				down = false
			}
			backoff = time.Second
			signal()
		}, signal)
		if ctx.Err() != nil {
			return
		}
		if !down {
			s.log.Warn("lost the cluster database; retrying with backoff", "err", err)
			down = true
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(backoff*2, time.Minute)
	}
}

func (s *Store) listenOnce(ctx context.Context, connected, notified func()) error {
	c, err := Connect(ctx, s.dsn)
	if err != nil {
		return err
	}
	defer c.Close(context.Background())
	if _, err := c.Exec(ctx, `LISTEN `+Channel); err != nil {
		return err
	}
	connected()
	for {
		if _, err := c.WaitForNotification(ctx); err != nil {
			return err
		}
		notified()
	}
}
