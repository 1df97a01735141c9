package main

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestStartPprof: DEBUG_PPROF off serves nothing, a value neither on nor
// off is refused with its name, and on serves the profiles on the socket
// in DATA_DIR, removed at stop.
func TestStartPprof(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	env := func(v string) func(string) string {
		return func(k string) string { return map[string]string{envDebugPprof: v}[k] }
	}
	dir := t.TempDir()
	path := filepath.Join(dir, pprofSocket)
	for _, v := range []string{"", "0", "false"} {
		stop, err := startPprof(t.Context(), env(v), dir, log)
		if err != nil {
			t.Fatalf("%s=%q: %v", envDebugPprof, v, err)
		}
		stop()
		if _, err := os.Stat(path); !os.IsNotExist(err) {
			t.Fatalf("%s=%q: socket %s exists (%v)", envDebugPprof, v, path, err)
		}
	}
	if _, err := startPprof(t.Context(), env("yes"), dir, log); err == nil || !strings.Contains(err.Error(), envDebugPprof) {
		t.Fatalf("%s=yes: err %v, want one naming %s", envDebugPprof, err, envDebugPprof)
	}
	stop, err := startPprof(t.Context(), env("1"), dir, log)
	if err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", path)
	}}}
	resp, err := client.Get("http://x/debug/pprof/heap?debug=1")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "heap profile") {
		t.Fatalf("GET heap profile: %s\n%.200s", resp.Status, body)
	}
	stop()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket %s left after stop (%v)", path, err)
	}
}
