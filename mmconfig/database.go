package mmconfig

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// ErrMySQL refuses a MySQL database store: mmtls reads PostgreSQL only.
var ErrMySQL = errors.New("Mattermost's config is in a MySQL database, which mmtls does not read; move the config to config.json or PostgreSQL")

// databaseTimeout bounds reading the active configuration.
const databaseTimeout = 15 * time.Second

// databaseDriver returns "postgres" or "mysql" for a database store DSN,
// "" for a file path, as Mattermost's config.NewStoreFromDSN decides.
func databaseDriver(s string) string {
	l := strings.ToLower(s)
	switch {
	case strings.HasPrefix(l, "postgres://"), strings.HasPrefix(l, "postgresql://"):
		return "postgres"
	case strings.HasPrefix(l, "mysql://"):
		return "mysql"
	}
	return ""
}

// ReadDatabase reads the active configuration of Mattermost's database
// store, in a read-only transaction bounded by a timeout: the JSON document
// Mattermost loads, before environment overrides.
func ReadDatabase(ctx context.Context, dsn string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, databaseTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, CleanDSN(dsn))
	if err != nil {
		return nil, fmt.Errorf("read Mattermost's config from the database: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, fmt.Errorf("read Mattermost's config from the database: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	var doc string
	err = tx.QueryRow(ctx, `SELECT value FROM configurations WHERE active`).Scan(&doc)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, errors.New("read Mattermost's config from the database: no active configuration (start Mattermost once with MM_CONFIG set, or migrate config.json with mattermost config migrate)")
	}
	if err != nil {
		return nil, fmt.Errorf("read Mattermost's config from the database: %w", err)
	}
	return []byte(doc), nil
}

// CleanDSN drops the lib/pq options Mattermost's DSNs may carry, which
// PostgreSQL would take for unknown run-time parameters (pgx sends them).
func CleanDSN(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil || u.RawQuery == "" {
		return dsn
	}
	q := u.Query()
	for _, k := range []string{"binary_parameters", "disable_prepared_binary_result"} {
		q.Del(k)
	}
	u.RawQuery = q.Encode()
	return u.String()
}

// RedactDSN hides the password of a DSN, for messages.
func RedactDSN(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil {
		return "(a DSN)"
	}
	return u.Redacted()
}

// TLSDropInName is the drop-in of Mattermost's unit that enrols a node whose
// config is in the database: the owned settings as environment overrides,
// which win over the shared configuration on this node alone.
const TLSDropInName = "50-mmtls-tls.conf"

// TLSDropInPath is where the drop-in of service goes, in the first (the
// administrator's) of unitDirs.
func TLSDropInPath(unitDirs []string, service string) string {
	if unitDirs == nil {
		unitDirs = DefaultUnitDirs()
	}
	return filepath.Join(unitDirs[0], service+".service.d", TLSDropInName)
}

// EnvName is the environment variable that overrides s, as Mattermost
// names it.
func (s Setting) EnvName() string {
	return "MM_" + strings.ToUpper(s.Section) + "_" + strings.ToUpper(s.Key)
}

// envValue is s's value as an environment variable carries it.
func (s Setting) envValue() string { return fmt.Sprint(s.Value) }

// RenderDropIn writes the drop-in that sets settings as environment
// overrides. A value systemd would rewrite (a % specifier, a quote, a
// backslash, a line break) is refused.
func RenderDropIn(settings []Setting) ([]byte, error) {
	var b strings.Builder
	b.WriteString("# Written by mmtls: this node's TLS settings. Mattermost keeps its config in\n" +
		"# the database, shared by every node; these override it here only, and show\n" +
		"# as read-only in the System Console. To undo: remove this file, then\n" +
		"# systemctl daemon-reload and systemctl restart mattermost.\n[Service]\n")
	for _, s := range settings {
		v := s.envValue()
		if strings.ContainsAny(v, "%\"\\\n\r") {
			return nil, fmt.Errorf("%s %q: a %%, quote, backslash or line break cannot go into a systemd drop-in as it is", s.Name(), v)
		}
		fmt.Fprintf(&b, "Environment=\"%s=%s\"\n", s.EnvName(), v)
	}
	return []byte(b.String()), nil
}

// Layered returns doc with the service environment's overrides of the
// owned settings applied, as Mattermost applies MM_SECTION_KEY variables
// over its store: what this node runs with.
func Layered(doc []byte, env *ServiceEnv) ([]byte, error) {
	var over []Setting
	for _, s := range (TLS{SiteURL: "x"}).Settings() {
		v, ok := env.Override(s.Section, s.Key)
		if !ok {
			continue
		}
		var val any = v.Value
		if _, isBool := s.Value.(bool); isBool {
			b, err := strconv.ParseBool(v.Value)
			if err != nil {
				return nil, fmt.Errorf("%s=%q (%s): not a boolean", v.Name, v.Value, v.Source)
			}
			val = b
		}
		over = append(over, Setting{s.Section, s.Key, val})
	}
	out, _, err := Edit(doc, over)
	return out, err
}
