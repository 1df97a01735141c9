package dockerapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// fakeEngine serves handler on a unix socket in a temporary directory and
// returns its path.
func fakeEngine(t *testing.T, handler http.Handler) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "docker.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(handler)
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	return sock
}

func versionHandler(v string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/version" {
			fmt.Fprintf(w, `{"ApiVersion":%q,"MinAPIVersion":"1.12"}`, v)
			return
		}
		if next == nil {
			http.NotFound(w, r)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func TestPickVersion(t *testing.T) {
	tests := []struct {
		server  string
		want    string
		wantErr bool
	}{
		{"1.41", "1.41", false},
		{"1.24", "1.24", false},
		{"1.52", "1.52", false},
		{"1.53", MaxAPIVersion, false},
		{"2.0", MaxAPIVersion, false},
		{"1.23", "", true},
		{"1.9", "", true},
		{"", "", true},
		{"1", "", true},
		{"a.b", "", true},
		{"1.-1", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.server, func(t *testing.T) {
			got, err := pickVersion(tt.server)
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Fatalf("pickVersion(%q) = %q, %v; want %q, error %v", tt.server, got, err, tt.want, tt.wantErr)
			}
		})
	}
}

func TestSocketPath(t *testing.T) {
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	got, err := SocketPath(env(map[string]string{"DOCKER_HOST": "unix:///tmp/x.sock"}))
	if err != nil || got != "/tmp/x.sock" {
		t.Fatalf("unix DOCKER_HOST: got %q, %v", got, err)
	}
	for _, bad := range []string{"tcp://127.0.0.1:2375", "unix://", "/var/run/docker.sock", "ssh://host"} {
		if got, err := SocketPath(env(map[string]string{"DOCKER_HOST": bad})); err == nil {
			t.Errorf("DOCKER_HOST=%q: got %q, want an error", bad, got)
		}
	}
	got, err = SocketPath(env(nil))
	if err != nil || (got != DefaultSocket && got != PluginSocket) {
		t.Fatalf("no DOCKER_HOST: got %q, %v", got, err)
	}
}

// TestFakeVersioning checks that requests carry the negotiated prefix,
// capped at MaxAPIVersion, and that negotiation happens once.
func TestFakeVersioning(t *testing.T) {
	for _, tt := range []struct{ server, prefix string }{
		{"1.41", "/v1.41/"},
		{"1.60", "/v" + MaxAPIVersion + "/"},
	} {
		t.Run(tt.server, func(t *testing.T) {
			var versions, lists atomic.Int32
			var gotPath atomic.Value
			sock := fakeEngine(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				switch {
				case r.URL.Path == "/version":
					versions.Add(1)
					fmt.Fprintf(w, `{"ApiVersion":%q}`, tt.server)
				case strings.HasSuffix(r.URL.Path, "/containers/json"):
					lists.Add(1)
					gotPath.Store(r.URL.Path + "?" + r.URL.RawQuery)
					fmt.Fprint(w, `[{"Id":"abc","Names":["/one","/two"],"Labels":{"a":"b"},"State":"running"}]`)
				default:
					http.NotFound(w, r)
				}
			}))
			c := New(sock)
			defer c.Close()
			ctx := context.Background()
			for range 2 {
				got, err := c.List(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if len(got) != 1 || got[0].ID != "abc" || strings.Join(got[0].Names, ",") != "one,two" ||
					got[0].Labels["a"] != "b" || got[0].State != "running" {
					t.Fatalf("List = %+v", got)
				}
			}
			if p := gotPath.Load().(string); p != tt.prefix+"containers/json?all=true" {
				t.Errorf("request path %q, want prefix %q and all=true", p, tt.prefix)
			}
			if versions.Load() != 1 || lists.Load() != 2 {
				t.Errorf("version asked %d times, list %d times; want 1 and 2", versions.Load(), lists.Load())
			}
		})
	}
}

