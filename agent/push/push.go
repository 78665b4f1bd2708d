package push

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/mmtls/mmtls/agent/clock"
	"github.com/mmtls/mmtls/certs"
	"github.com/mmtls/mmtls/mmconfig"
)

// maxConfigSize bounds config.json reads; real ones are tens of KiB.
const maxConfigSize = 16 << 20

// Pusher runs pushes. Its fields are its dependencies; the zero value uses
// the real clock, the real systemd unit directories and discards logs. A
// Pusher is safe for concurrent use: the state-directory lock serialises
// pushes, across processes too.
type Pusher struct {
	// Logger receives progress and warnings. Nil discards.
	Logger *slog.Logger
	// Clock is what certificates are validated against and what names
	// backups and journals. Nil means the system clock. Timings are real
	// elapsed time whatever the clock.
	Clock clock.Clock
	// UnitDirs is where the Mattermost service's unit is looked up (and
	// the bind drop-in written, in the first). Nil means systemd's own
	// directories.
	UnitDirs []string
	// Restarter restarts Mattermost. Nil means systemctl for the options'
	// Service, or their RestartCommand.
	Restarter ServiceManager
	// Cluster, if not nil, is held from before each restart of Mattermost
	// until it is verified or rolled back, so nodes restart one at a time.
	Cluster RestartLock
	// Drainer, if not nil, takes this node out of its balancers' rotation
	// for each restart of Mattermost, inside the cluster lock.
	Drainer Drainer
}

// Drainer takes this node out of the balancers' rotation while Mattermost
// restarts, so that no new connection meets a stopping or starting server.
type Drainer interface {
	// Drain is called once the node has decided to restart Mattermost; it
	// returns once the balancers have seen the node draining, or it
	// stopped waiting.
	Drain(ctx context.Context)
	// Serving reports what the node serves: nil once a state (the new, or
	// the previous after a rollback) is verified; else why it does not.
	Serving(err error)
}

// restartWindow opens the window in which Mattermost may restart: the
// cluster lock, then the drain. Its end reports what the node serves then
// (nil: a verified state) and releases the lock.
func (p *Pusher) restartWindow(ctx context.Context) (end func(serving error), err error) {
	release, err := p.clusterLock(ctx)
	if err != nil {
		return nil, err
	}
	if p.Drainer != nil {
		p.Drainer.Drain(ctx)
	}
	return func(serving error) {
		if p.Drainer != nil {
			p.Drainer.Serving(serving)
		}
		release()
	}, nil
}

// serving reports, to a Drainer, whether the node serves what it should.
func (p *Pusher) serving(err error) {
	if p.Drainer != nil {
		p.Drainer.Serving(err)
	}
}

// servingAfter says whether the node serves a verified state after a
// restart window that ended with err: the new state, or the previous one
// after a rollback that verified it.
func servingAfter(err error, oldVerified bool) error {
	if err == nil || errors.Is(err, ErrRolledBack) && oldVerified {
		return nil
	}
	return err
}

// clusterLock acquires p.Cluster, if any.
func (p *Pusher) clusterLock(ctx context.Context) (func(), error) {
	if p.Cluster == nil {
		return func() {}, nil
	}
	release, err := p.Cluster.Acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("cluster restart lock (%s): %w", p.Cluster, err)
	}
	return release, nil
}

func (p *Pusher) log() *slog.Logger {
	if p.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return p.Logger
}

func (p *Pusher) now() time.Time { return clock.Or(p.Clock).Now() }

// RestartLock keeps the nodes of a cluster from restarting Mattermost at
// the same time: a renewal that lands on every node at once must not take
// them all down together.
type RestartLock interface {
	// Acquire blocks until this node may restart Mattermost. The returned
	// release must be called once the restart and its verification (or
	// rollback) are over. An error means the caller must not restart.
	Acquire(ctx context.Context) (release func(), err error)
	String() string
}

// Status is the overall outcome of a push that did not fail.
type Status string

// Statuses.
const (
	StatusPlanned   Status = "planned"   // --dry-run: nothing was changed
	StatusUnchanged Status = "unchanged" // everything was already in place
	StatusChanged   Status = "changed"   // files or config were written
	// StatusRestarted: files and config were in place, but Mattermost was
	// not serving them; it was restarted and now does.
	StatusRestarted Status = "restarted"
	// StatusRolledBack: a step after the install failed; the previous state
	// is in force again (the error says how far that was verified).
	StatusRolledBack Status = "rolled-back"
	// StatusFailed: the push failed; the error says what is on disk.
	StatusFailed Status = "failed"
)

