package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// envDebugPprof turns on Go's profiling endpoints (net/http/pprof) on a
// unix socket in DATA_DIR, for debugging only: `curl --unix-socket
// DATA_DIR/pprof.sock http://x/debug/pprof/heap > heap.pb.gz`, then `go
// tool pprof`. Off by default; the socket is the process owner's only.
const envDebugPprof = "DEBUG_PPROF"

// pprofSocket is the socket's name in DATA_DIR.
const pprofSocket = "pprof.sock"

// pprofSetting reads DEBUG_PPROF, normalised (v): on for 1 or true, off
// for empty, 0 or false, and neither (valid false) for anything else.
func pprofSetting(getenv func(string) string) (v string, on, valid bool) {
	switch v = strings.ToLower(strings.TrimSpace(getenv(envDebugPprof))); v {
	case "", "0", "false":
		return v, false, true
	case "1", "true":
		return v, true, true
	}
	return v, false, false
}

// pprofEnabled says whether DEBUG_PPROF asks for the profiles (1 or
// true); a value startPprof refuses counts as on, so that the runtime's
// heap profiling stays on until the plugin has said why it stops.
func pprofEnabled(getenv func(string) string) bool {
	_, on, valid := pprofSetting(getenv)
	return on || !valid
}

// startPprof serves the profiles until ctx ends when DEBUG_PPROF is 1 or
// true; else it does nothing.
func startPprof(ctx context.Context, getenv func(string) string, dataDir string, log *slog.Logger) (stop func(), err error) {
	v, on, valid := pprofSetting(getenv)
	if !valid {
		return nil, fmt.Errorf("%s=%q: want 1 or 0", envDebugPprof, v)
	}
	if !on {
		return func() {}, nil
	}
	path := filepath.Join(dataDir, pprofSocket)
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: remove stale %s: %w", envDebugPprof, path, err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("%s: listen on %s: %w", envDebugPprof, path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("%s: chmod %s: %w", envDebugPprof, path, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	stopCtx := context.AfterFunc(ctx, func() { _ = srv.Close() })
	log.Warn("debug: serving Go profiles (DEBUG_PPROF)", "socket", path)
	return func() {
		stopCtx()
		_ = srv.Close()
		<-done
		_ = os.Remove(path)
	}, nil
}