func TestFakeErrors(t *testing.T) {
	sock := fakeEngine(t, versionHandler("1.41", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasSuffix(r.URL.Path, "/containers/gone/json"):
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprint(w, `{"message":"No such container: gone"}`)
		case strings.HasSuffix(r.URL.Path, "/containers/boom/json"):
			w.WriteHeader(http.StatusInternalServerError)
			fmt.Fprint(w, `{"message":"something broke"}`)
		case strings.HasSuffix(r.URL.Path, "/containers/garbage/json"):
			fmt.Fprint(w, `{"Id":`)
		case strings.HasSuffix(r.URL.Path, "/containers/slow/json"):
			<-r.Context().Done()
		default:
			http.NotFound(w, r)
		}
	})))
	c := New(sock)
	defer c.Close()
	ctx := context.Background()

	if _, err := c.Inspect(ctx, "gone"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Inspect(gone) = %v, want ErrNotFound", err)
	}
	_, err := c.Inspect(ctx, "boom")
	var se *StatusError
	if !errors.As(err, &se) || se.Code != 500 || !strings.Contains(err.Error(), "something broke") || errors.Is(err, ErrNotFound) {
		t.Errorf("Inspect(boom) = %v, want a 500 StatusError with the engine's message", err)
	}
	if _, err := c.Inspect(ctx, "garbage"); err == nil || !strings.Contains(err.Error(), "decode") {
		t.Errorf("Inspect(garbage) = %v, want a decode error", err)
	}
	if _, err := c.Inspect(ctx, "../etc"); err == nil {
		t.Error("Inspect(../etc) succeeded, want an invalid id error")
	}
	c.Timeout = 200 * time.Millisecond
	start := time.Now()
	if _, err := c.Inspect(ctx, "slow"); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Inspect(slow) = %v, want a deadline error", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Inspect(slow) took %s despite a 200ms timeout", d)
	}
}

func TestFakeOldEngineRefused(t *testing.T) {
	sock := fakeEngine(t, versionHandler("1.20", nil))
	c := New(sock)
	defer c.Close()
	if _, err := c.List(context.Background()); err == nil || !strings.Contains(err.Error(), "older than") {
		t.Fatalf("List against a 1.20 engine = %v, want a version error", err)
	}
}

func TestNoSocket(t *testing.T) {
	c := New(filepath.Join(t.TempDir(), "absent.sock"))
	defer c.Close()
	ctx := context.Background()
	if _, err := c.Negotiate(ctx); err == nil {
		t.Error("Negotiate without a socket succeeded")
	}
	if _, err := c.List(ctx); err == nil {
		t.Error("List without a socket succeeded")
	}
	if _, _, err := c.Events(ctx, time.Time{}, nil); err == nil {
		t.Error("Events without a socket succeeded")
	}
}

func TestFakeEvents(t *testing.T) {
	release := make(chan struct{})
	var gotQuery atomic.Value
	sock := fakeEngine(t, versionHandler("1.41", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasSuffix(r.URL.Path, "/events") && r.URL.Query().Get("since") == "1.000000000":
			// A stream that breaks in the middle of a message.
			w.WriteHeader(200)
			fmt.Fprint(w, `{"Type":"container","Action":"start","Actor":{"ID":"c1"},"timeNano":5}`+"\n"+`{"Type":`)
		case strings.HasSuffix(r.URL.Path, "/events") && r.URL.Query().Get("since") == "2.000000000":
			w.WriteHeader(200)
			fmt.Fprint(w, `{"status":"die","id":"old"}`+"\n")
		case strings.HasSuffix(r.URL.Path, "/events") && r.URL.Query().Get("since") == "3.000000000":
			w.WriteHeader(http.StatusBadRequest)
			fmt.Fprint(w, `{"message":"bad filter"}`)
		case strings.HasSuffix(r.URL.Path, "/events"):
			gotQuery.Store(r.URL.RawQuery)
			w.WriteHeader(200)
			fmt.Fprint(w, `{"Type":"network","Action":"connect","Actor":{"ID":"n1","Attributes":{"container":"c2"}},"timeNano":7}`+"\n")
			w.(http.Flusher).Flush()
			select {
			case <-release:
			case <-r.Context().Done():
			}
		default:
			http.NotFound(w, r)
		}
	})))
	c := New(sock)
	defer c.Close()
	ctx := context.Background()

	t.Run("broken stream", func(t *testing.T) {
		evs, errc, err := c.Events(ctx, time.Unix(1, 0), nil)
		if err != nil {
			t.Fatal(err)
		}
		ev := <-evs
		if ev.Type != "container" || ev.Action != "start" || ev.ActorID != "c1" || ev.Time.UnixNano() != 5 {
			t.Errorf("event = %+v", ev)
		}
		if _, ok := <-evs; ok {
			t.Error("event channel not closed after the stream broke")
		}
		if err := <-errc; err == nil || errors.Is(err, ErrStreamClosed) {
			t.Errorf("stream error = %v, want a decode error", err)
		}
	})
	t.Run("old format and clean close", func(t *testing.T) {
		evs, errc, err := c.Events(ctx, time.Unix(2, 0), nil)
		if err != nil {
			t.Fatal(err)
		}
		if ev := <-evs; ev.Action != "die" || ev.ActorID != "old" {
			t.Errorf("event = %+v, want status/id mapped to Action/ActorID", ev)
		}
		if err := <-errc; !errors.Is(err, ErrStreamClosed) {
			t.Errorf("stream error = %v, want ErrStreamClosed", err)
		}
	})
	t.Run("refused", func(t *testing.T) {
		if _, _, err := c.Events(ctx, time.Unix(3, 0), nil); err == nil || !strings.Contains(err.Error(), "bad filter") {
			t.Errorf("Events = %v, want the engine's refusal", err)
		}
	})
	t.Run("cancel while not receiving", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		evs, errc, err := c.Events(cctx, time.Time{}, map[string][]string{"type": {"network"}})
		if err != nil {
			t.Fatal(err)
		}
		if q, _ := gotQuery.Load().(string); !strings.Contains(q, "filters=") || strings.Contains(q, "since=") {
			t.Errorf("query %q, want filters and no since", q)
		}
		// Do not read the pending event: the goroutine must still stop.
		time.Sleep(50 * time.Millisecond)
		cancel()
		select {
		case err := <-errc:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("stream error = %v, want context.Canceled", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("stream goroutine did not stop after cancel")
		}
		for range evs {
			// Drain until closed.
		}
		close(release)
	})
}

