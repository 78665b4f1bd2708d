package passthrough

import (
	"context"
	"crypto/tls"
	"net"
	"time"
)

// checkLoop runs u's active health check until ctx ends. It is the one
// goroutine per upstream; state changes are logged once.
func (b *Balancer) checkLoop(ctx context.Context, u *upstream, h HealthConfig) {
	defer b.healthWG.Done()
	t := time.NewTicker(h.interval())
	defer t.Stop()
	for {
		err := check(ctx, u.Addr, h)
		if ctx.Err() != nil {
			return
		}
		b.recordCheck(u, h, err)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (b *Balancer) recordCheck(u *upstream, h HealthConfig, err error) {
	b.mu.Lock()
	var cut []*conn
	if err == nil {
		u.falls, u.rises = 0, u.rises+1
		if !u.healthy && u.rises >= h.rise() {
			u.healthy = true
			b.log.Info("upstream is up", "upstream", u.Addr, "checks", u.rises)
		}
		if mf := b.cfg.maxFails(); mf > 0 && u.fails >= mf && u.rises >= h.rise() {
			// Out for connect failures, but the active check has passed
			// rise times since: back now, not at fail_timeout.
			u.fails = 0
			b.log.Info("upstream is back: health checks pass after its connect failures", "upstream", u.Addr, "checks", u.rises)
		}
	} else {
		u.rises, u.falls = 0, u.falls+1
		if u.healthy && u.falls >= h.fall() {
			u.healthy = false
			b.log.Warn("upstream is down", "upstream", u.Addr, "checks", u.falls, "err", err)
			if h.CutOnDown {
				for c := range u.conns {
					cut = append(cut, c)
				}
			}
		}
	}
	b.mu.Unlock()
	for _, c := range cut {
		c.close("node down")
	}
}

// check makes one health check of addr.
func check(ctx context.Context, addr string, h HealthConfig) error {
	ctx, cancel := context.WithTimeout(ctx, h.timeout())
	defer cancel()
	tc := &tls.Config{ServerName: h.ServerName, RootCAs: h.RootCAs}
	switch h.Mode {
	case HealthTCP:
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		return c.Close()
	case HealthTLS:
		c, err := (&tls.Dialer{Config: tc}).DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		return c.Close()
	case HealthPing:
		return Ping(ctx, addr, tc, h.ServerName, PingPath)
	}
	return nil
}
