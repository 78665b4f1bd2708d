package certs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path/filepath"
)

// DefaultMode is the mode installed files get when InstallRequest.Mode is zero.
const DefaultMode fs.FileMode = 0o400

// File is one file to install: a plain name inside the destination directory
// and its content.
type File struct {
	Name string
	Data []byte
}

// InstallRequest describes an install. The zero value is not usable: Dir and
// Files must be set.
type InstallRequest struct {
	// Dir is the absolute destination directory. It is treated as hostile:
	// see OpenDir.
	Dir   string
	Files []File
	// UID and GID own the installed files.
	UID, GID int
	// Mode is the installed files' permission bits. Zero means DefaultMode.
	Mode fs.FileMode
	// BackupDir, if set, receives a copy of each trusted file that is
	// there before the install, replaced or not, so that it holds the whole
	// previous pair. It must be root's: the caller checks that. Empty means
	// no backups.
	BackupDir string
	// DryRun plans without writing anything.
	DryRun bool
	// Logger receives suspicious findings. Nil discards.
	Logger *slog.Logger

	// observe is called at each step of staging, for tests.
	observe func(step, tmp string)
}

// Action is what an install does to one file.
type Action string

// Actions, as reported in InstallResult.
const (
	ActionCreate    Action = "create"
	ActionReplace   Action = "replace"
	ActionFixAttrs  Action = "fix-owner-mode" // content in place, owner or mode drifted
	ActionUnchanged Action = "unchanged"
)

// Previous describes the file an install found at a destination name.
type Previous struct {
	UID    int         `json:"uid"`
	GID    int         `json:"gid"`
	Mode   fs.FileMode `json:"mode"`
	SHA256 string      `json:"sha256"`
	// Backup is the copy in BackupDir, or "" when none was made.
	Backup string `json:"backup,omitempty"`
	data   []byte
}

// FileResult is the outcome for one file.
type FileResult struct {
	Name   string `json:"name"`
	Path   string `json:"path"`
	Action Action `json:"action"`
	SHA256 string `json:"sha256"`
	// Suspicious says why the entry found at the destination name was not
	// trusted (a symlink, a hard link, not a regular file); it was replaced,
	// never followed, and not backed up. Empty when nothing was odd.
	Suspicious string `json:"suspicious,omitempty"`
	// Previous is the trusted file that was there, or nil.
	Previous *Previous `json:"previous,omitempty"`
}

// InstallResult reports what an install did or, with DryRun, would do.
type InstallResult struct {
	// Changed reports that at least one file is (or would be) written.
	Changed bool         `json:"changed"`
	Files   []FileResult `json:"files"`
	// Backups lists the backup copies written.
	Backups []string `json:"backups,omitempty"`
}

// Install writes req.Files into req.Dir atomically and symlink-safely. Every
// file is staged before any is renamed into place; if a rename fails, the
// files already renamed are put back as they were. At no instant is a file
// readable by anyone but root and its final owner. Files whose content,
// owner and mode are already right are left alone.
func Install(ctx context.Context, req InstallRequest) (*InstallResult, error) {
	log := req.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	mode := req.Mode
	if mode == 0 {
		mode = DefaultMode
	}
	for _, f := range req.Files {
		if err := checkName(f.Name); err != nil {
			return nil, fmt.Errorf("install: %w", err)
		}
	}
	d, err := OpenDir(req.Dir)
	if err != nil {
		return nil, fmt.Errorf("install: %w", err)
	}
	defer d.Close()

	res := &InstallResult{}
	attrs := FileAttrs{UID: req.UID, GID: req.GID, Mode: mode}
	for _, f := range req.Files {
		fr, err := inspect(d, f, attrs)
		if err != nil {
			return nil, fmt.Errorf("install: %w", err)
		}
		if fr.Suspicious != "" {
			log.Warn("destination name is not a plain file; it will be replaced, not followed",
				"path", fr.Path, "found", fr.Suspicious)
		}
		if fr.Action != ActionUnchanged {
			res.Changed = true
		}
		res.Files = append(res.Files, fr)
	}
	if req.DryRun {
		return res, nil
	}
	if req.BackupDir != "" {
		if err := backup(req.BackupDir, res); err != nil {
			return nil, fmt.Errorf("install: %w", err)
		}
	}
	if !res.Changed {
		return res, nil
	}
	if stale, err := d.RemoveStale(); err != nil {
		return nil, fmt.Errorf("install: %w", err)
	} else if len(stale) > 0 {
		log.Info("removed temp files left by an interrupted run", "dir", d.Path(), "files", stale)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("install: %w", err)
	}

	for _, fr := range res.Files {
		if fr.Suspicious != "" {
			if err := d.clearPlanted(fr.Name, log); err != nil {
				return nil, fmt.Errorf("install: %w", err)
			}
		}
	}

	var pending []*staged
	abortAll := func() {
		for _, s := range pending {
			s.abort()
		}
	}
	for i, f := range req.Files {
		if res.Files[i].Action == ActionUnchanged {
			continue
		}
		s, err := d.stage(f.Name, f.Data, attrs, req.observe)
		if err != nil {
			abortAll()
			return nil, fmt.Errorf("install: %w", err)
		}
		pending = append(pending, s)
	}
	for i, s := range pending {
		if err := s.commit(); err != nil {
			for _, rest := range pending[i+1:] {
				rest.abort()
			}
			rbErr := putBack(d, res, pending[:i+1])
			return nil, fmt.Errorf("install: %w", errors.Join(err, rbErr))
		}
	}
	if err := d.Sync(); err != nil {
		return nil, fmt.Errorf("install: %w", err)
	}
	return res, nil
}

