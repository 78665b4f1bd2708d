package push

import "errors"

// Outcomes that callers map to exit codes. Errors returned by Push wrap at
// most one of them; an error wrapping none is an unexpected failure.
var (
	// ErrUsage: the options are wrong; nothing was touched.
	ErrUsage = errors.New("usage error")
	// ErrRefused: the input (pair, config, environment) was refused;
	// nothing was changed.
	ErrRefused = errors.New("refused")
	// ErrBusy: another run held the lock past the lock timeout.
	ErrBusy = errors.New("another mmtls run holds the lock")
	// ErrRolledBack: a step after the install failed and the previous
	// state was put back and verified.
	ErrRolledBack = errors.New("rolled back")
	// ErrRollbackFailed: a step failed and putting the previous state back
	// failed too; the message says what is on disk.
	ErrRollbackFailed = errors.New("rollback failed")
)

// outcome wraps err so that errors.Is(result, kind) holds while the message
// stays err's own.
type outcome struct {
	kind error
	err  error
}

func (o *outcome) Error() string        { return o.err.Error() }
func (o *outcome) Unwrap() error        { return o.err }
func (o *outcome) Is(target error) bool { return target == o.kind }

func refused(err error) error  { return &outcome{kind: ErrRefused, err: err} }
func usageErr(err error) error { return &outcome{kind: ErrUsage, err: err} }