// TestFakeInfoNetworks: Info reads the engine's ID, InspectNetwork tells a
// known network from an unknown one (ErrNotFound) and from a failure, and
// List reads each container's attachments.
func TestFakeInfoNetworks(t *testing.T) {
	sock := fakeEngine(t, versionHandler("1.41", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasSuffix(r.URL.Path, "/info"):
			fmt.Fprint(w, `{"ID":"AAAA:BBBB","Name":"host1","Containers":3}`)
		case strings.HasSuffix(r.URL.Path, "/networks/n1"):
			fmt.Fprint(w, `{"Id":"n1full","Name":"app","Driver":"consul-overlay"}`)
		case strings.HasSuffix(r.URL.Path, "/networks/boom"):
			http.Error(w, `{"message":"broke"}`, 500)
		case strings.HasSuffix(r.URL.Path, "/containers/json"):
			fmt.Fprint(w, `[{"Id":"c1","State":"created","NetworkSettings":{"Networks":{
				"b":{"NetworkID":"nb","EndpointID":""},"a":{"NetworkID":"na","EndpointID":"ea"}}}}]`)
		default:
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprint(w, `{"message":"not found"}`)
		}
	})))
	c := New(sock)
	defer c.Close()
	ctx := context.Background()

	info, err := c.Info(ctx)
	if err != nil || info.ID != "AAAA:BBBB" || info.Name != "host1" {
		t.Errorf("Info = %+v, %v; want ID AAAA:BBBB name host1", info, err)
	}
	n, err := c.InspectNetwork(ctx, "n1")
	if err != nil || n.ID != "n1full" || n.Name != "app" || n.Driver != "consul-overlay" {
		t.Errorf("InspectNetwork(n1) = %+v, %v", n, err)
	}
	if _, err := c.InspectNetwork(ctx, "gone"); !errors.Is(err, ErrNotFound) {
		t.Errorf("InspectNetwork(gone) = %v, want ErrNotFound", err)
	}
	if _, err := c.InspectNetwork(ctx, "boom"); err == nil || errors.Is(err, ErrNotFound) {
		t.Errorf("InspectNetwork(boom) = %v, want an error that is not ErrNotFound", err)
	}
	if _, err := c.InspectNetwork(ctx, "a/b"); err == nil {
		t.Error("InspectNetwork(a/b) succeeded, want an invalid id error")
	}
	list, err := c.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := []Attachment{{Name: "a", NetworkID: "na", EndpointID: "ea"}, {Name: "b", NetworkID: "nb"}}
	if len(list) != 1 || !slices.Equal(list[0].Networks, want) || !slices.Equal(list[0].EndpointIDs, []string{"ea"}) {
		t.Errorf("List = %+v, want attachments %+v", list, want)
	}
}

// TestFakeInfoWithoutID: an answer without an ID is an error, never an
// empty identity.
func TestFakeInfoWithoutID(t *testing.T) {
	sock := fakeEngine(t, versionHandler("1.41", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, `{"Name":"x"}`)
	})))
	c := New(sock)
	defer c.Close()
	if info, err := c.Info(context.Background()); err == nil {
		t.Errorf("Info = %+v, want an error", info)
	}
}
