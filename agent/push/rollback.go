package push

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/mmtls/mmtls/certs"
	"github.com/mmtls/mmtls/mmconfig"
)

// rollbackSlack is the rollback's time beyond a restart and a
// verification: restoring files and config and writing the journal, which
// take milliseconds unless the disk is failing.
const rollbackSlack = time.Minute

// rollback puts back the previous pair and config recorded in j and, if
// restart, restarts Mattermost and verifies the previous state. It returns
// an error wrapping ErrRolledBack (with cause) or ErrRollbackFailed (saying
// what is on disk). The journal is removed only after a rollback that
// worked, so a failed one is tried again by the next run.
func (p *Pusher) rollback(ctx context.Context, j *journal, cause error, restart bool) error {
	log := p.log()
	log.Warn("rolling back", "cause", cause)
	// The rollback must run to the end even if the push's context was
	// cancelled (SIGTERM mid-push): give it its own deadline.
	o := j.Options
	budget := o.RestartTimeout + o.VerifyTimeout + rollbackSlack
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), budget)
	defer cancel()

	var errs []error
	if err := j.save(stepRollingBack); err != nil {
		errs = append(errs, err)
	}
	if err := certs.Restore(rctx, j.DestDir, j.filesToRestore()); err != nil {
		errs = append(errs, err)
	}
	if err := restoreConfig(rctx, j); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return &outcome{kind: ErrRollbackFailed, err: fmt.Errorf("%w; rollback failed: %w; on disk now: %s may hold the new or the previous pair, "+
			"%s the new or the previous config; the previous files are in %s", cause, err, j.DestDir, j.ConfigPath, j.BackupDir)}
	}
	log.Info("previous certificate, key and config are back on disk", "dir", j.DestDir, "config", j.ConfigPath)

	note := ""
	if restart && !o.NoRestart {
		if err := p.manager(o).Restart(rctx); err != nil {
			return &outcome{kind: ErrRollbackFailed, err: fmt.Errorf("%w; rollback: the previous certificate, key and config are back on disk, "+
				"but restarting Mattermost failed: %w", cause, err)}
		}
		if j.OldServing {
			if err := p.verifier(o).Wait(rctx, j.Old); err != nil {
				return &outcome{kind: ErrRollbackFailed, err: fmt.Errorf("%w; rollback: the previous certificate, key and config are back on disk "+
					"and Mattermost was restarted, but it does not serve the previous state: %w", cause, err)}
			}
			note = "; verified: Mattermost serves " + j.Old.String() + " again"
		} else {
			note = "; Mattermost was restarted but not verified: it was not answering before this push either"
		}
	}
	if err := j.finish(); err != nil {
		log.Warn("could not remove the journal", "err", err)
	}
	return &outcome{kind: ErrRolledBack, err: fmt.Errorf("%w; rolled back: the previous certificate and config are in force again%s", cause, note)}
}

// restoreConfig writes the config backup, if one was made, over the config;
// a drop-in that was not there before is removed, and systemd reloaded.
func restoreConfig(ctx context.Context, j *journal) error {
	if j.ConfigDropIn {
		return restoreDropIn(ctx, j)
	}
	if j.ConfigLocal {
		if j.ConfigBackup == "" {
			return nil
		}
		doc, err := os.ReadFile(j.ConfigBackup)
		if err != nil {
			return fmt.Errorf("read config backup: %w", err)
		}
		old, err := mmconfig.OwnedValues(doc)
		if err != nil {
			return fmt.Errorf("config backup: %w", err)
		}
		if err := ownedSocket(j.ConfigPath, j.Options.MattermostDir); err != nil {
			return fmt.Errorf("Mattermost's local-mode socket: %w", err)
		}
		return mmconfig.PatchLocal(ctx, j.ConfigPath, old)
	}
	if j.ConfigBackup == "" {
		return nil
	}
	data, err := os.ReadFile(j.ConfigBackup)
	if errors.Is(err, os.ErrNotExist) {
		return nil // the config was never written
	}
	if err != nil {
		return fmt.Errorf("read config backup: %w", err)
	}
	d, err := certs.OpenDir(filepath.Dir(j.ConfigPath))
	if err != nil {
		return fmt.Errorf("restore mattermost config: %w", err)
	}
	defer d.Close()
	name := filepath.Base(j.ConfigPath)
	attrs := j.ConfigAttrs
	if cur, st, err := d.ReadFile(name, maxConfigSize); err == nil {
		if bytes.Equal(cur, data) {
			return nil // never written (the write failed), or already put back
		}
		attrs = st.FileAttrs // Mattermost may have rewritten it since
	}
	if err := d.WriteFile(name, data, attrs); err != nil {
		return fmt.Errorf("restore mattermost config: %w", err)
	}
	return nil
}

