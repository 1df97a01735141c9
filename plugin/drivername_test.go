package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"consul-overlay/internal/dockerapi"
)

// pluginsAPI serves an engine API whose plugin list is list (JSON).
func pluginsAPI(t *testing.T, list string) *dockerapi.Client {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "docker.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/version":
			fmt.Fprint(w, `{"ApiVersion":"1.43"}`)
		case strings.HasSuffix(r.URL.Path, "/plugins"):
			fmt.Fprint(w, list)
		default:
			http.NotFound(w, r)
		}
	}))
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	return dockerapi.New(sock)
}

// coPlugin is one managed plugin serving consul-overlay.sock in a plugin
// list.
func coPlugin(name string, enabled bool, prefix string) string {
	return fmt.Sprintf(`{"Name":%q,"Enabled":%v,"Settings":{"Env":["KV_PREFIX=%s","NODE_NAME="]},
 "Config":{"Interface":{"Socket":"consul-overlay.sock","Types":["docker.networkdriver/1.0","docker.ipamdriver/1.0"]}}}`, name, enabled, prefix)
}

// TestDriverNameAmongInstances: the driver name the syncer creates
// networks with is this instance's, whatever else the engine runs.
func TestDriverNameAmongInstances(t *testing.T) {
	env := func(prefix string) func(string) string {
		return func(k string) string {
			if k == "KV_PREFIX" {
				return prefix
			}
			return ""
		}
	}
	for _, c := range []struct {
		name    string
		plugins []string
		prefix  string
		want    string // "" for an error
	}{
		// While co-b is being enabled the engine lists it as not enabled
		// yet; co-a, another instance (another KV_PREFIX), is enabled.
		// Before, co-a was taken, and kept for the syncer's life: this
		// cluster's networks made with the other instance's driver.
		{"other instance enabled, this one starting", []string{coPlugin("co-a:latest", true, "a/"), coPlugin("co-b:latest", false, "b/")}, "b/", "co-b:latest"},
		{"other instance starting", []string{coPlugin("co-a:latest", false, "a/"), coPlugin("co-b:latest", true, "b/")}, "b/", "co-b:latest"},
		// An upgrade: two versions with the same settings, one enabled.
		{"upgrade", []string{coPlugin("co:v1", false, "p/"), coPlugin("co:v2", true, "p/")}, "p/", "co:v2"},
		{"upgrade, none enabled yet", []string{coPlugin("co:v1", false, "p/"), coPlugin("co:v2", false, "p/")}, "p/", ""},
		{"none is this one", []string{coPlugin("co-a:latest", true, "a/"), coPlugin("co-c:latest", true, "c/")}, "b/", ""},
		{"one plugin", []string{coPlugin("co:latest", false, "x/")}, "b/", "co:latest"},
		{"standalone daemon", nil, "b/", "consul-overlay"},
	} {
		t.Run(c.name, func(t *testing.T) {
			docker := pluginsAPI(t, "["+strings.Join(c.plugins, ",")+"]")
			got, err := driverName(context.Background(), docker, "/run/docker/plugins/consul-overlay.sock", env(c.prefix))
			switch {
			case c.want == "" && err == nil:
				t.Fatalf("driver name %q; want an error naming %s", got, envDriverName)
			case c.want == "" && !strings.Contains(err.Error(), envDriverName):
				t.Fatalf("error %q does not name %s", err, envDriverName)
			case c.want != "" && (err != nil || got != c.want):
				t.Fatalf("driver name %q, %v; want %q", got, err, c.want)
			}
		})
	}
}