// Result reports a push: what was planned and what was done.
type Result struct {
	Status      Status             `json:"status"`
	Certificate CertInfo           `json:"certificate"`
	SiteURL     string             `json:"site_url"`
	SiteOrigin  string             `json:"site_url_origin"`
	Files       []certs.FileResult `json:"files"`
	Owner       string             `json:"owner"`
	Mode        string             `json:"mode"`
	Config      ConfigResult       `json:"config"`
	BackupDir   string             `json:"backup_dir,omitempty"`
	Warnings    []certs.Warning    `json:"warnings,omitempty"`
	// BindPrivilege says what was done so Mattermost may bind a port
	// below 1024; empty when nothing was needed.
	BindPrivilege string `json:"bind_privilege,omitempty"`
	// Restart is what restarts Mattermost (the unit or the command), and
	// Verify what must then be seen; both empty with --no-restart.
	Restart   string `json:"restart,omitempty"`
	Verify    string `json:"verify,omitempty"`
	Restarted bool   `json:"restarted"`
	// Verified: Mattermost was seen serving the new leaf and answering its ping.
	Verified bool `json:"verified"`
	// Recovered says what was done about a push an earlier run left
	// half-way (killed, power loss); empty when there was none.
	Recovered string  `json:"recovered,omitempty"`
	Timings   Timings `json:"timings_ms"`
}