// restoreDropIn puts the enrolment drop-in back as it was, or removes it,
// and has systemd reload.
func restoreDropIn(ctx context.Context, j *journal) error {
	d, err := certs.OpenDir(filepath.Dir(j.ConfigPath))
	if errors.Is(err, os.ErrNotExist) {
		return nil // never written
	}
	if err != nil {
		return fmt.Errorf("restore drop-in: %w", err)
	}
	defer d.Close()
	name := filepath.Base(j.ConfigPath)
	cur, _, err := d.ReadFile(name, maxConfigSize)
	switch {
	case j.ConfigAbsent && errors.Is(err, os.ErrNotExist):
		return nil // never written
	case j.ConfigAbsent:
		if err := d.Remove(name); err != nil {
			return fmt.Errorf("remove drop-in: %w", err)
		}
	default:
		old, rerr := os.ReadFile(j.ConfigBackup)
		if rerr != nil {
			return fmt.Errorf("read drop-in backup: %w", rerr)
		}
		if err == nil && bytes.Equal(cur, old) {
			return nil
		}
		if err := d.WriteFile(name, old, certs.FileAttrs{UID: 0, GID: 0, Mode: 0o644}); err != nil {
			return fmt.Errorf("restore drop-in: %w", err)
		}
	}
	return SystemctlDaemonReload(ctx)
}

// recoverInterrupted finishes or rolls back a push that an earlier run left half-way,
// as its journal says, and returns what it did ("" if there was nothing).
// Files were only partly replaced, or the config not yet written: roll
// back. Files and config were in place: restart and verify, and roll back
// if that fails. Mattermost is restarted and verified the way the current
// run o says (its restart command may have been what hung).
func (p *Pusher) recoverInterrupted(ctx context.Context, cur Options) (string, error) {
	j, err := loadJournal(cur.StateDir)
	if err != nil || j == nil {
		return "", err
	}
	env, err := mmconfig.LoadServiceEnv(cur.Service+".service", p.UnitDirs)
	if err != nil {
		return "", refused(fmt.Errorf("recover an interrupted push: read the %s service's environment: %w", cur.Service, err))
	}
	loc, err := mmconfig.Locate(cur.MMConfig, env, cur.MattermostDir)
	if err != nil {
		return "", refused(fmt.Errorf("recover an interrupted push: %w", err))
	}
	switch {
	case loc.DSN != "" && j.ConfigLocal:
		loc.Path = j.ConfigPath // the socket, read from the database at the push
	case loc.DSN != "":
		loc.Path = mmconfig.TLSDropInPath(p.UnitDirs, cur.Service)
	}
	if err := j.matches(cur.DestDir, loc.Path); err != nil {
		return "", err
	}
	o := j.Options
	o.Service, o.RestartCommand, o.NoRestart = cur.Service, cur.RestartCommand, cur.NoRestart
	o.RestartTimeout, o.VerifyTimeout = cur.RestartTimeout, cur.VerifyTimeout
	j.Options = o
	what := fmt.Sprintf("a push interrupted at step %q (pid %d, started %s)", j.Step, j.PID, j.Started.Format(time.RFC3339))
	p.log().Warn("recovering an interrupted push", "step", j.Step, "pid", j.PID, "started", j.Started)
	interrupted := errors.New(what)
	switch j.Step {
	case stepRestarting:
		if o.NoRestart {
			return what + ": its files and config are in place; Mattermost was not restarted (--no-restart)", j.finish()
		}
		end, err := p.restartWindow(ctx)
		if err != nil {
			return "", err
		}
		var served error
		defer func() { end(served) }()
		ctx = context.WithoutCancel(ctx) // see apply
		if err := p.restartAndVerify(ctx, o, j.New, nil); err != nil {
			rb := p.rollback(ctx, j, fmt.Errorf("completing %s: %w", what, err), true)
			served = servingAfter(rb, j.OldServing)
			if errors.Is(rb, ErrRolledBack) {
				return rb.Error(), nil
			}
			return "", rb
		}
		return what + " was completed: Mattermost restarted and serves " + j.New.String(), j.finish()
	default:
		rb := p.rollback(ctx, j, interrupted, j.Step == stepRollingBack)
		if errors.Is(rb, ErrRolledBack) {
			return rb.Error(), nil
		}
		return "", rb
	}
}
