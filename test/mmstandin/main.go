// Command mmstandin stands in for a Mattermost server in mmtls's tests and
// demo. At start it does what Mattermost does with its config and TLS
// settings, and nothing else:
//
//   - find the config: --config, else MM_CONFIG, else config/config.json
//     under the working directory;
//   - json.Unmarshal into model.Config, SetDefaults, and write config.json
//     back (4-space indent, mode 0600, atomically), which drops keys the
//     model does not know, as Mattermost does;
//   - apply MM_<SECTION>_<FIELD> environment overrides (not written back);
//   - IsValid, exiting 1 on failure;
//   - listen on ServiceSettings.ListenAddress, log "Server is listening",
//     then serve TLS with TLSCertFile/TLSKeyFile when ConnectionSecurity is
//     "TLS" (TLSMinVer, TLSOverwriteCiphers honoured), plain HTTP otherwise;
//   - answer GET <SiteURL path>/api/v4/system/ping with {"status":"OK"}.
//
// A pair it cannot load is handled in one of the two ways real servers do
// (--bad-key): "exit" (current versions: log and exit 1) or "hang" (6.7.2:
// the port stays bound, no handshake ever completes, the process lives on).
//
// `mmstandin ctl start|stop|restart --dir D -- [server flags]` is a tiny
// service manager for tests: one detached server per directory D, its PID
// in D/pid and its output in D/log. With --exec it manages another program
// the same way (a real Mattermost server).
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/mattermost/mattermost/server/public/model"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "ctl" {
		if err := ctl(os.Args[2:]); err != nil {
			fmt.Fprintf(os.Stderr, "mmstandin ctl: %v\n", err)
			os.Exit(1)
		}
		return
	}
	if err := serve(os.Args[1:]); err != nil {
		slog.Error("Error starting server", "err", err)
		os.Exit(1)
	}
}

func serve(args []string) error {
	fs := flag.NewFlagSet("mmstandin", flag.ContinueOnError)
	configFlag := fs.String("config", "", "config file (else MM_CONFIG, else config/config.json)")
	badKey := fs.String("bad-key", "exit", `what to do with a pair that cannot be loaded: "exit" or "hang"`)
	startDelay := fs.Duration("start-delay", 0, "wait this long before listening (a slow start)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	path := *configFlag
	if path == "" {
		path = os.Getenv("MM_CONFIG")
	}
	if path == "" {
		path = filepath.Join("config", "config.json")
	}
	cfg, err := load(path)
	if err != nil {
		return err
	}
	if err := applyEnv(cfg, os.Environ()); err != nil {
		return err
	}
	if appErr := cfg.IsValid(); appErr != nil {
		return fmt.Errorf("invalid config %s: %s", path, appErr.Id)
	}
	time.Sleep(*startDelay)

	ss := cfg.ServiceSettings
	addr := *ss.ListenAddress
	useTLS := *ss.ConnectionSecurity == model.ConnSecurityTLS
	if addr == "" {
		addr = ":http"
		if useTLS {
			addr = ":https"
		}
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", addr, err)
	}
	slog.Info("Server is listening", "address", ln.Addr().String(), "tls", useTLS)

	prefix := ""
	if u, err := url.Parse(*ss.SiteURL); err == nil {
		prefix = strings.TrimRight(u.Path, "/")
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+prefix+"/api/v4/system/ping", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"ActiveSearchBackend":"database","AndroidLatestVersion":"","status":"OK"}`)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	errc := make(chan error, 1)
	go func() {
		if !useTLS {
			errc <- srv.Serve(ln)
			return
		}
		tc, err := tlsConfig(ss)
		if err != nil {
			errc <- err
			return
		}
		srv.TLSConfig = tc
		errc <- srv.ServeTLS(ln, *ss.TLSCertFile, *ss.TLSKeyFile)
	}()
	select {
	case <-ctx.Done():
		shut, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return srv.Shutdown(shut)
	case err := <-errc:
		if *badKey == "hang" {
			// 6.7.2: the error is logged at a level its standard logs
			// filter out; the listener stays open and nobody accepts.
			slog.Debug("Error starting server", "err", err)
			<-ctx.Done()
			ln.Close()
			return nil
		}
		return err
	}
}

// load reads the config file as Mattermost's file store does, and writes it
// back: defaults filled in, unknown keys dropped.
func load(path string) (*model.Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	cfg := &model.Config{}
	if err := json.Unmarshal(data, cfg); err != nil {
		return nil, fmt.Errorf("parse config %s: %w", path, err)
	}
	cfg.SetDefaults()
	out, err := json.MarshalIndent(cfg, "", "    ")
	if err != nil {
		return nil, err
	}
	tmp := path + ".tmp" + strconv.Itoa(os.Getpid())
	if err := os.WriteFile(tmp, out, 0o600); err != nil {
		return nil, fmt.Errorf("write config: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return nil, fmt.Errorf("write config: %w", err)
	}
	return cfg, nil
}

// applyEnv sets MM_<SECTION>_<FIELD> overrides, matching names without
// regard to case.
func applyEnv(cfg *model.Config, environ []string) error {
	root := reflect.ValueOf(cfg).Elem()
	for _, kv := range environ {
		k, v, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(strings.ToUpper(k), "MM_") || strings.EqualFold(k, "MM_CONFIG") {
			continue
		}
		section, field, ok := strings.Cut(k[3:], "_")
		if !ok {
			continue
		}
		sec := fieldFold(root, section)
		if !sec.IsValid() || sec.Kind() != reflect.Struct {
			continue
		}
		f := fieldFold(sec, field)
		if !f.IsValid() {
			continue
		}
		if err := setValue(f, v); err != nil {
			return fmt.Errorf("environment %s: %w", k, err)
		}
	}
	return nil
}

func fieldFold(v reflect.Value, name string) reflect.Value {
	t := v.Type()
	for i := range t.NumField() {
		if strings.EqualFold(t.Field(i).Name, name) {
			return v.Field(i)
		}
	}
	return reflect.Value{}
}

func setValue(f reflect.Value, s string) error {
	if f.Kind() == reflect.Pointer {
		nv := reflect.New(f.Type().Elem())
		if err := setValue(nv.Elem(), s); err != nil {
			return err
		}
		f.Set(nv)
		return nil
	}
	switch f.Kind() {
	case reflect.String:
		f.SetString(s)
	case reflect.Bool:
		b, err := strconv.ParseBool(s)
		if err != nil {
			return err
		}
		f.SetBool(b)
	case reflect.Int, reflect.Int64, reflect.Int32:
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return err
		}
		f.SetInt(n)
	case reflect.Slice:
		f.Set(reflect.ValueOf(strings.Fields(s)))
	default:
		return fmt.Errorf("unsupported kind %s", f.Kind())
	}
	return nil
}

func tlsConfig(ss model.ServiceSettings) (*tls.Config, error) {
	tc := &tls.Config{
		MinVersion:       tls.VersionTLS12,
		CurvePreferences: []tls.CurveID{tls.CurveP521, tls.CurveP384, tls.CurveP256},
	}
	switch *ss.TLSMinVer {
	case "1.0":
		tc.MinVersion = tls.VersionTLS10
	case "1.1":
		tc.MinVersion = tls.VersionTLS11
	}
	for _, name := range ss.TLSOverwriteCiphers {
		id, ok := model.ServerTLSSupportedCiphers[name]
		if !ok {
			return nil, errors.New("unsupported cipher " + name)
		}
		tc.CipherSuites = append(tc.CipherSuites, id)
	}
	return tc, nil
}