func inspect(d *Dir, f File, want FileAttrs) (FileResult, error) {
	fr := FileResult{Name: f.Name, Path: d.Join(f.Name), SHA256: SHA256Hex(f.Data), Action: ActionReplace}
	st, err := d.Lstat(f.Name)
	if errors.Is(err, fs.ErrNotExist) {
		fr.Action = ActionCreate
		return fr, nil
	}
	if err != nil {
		return fr, err
	}
	if why := suspicion(&st); why != "" {
		fr.Suspicious = why
		return fr, nil
	}
	if st.Size > MaxFileSize {
		// No certificate or key is this large: planted to make every
		// install fail. mmtls owns the name; it is replaced.
		fr.Suspicious = fmt.Sprintf("a file of %d bytes, larger than any certificate or key", st.Size)
		return fr, nil
	}
	old, state, err := d.ReadFile(f.Name, MaxFileSize)
	if errors.Is(err, ErrUntrustedFile) {
		// Swapped between the stat and the open: as untrusted as it gets.
		fr.Suspicious = "changed while inspected"
		return fr, nil
	}
	if err != nil {
		return fr, err
	}
	fr.Previous = &Previous{UID: state.UID, GID: state.GID, Mode: state.Mode, SHA256: SHA256Hex(old), data: old}
	if bytes.Equal(old, f.Data) {
		fr.Action = ActionUnchanged
		if state.UID != want.UID || state.GID != want.GID || state.Mode != want.Mode.Perm() {
			fr.Action = ActionFixAttrs
		}
	}
	return fr, nil
}

func backup(dir string, res *InstallResult) error {
	bd, err := OpenDir(dir)
	if err != nil {
		return fmt.Errorf("open backup directory: %w", err)
	}
	defer bd.Close()
	for i := range res.Files {
		fr := &res.Files[i]
		if fr.Previous == nil {
			continue
		}
		if err := bd.WriteFile(fr.Name, fr.Previous.data, FileAttrs{UID: 0, GID: 0, Mode: 0o600}); err != nil {
			return fmt.Errorf("back up %q: %w", fr.Path, err)
		}
		fr.Previous.Backup = filepath.Join(bd.Path(), fr.Name)
		res.Backups = append(res.Backups, fr.Previous.Backup)
	}
	return nil
}

// putBack restores the previous state of the names in done after a failed
// commit: the previous trusted file, or nothing where there was none.
func putBack(d *Dir, res *InstallResult, done []*staged) error {
	var errs []error
	for _, s := range done {
		for _, fr := range res.Files {
			if fr.Name != s.name {
				continue
			}
			if p := fr.Previous; p != nil {
				errs = append(errs, d.WriteFile(fr.Name, p.data, FileAttrs{UID: p.UID, GID: p.GID, Mode: p.Mode}))
			} else {
				errs = append(errs, d.Remove(fr.Name))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("put back previous files: %w", err)
	}
	return nil
}

// Restore puts back files saved by an earlier install: for each Previous with
// a Backup, the backup's content with the previous owner and mode; for each
// file that was created, its removal. It is how a caller rolls back an
// install after a later step failed.
func Restore(ctx context.Context, dir string, files []FileResult) error {
	d, err := OpenDir(dir)
	if err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	defer d.Close()
	var errs []error
	for _, fr := range files {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("restore: %w", err)
		}
		if err := checkName(fr.Name); err != nil {
			errs = append(errs, fmt.Errorf("restore: %w", err))
			continue
		}
		switch {
		case fr.Action == ActionUnchanged:
		case fr.Previous != nil && fr.Previous.Backup != "":
			data, err := readLimited(fr.Previous.Backup)
			if err != nil {
				errs = append(errs, fmt.Errorf("read backup of %q: %w", fr.Path, err))
				continue
			}
			p := fr.Previous
			errs = append(errs, d.WriteFile(fr.Name, data, FileAttrs{UID: p.UID, GID: p.GID, Mode: p.Mode}))
		case fr.Previous == nil && fr.Action == ActionCreate:
			errs = append(errs, d.Remove(fr.Name))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("restore %q: %w", dir, err)
	}
	return nil
}
