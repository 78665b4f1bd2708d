package main

import (
	"context"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

// onSIGHUP calls reload at each SIGHUP until ctx ends; a failed reload is
// logged and the running configuration kept. wait blocks until the
// goroutine it starts has exited, which it does once ctx ends.
func onSIGHUP(ctx context.Context, log *slog.Logger, reload func() error) (wait func()) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer signal.Stop(hup)
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				if err := reload(); err != nil {
					log.Error("reload: keeping the running configuration", "err", err)
				}
			}
		}
	}()
	return func() { <-done }
}
