package push

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/mmtls/mmtls/certs"
	"github.com/mmtls/mmtls/mmconfig"
)

const journalName = "journal.json"

// journalVersion is the journal's format; a run refuses a journal of
// another version rather than guess what it means.
const journalVersion = 1

// step is how far a push got. The journal is rewritten (atomically, synced)
// before each step starts, so a push killed at any instant leaves a record
// of what may be half done.
type step string

const (
	stepInstalling  step = "installing"  // files may be partly replaced
	stepConfiguring step = "configuring" // files replaced; config may be written
	stepRestarting  step = "restarting"  // files and config in place
	stepRollingBack step = "rolling-back"
)

// journal records a push in progress in the state directory.
type journal struct {
	Version int       `json:"version"`
	PID     int       `json:"pid"`
	Started time.Time `json:"started"`
	Step    step      `json:"step"`
	Options Options   `json:"options"`

	DestDir   string             `json:"dest_dir"`
	BackupDir string             `json:"backup_dir"`
	Files     []certs.FileResult `json:"files"`

	ConfigPath   string          `json:"config_path"`
	ConfigBackup string          `json:"config_backup,omitempty"`
	ConfigAttrs  certs.FileAttrs `json:"config_attrs"`
	// ConfigDropIn: ConfigPath is the systemd drop-in that enrols a node
	// whose config is in the database (systemd reloads after it changes);
	// ConfigAbsent: it did not exist before, so a rollback removes it.
	ConfigDropIn bool `json:"config_drop_in,omitempty"`
	ConfigAbsent bool `json:"config_absent,omitempty"`
	// ConfigLocal: ConfigPath is Mattermost's local-mode socket; a
	// rollback patches back the owned values of the backup.
	ConfigLocal bool `json:"config_local,omitempty"`

	New        Expectation `json:"new"`
	Old        Expectation `json:"old"`
	OldServing bool        `json:"old_serving"`

	dir string
}

func (j *journal) save(s step) error {
	j.Step = s
	data, err := json.MarshalIndent(j, "", "  ")
	if err != nil {
		return err
	}
	d, err := certs.OpenDir(j.dir)
	if err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	defer d.Close()
	if err := d.WriteFile(journalName, data, certs.FileAttrs{UID: os.Geteuid(), GID: os.Getegid(), Mode: 0o600}); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	return nil
}

// finish removes the journal: the push is over, one way or the other.
func (j *journal) finish() error {
	if err := os.Remove(filepath.Join(j.dir, journalName)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("journal: %w", err)
	}
	return nil
}

// loadJournal returns the journal an interrupted push left, or nil.
func loadJournal(stateDir string) (*journal, error) {
	data, err := os.ReadFile(filepath.Join(stateDir, journalName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	j := &journal{dir: stateDir}
	if err := json.Unmarshal(data, j); err != nil {
		return nil, fmt.Errorf("journal %q is corrupt (%w); inspect it, then remove it to continue", filepath.Join(stateDir, journalName), err)
	}
	if err := j.validate(); err != nil {
		return nil, refused(fmt.Errorf("journal %q: %w; inspect it, then remove it to continue", filepath.Join(stateDir, journalName), err))
	}
	return j, nil
}

// validate checks that the journal only names what a push may touch: its
// backups in a directory of the state directory's backups/, and plain file
// names in its destination. Recovery also checks that the destination and
// the config are the current run's (see matches).
func (j *journal) validate() error {
	if j.Version != journalVersion {
		return fmt.Errorf("version %d, this mmtls writes version %d", j.Version, journalVersion)
	}
	root := filepath.Join(j.dir, "backups")
	if j.BackupDir != filepath.Clean(j.BackupDir) || filepath.Dir(j.BackupDir) != root {
		return fmt.Errorf("backup directory %q is not in %s", j.BackupDir, root)
	}
	if !filepath.IsAbs(j.DestDir) || !filepath.IsAbs(j.ConfigPath) {
		return fmt.Errorf("destination %q or config %q is not an absolute path", j.DestDir, j.ConfigPath)
	}
	for _, f := range j.Files {
		if !plainName(f.Name) {
			return fmt.Errorf("file name %q is not a plain name", f.Name)
		}
		if f.Path != "" && f.Path != filepath.Join(j.DestDir, f.Name) {
			return fmt.Errorf("file %q is not in the destination %s", f.Path, j.DestDir)
		}
		if p := f.Previous; p != nil && p.Backup != "" && p.Backup != filepath.Join(j.BackupDir, f.Name) {
			return fmt.Errorf("backup %q of %s is not in %s", p.Backup, f.Name, j.BackupDir)
		}
	}
	backup := "config.json"
	if j.ConfigDropIn {
		backup = mmconfig.TLSDropInName
		if filepath.Base(j.ConfigPath) != mmconfig.TLSDropInName {
			return fmt.Errorf("drop-in %q is not mmtls's %s", j.ConfigPath, mmconfig.TLSDropInName)
		}
	}
	if j.ConfigBackup != "" && j.ConfigBackup != filepath.Join(j.BackupDir, backup) {
		return fmt.Errorf("config backup %q is not in %s", j.ConfigBackup, j.BackupDir)
	}
	return nil
}

// matches refuses to recover a journal written for another destination or
// config than the current run's: whatever wrote it, recovery only ever
// touches what this run would.
func (j *journal) matches(destDir, configPath string) error {
	if j.DestDir != destDir || j.ConfigPath != configPath {
		return refused(fmt.Errorf("journal %q is for destination %s and config %s, this run's are %s and %s; "+
			"run mmtls with the settings of the interrupted push to finish it, or inspect the journal and remove it",
			filepath.Join(j.dir, journalName), j.DestDir, j.ConfigPath, destDir, configPath))
	}
	return nil
}

// filesToRestore completes the journal's file list: backups are all written
// before the first rename, so a backup that exists means its file may have
// been replaced, and one that doesn't means it was not.
func (j *journal) filesToRestore() []certs.FileResult {
	out := make([]certs.FileResult, 0, len(j.Files))
	for _, f := range j.Files {
		if f.Previous != nil && f.Previous.Backup == "" {
			b := filepath.Join(j.BackupDir, f.Name)
			if _, err := os.Stat(b); err != nil {
				continue
			}
			p := *f.Previous
			p.Backup = b
			f.Previous = &p
		}
		out = append(out, f)
	}
	return out
}