// Timings are the durations of a push's phases, in milliseconds. Restart
// and Verify are Mattermost's time; the rest is mmtls's own.
type Timings struct {
	Plan      float64 `json:"plan"`
	Install   float64 `json:"install"`
	Configure float64 `json:"configure"`
	Restart   float64 `json:"restart"`
	Verify    float64 `json:"verify"`
	Total     float64 `json:"total"`
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// CertInfo describes the leaf being pushed.
type CertInfo struct {
	Subject        string    `json:"subject"`
	Issuer         string    `json:"issuer"`
	DNSNames       []string  `json:"dns_names"`
	NotAfter       time.Time `json:"not_after"`
	Fingerprint    string    `json:"fingerprint"`
	KeyFingerprint string    `json:"key_fingerprint"`
	ChainLength    int       `json:"chain_length"`
}

// ConfigResult describes the Mattermost config edit.
type ConfigResult struct {
	Path    string            `json:"path"`
	Origin  string            `json:"origin"`
	Changes []mmconfig.Change `json:"changes"`
}

// Push validates the pair, plans the install and the config edit and,
// unless DryRun, carries them out: install, configure, bind privilege,
// restart, verify; and if any step after the install fails, puts the
// previous pair and config back, restarts and verifies that. Input that is
// refused leaves everything as it was (ErrRefused); a failure that was
// rolled back returns ErrRolledBack, one whose rollback failed
// ErrRollbackFailed. The Result is returned whenever planning succeeded,
// with the error if any.
func (p *Pusher) Push(ctx context.Context, o Options) (*Result, error) {
	start := time.Now()
	if err := o.Validate(); err != nil {
		return nil, err
	}
	o = o.WithDefaults()
	log := p.log()
	recovered := ""
	if !o.DryRun && os.Geteuid() != 0 {
		return nil, refused(fmt.Errorf("mmtls push must run as root (sudo mmtls push ...): it installs files owned by %s, edits Mattermost's config and restarts it; --dry-run works as any user", o.Owner))
	}
	if !o.DryRun {
		if err := stateDir(o.StateDir); err != nil {
			return nil, err
		}
		lock, err := acquireLock(ctx, filepath.Join(o.StateDir, "lock"), o.LockTimeout, log)
		if err != nil {
			return nil, err
		}
		defer lock.release()
		if recovered, err = p.recoverInterrupted(ctx, o); err != nil {
			return nil, err
		}
	}
	pl, err := p.prepare(ctx, o)
	if err != nil {
		return nil, err
	}
	res := pl.res
	res.Recovered = recovered
	res.Timings.Plan = ms(time.Since(start))
	defer func() { res.Timings.Total = ms(time.Since(start)) }()
	p.describePlan(pl)
	for _, w := range res.Warnings {
		log.Warn(w.Message, "code", w.Code)
	}
	switch {
	case o.DryRun:
		res.Status = StatusPlanned
		return res, nil
	case !pl.install.Changed && len(res.Config.Changes) == 0 && bytes.Equal(pl.dropInOld, pl.dropInNew):
		if err := p.noop(ctx, pl); err != nil {
			res.Status = StatusFailed
			return res, err
		}
		return res, nil
	}
	if err := p.apply(ctx, pl); err != nil {
		res.Status = StatusFailed
		if errors.Is(err, ErrRolledBack) {
			res.Status = StatusRolledBack
		}
		return res, err
	}
	res.Status = StatusChanged
	return res, nil
}

// describePlan fills in what the push restarts, verifies and sets up for
// the bind privilege, so that --dry-run shows every step; with --no-restart
// it warns when Mattermost would lack the privilege at its next restart.
func (p *Pusher) describePlan(pl *plan) {
	o, res := pl.o, pl.res
	listen := pl.tls.ListenAddress
	if listen == "" {
		listen = mmconfig.DefaultListenAddress
	}
	bind := p.planBind(o, listen, pl.uid, pl.env.Unit)
	if o.NoRestart {
		if bind.port != 0 {
			res.Warnings = append(res.Warnings, certs.Warning{Code: "bind-privilege",
				Message: fmt.Sprintf("--no-restart sets up nothing for Mattermost to bind port %d at its next restart; a push without --no-restart would %s (or set it up yourself)", bind.port, bind)})
		}
		return
	}
	res.Restart = p.manager(o).String()
	if p.Cluster != nil {
		res.Restart += ", holding the cluster restart lock (" + p.Cluster.String() + ")"
	}
	res.Verify = pl.newExp.Describe()
	if o.DryRun && bind.port != 0 {
		res.BindPrivilege = "would " + bind.String()
	}
}

// noop handles a push whose files and config are already in place: unless
// NoRestart, it checks that Mattermost serves them, and restarts it if not
// (after a --no-restart push, say).
func (p *Pusher) noop(ctx context.Context, pl *plan) error {
	res, log := pl.res, p.log()
	res.Status = StatusUnchanged
	if pl.o.NoRestart {
		log.Info("nothing to do: certificate, key and config already in place", "fingerprint", res.Certificate.Fingerprint)
		return nil
	}
	err := p.verifier(pl.o).Check(ctx, pl.newExp)
	if err == nil {
		res.Verified = true
		p.serving(nil)
		log.Info("nothing to do: mattermost already serves this certificate", "fingerprint", res.Certificate.Fingerprint)
		return nil
	}
	log.Info("certificate and config are in place but mattermost does not serve them; restarting", "err", err)
	p.serving(fmt.Errorf("mattermost does not serve the installed certificate: %w", err))
	end, err := p.restartWindow(ctx)
	if err != nil {
		return err
	}
	ctx = context.WithoutCancel(ctx) // see apply
	err = p.restartAndVerify(ctx, pl.o, pl.newExp, res)
	end(err)
	if err != nil {
		return fmt.Errorf("%w (the files and config on disk were already in place and are unchanged)", err)
	}
	res.Status = StatusRestarted
	return nil
}

// apply runs the steps that change things, journaled, and rolls back when a
// step after the install fails.
func (p *Pusher) apply(ctx context.Context, pl *plan) error {
	o, res, log := pl.o, pl.res, p.log()
	backupDir, err := newBackupDir(o.StateDir, p.now())
	if err != nil {
		return err
	}
	res.BackupDir = backupDir
	j := &journal{
		Version: journalVersion, PID: os.Getpid(), Started: p.now().UTC(), Options: o,
		DestDir: o.DestDir, BackupDir: backupDir, Files: pl.install.Files,
		ConfigPath: pl.loc.Path, ConfigDropIn: pl.dropIn != "", ConfigAbsent: pl.dropIn != "" && pl.dropInOld == nil, ConfigLocal: pl.localMode != "",
		New: pl.newExp, Old: pl.oldExp, dir: o.StateDir,
	}
	if pl.cfgState != nil {
		j.ConfigAttrs = pl.cfgState.FileAttrs
	}
	if !o.NoRestart {
		// Only a state that served before can be verified after a rollback.
		j.OldServing = p.verifier(o).Check(ctx, pl.oldExp) == nil
	}
	if err := j.save(stepInstalling); err != nil {
		return err
	}

	t := time.Now()
	req := pl.installRequest(false, backupDir)
	req.Logger = log
	inst, err := certs.Install(ctx, req)
	if err != nil {
		// Install puts back what it renamed before failing.
		return errors.Join(err, j.finish())
	}
	res.Files, j.Files = inst.Files, inst.Files
	res.Timings.Install = ms(time.Since(t))
	if inst.Changed {
		log.Info("installed certificate and key", "dir", o.DestDir, "fingerprint", res.Certificate.Fingerprint)
	}

	t = time.Now()
	j.ConfigBackup = filepath.Join(backupDir, "config.json")
	write := p.writeConfig
	switch {
	case pl.dropIn != "":
		j.ConfigBackup, write = filepath.Join(backupDir, mmconfig.TLSDropInName), p.writeDropIn
	case pl.localMode != "":
		write = p.writeLocalMode
		if len(res.Config.Changes) == 0 {
			j.ConfigBackup = "" // nothing to patch back
		}
	}
	if err := j.save(stepConfiguring); err != nil {
		return p.rollback(ctx, j, err, false)
	}
	changes, err := write(pl, backupDir)
	if err != nil {
		return p.rollback(ctx, j, err, false)
	}
	res.Config.Changes = changes
	res.Timings.Configure = ms(time.Since(t))
	if len(changes) > 0 {
		log.Info("updated mattermost config", "path", pl.loc.Path, "changes", len(changes))
	}
	if err := j.save(stepRestarting); err != nil {
		return p.rollback(ctx, j, err, false)
	}
	if o.NoRestart {
		log.Info("installed without restarting mattermost (--no-restart); it serves the new certificate after its next restart")
		return j.finish()
	}

	end, err := p.restartWindow(ctx)
	if err != nil {
		return p.rollback(ctx, j, err, false)
	}
	// The window ends after the verification, or the rollback's; until a
	// restart fails, the node serves a verified state (the previous one).
	var served error
	defer func() { end(served) }()
	// From the restart on, the push runs to its end, verified or rolled
	// back, even if ctx is cancelled (SIGTERM): each step has its own
	// timeout, and a half-done restart helps no one.
	ctx = context.WithoutCancel(ctx)
	listen := pl.tls.ListenAddress
	if listen == "" {
		listen = mmconfig.DefaultListenAddress
	}
	note, undoBind, warns, err := p.bindPrivilege(ctx, o, listen, pl.uid, pl.env.Unit)
	for _, w := range warns {
		log.Warn(w)
		res.Warnings = append(res.Warnings, certs.Warning{Code: "bind-privilege", Message: w})
	}
	if err != nil {
		return p.rollback(ctx, j, err, false)
	}
	res.BindPrivilege = note
	if err := p.restartAndVerify(ctx, o, pl.newExp, res); err != nil {
		if undoBind != nil {
			// The capability was given for the new state; the old one
			// did without it.
			if uerr := undoBind(); uerr != nil {
				log.Warn("could not take back the bind capability", "err", uerr)
			}
		}
		rb := p.rollback(ctx, j, err, true)
		served = servingAfter(rb, j.OldServing)
		return rb
	}
	return j.finish()
}

// restartAndVerify restarts Mattermost and waits until it serves exp.
func (p *Pusher) restartAndVerify(ctx context.Context, o Options, exp Expectation, res *Result) error {
	mgr := p.manager(o)
	t := time.Now()
	p.log().Info("restarting mattermost", "with", mgr.String())
	if err := mgr.Restart(ctx); err != nil {
		return fmt.Errorf("restart mattermost: %w", err)
	}
	if res != nil {
		res.Restarted = true
		res.Timings.Restart = ms(time.Since(t))
	}
	t = time.Now()
	if err := p.verifier(o).Wait(ctx, exp); err != nil {
		return err
	}
	if res != nil {
		res.Verified = true
		res.Timings.Verify = ms(time.Since(t))
	}
	return nil
}

func (p *Pusher) manager(o Options) ServiceManager {
	switch {
	case p.Restarter != nil:
		return p.Restarter
	case o.RestartCommand != "":
		return &ShellCommand{Line: o.RestartCommand, Timeout: o.RestartTimeout}
	}
	return &Systemd{Unit: o.Service, Timeout: o.RestartTimeout, Logger: p.Logger}
}

func (p *Pusher) verifier(o Options) *Verifier {
	return &Verifier{Timeout: o.VerifyTimeout, Logger: p.Logger, Clock: p.Clock}
}

var errConfigChanged = errors.New("config changed while being edited")

// maxConfigRetries bounds how often the edit is applied again when
// config.json changes under it. An admin saving in the System Console
// changes it once; a file that changes five times in a row within
// milliseconds is being rewritten in a loop, and the push gives up.
const maxConfigRetries = 5

// writeDropIn writes the drop-in that enrols a node whose config is in the
// database, after backing up the one there (the layered configuration goes
// to the backup too, as config.json, so that it is a whole state), and
// has systemd reload it. The database is not written.
func (p *Pusher) writeDropIn(pl *plan, backupDir string) ([]mmconfig.Change, error) {
	if err := os.WriteFile(filepath.Join(backupDir, "config.json"), pl.cfgDoc, 0o600); err != nil {
		return nil, fmt.Errorf("back up mattermost config: %w", err)
	}
	if pl.dropInOld != nil {
		if err := os.WriteFile(filepath.Join(backupDir, mmconfig.TLSDropInName), pl.dropInOld, 0o600); err != nil {
			return nil, fmt.Errorf("back up drop-in: %w", err)
		}
	}
	if bytes.Equal(pl.dropInOld, pl.dropInNew) {
		return nil, nil
	}
	dir := filepath.Dir(pl.dropIn)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("drop-in directory: %w", err)
	}
	d, err := certs.OpenDir(dir)
	if err != nil {
		return nil, fmt.Errorf("drop-in: %w", err)
	}
	defer d.Close()
	if err := d.WriteFile(mmconfig.TLSDropInName, pl.dropInNew, certs.FileAttrs{UID: 0, GID: 0, Mode: 0o644}); err != nil {
		return nil, fmt.Errorf("write drop-in: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), pl.o.RestartTimeout)
	defer cancel()
	if err := SystemctlDaemonReload(ctx); err != nil {
		return nil, err
	}
	return pl.res.Config.Changes, nil
}

// writeLocalMode sets the owned settings through Mattermost's local-mode
// API when they change (the first push; a renewal sets nothing), after
// backing up the configuration the node runs with.
func (p *Pusher) writeLocalMode(pl *plan, backupDir string) ([]mmconfig.Change, error) {
	if err := os.WriteFile(filepath.Join(backupDir, "config.json"), pl.cfgDoc, 0o600); err != nil {
		return nil, fmt.Errorf("back up mattermost config: %w", err)
	}
	if len(pl.res.Config.Changes) == 0 {
		return nil, nil
	}
	if err := mmconfig.PatchLocal(context.Background(), pl.localMode, pl.tls.Settings()); err != nil {
		return nil, err
	}
	return pl.res.Config.Changes, nil
}

// writeConfig applies the edit to config.json, keeping its owner, mode and
// extended attributes. If the file changes between read and rename (a
// System Console save), the edit is applied again to the new content.
func (p *Pusher) writeConfig(pl *plan, backupDir string) ([]mmconfig.Change, error) {
	path := pl.loc.Path
	d, err := certs.OpenDir(filepath.Dir(path))
	if err != nil {
		return nil, fmt.Errorf("mattermost config: %w", err)
	}
	defer d.Close()
	name := filepath.Base(path)
	backedUp := false
	for attempt := 0; ; attempt++ {
		doc, st, err := d.ReadFile(name, maxConfigSize)
		if err != nil {
			return nil, fmt.Errorf("mattermost config: %w", err)
		}
		if !backedUp {
			// Changed or not, the backup holds the whole previous state.
			if err := os.WriteFile(filepath.Join(backupDir, "config.json"), doc, 0o600); err != nil {
				return nil, fmt.Errorf("back up mattermost config: %w", err)
			}
			backedUp = true
		}
		newDoc, changes, err := mmconfig.Edit(doc, pl.tls.Settings())
		if err != nil {
			return nil, fmt.Errorf("mattermost config %q: %w", path, err)
		}
		if len(changes) == 0 {
			return nil, nil
		}
		if err := mmconfig.Check(doc, newDoc, nil); err != nil {
			return nil, fmt.Errorf("mattermost config %q after the edit: %w", path, err)
		}
		err = d.ReplaceFile(name, newDoc, st.FileAttrs, func() error {
			cur, _, err := d.ReadFile(name, maxConfigSize)
			if err != nil {
				return err
			}
			if !bytes.Equal(cur, doc) {
				return errConfigChanged
			}
			return nil
		})
		if errors.Is(err, errConfigChanged) && attempt < maxConfigRetries {
			p.log().Info("mattermost config changed while being edited; applying the edit again", "path", path)
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("write mattermost config: %w", err)
		}
		return changes, nil
	}
}
