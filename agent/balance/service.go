package balance

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/mmtls/mmtls/agent/passthrough"
)

// Service runs the balancer on its listeners with its control socket, as
// `mmtls balance` and `mmtls run` do. Set the fields, then call Run once.
type Service struct {
	Options Options
	Logger  *slog.Logger // nil discards
	// Started, if not nil, is called with the balancer once it exists and
	// before it serves (the agent exports its state as metrics).
	Started func(*passthrough.Balancer)
	// Challenges, if not nil, answers ACME HTTP-01 challenges on the
	// --redirect-http listener from memory (the agent's [acme]).
	Challenges Challenges

	mu sync.Mutex
	b  *passthrough.Balancer // set by Run; guarded by mu
}

// Run serves until ctx is cancelled, then stops accepting and waits for
// live connections up to DefaultShutdownTimeout before closing them. It
// returns after every goroutine it started has exited.
func (s *Service) Run(ctx context.Context) (err error) {
	log := logger(s.Logger)
	o := s.Options.WithDefaults()
	cfg, err := o.Config(log)
	if err != nil {
		return err
	}
	b, err := passthrough.New(cfg)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.b = b
	s.mu.Unlock()
	if s.Started != nil {
		s.Started(b)
	}
	// Until serving starts, a failure undoes what was set up; from then
	// on, the shutdown below does.
	var undo []func()
	defer func() {
		if err != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()
	undo = append(undo, func() { b.Shutdown(context.Background()) })
	lns, err := listen(o.Listen)
	if err != nil {
		return err
	}
	undo = append(undo, func() {
		for _, l := range lns {
			l.Close()
		}
	})
	ctl, err := listenControl(o.ControlSocket)
	if err != nil {
		return err
	}
	undo = append(undo, func() { ctl.Close() })
	defer os.Remove(o.ControlSocket)

	serveCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if o.RedirectHTTP != "" {
		wait, err := serveRedirect(serveCtx, o.RedirectHTTP, o.SiteURL, o.ACMEWebroot, s.Challenges, log)
		if err != nil {
			return err
		}
		defer wait()
		defer cancel()
	}
	var wg sync.WaitGroup
	for _, ln := range lns {
		wg.Go(func() {
			if err := b.Serve(serveCtx, ln); err != nil && !errors.Is(err, passthrough.ErrClosed) && serveCtx.Err() == nil {
				log.Error("listener stopped", "addr", ln.Addr().String(), "err", err)
			}
		})
	}
	wg.Go(func() {
		if err := b.ServeControl(serveCtx, ctl, 0); err != nil {
			log.Error("control socket stopped", "err", err)
		}
	})
	log.Info("balancing", "listen", o.Listen, "upstreams", o.Upstreams, "method", cfg.Method)
	<-ctx.Done()
	log.Info("shutting down: no new connections; waiting for live ones", "connections", b.ActiveConns(), "deadline", DefaultShutdownTimeout)
	sctx, scancel := context.WithTimeout(context.Background(), DefaultShutdownTimeout)
	defer scancel()
	serr := b.Shutdown(sctx)
	cancel()
	wg.Wait()
	if errors.Is(serr, context.DeadlineExceeded) {
		return nil // the rest were closed, as asked
	}
	return serr
}

// listen opens every listen address, or none.
func listen(addrs []string) ([]net.Listener, error) {
	// No TCP keep-alive probes on client connections (four setsockopt
	// calls per accept): the idle timeout ends dead connections.
	lc := net.ListenConfig{KeepAlive: -1}
	var lns []net.Listener
	for _, addr := range addrs {
		ln, err := lc.Listen(context.Background(), "tcp", addr)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, fmt.Errorf("--listen %s: %w", addr, err)
		}
		lns = append(lns, ln)
	}
	return lns, nil
}

// Reload applies new options to the running balancer (SIGHUP): upstreams,
// method, health checks and timeouts. Listeners, the control socket and
// live connections are kept.
func (s *Service) Reload(o Options) error {
	cfg, err := o.WithDefaults().Config(s.Logger)
	if err != nil {
		return err
	}
	s.mu.Lock()
	b := s.b
	s.mu.Unlock()
	if b == nil {
		return errors.New("balancer not running")
	}
	if strings.Join(o.Listen, ",") != strings.Join(s.Options.Listen, ",") {
		logger(s.Logger).Warn("listen addresses changed in the config; they take effect at the next start")
	}
	return b.Update(cfg)
}

// listenControl makes the control socket, root's alone.
func listenControl(path string) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("--control-socket: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode().Type() == os.ModeSocket {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("--control-socket %s: another balancer is running", path)
		}
		os.Remove(path) // a stale socket
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("--control-socket: %w", err)
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("--control-socket: %w", err)
	}
	return ln, nil
}

func logger(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}
