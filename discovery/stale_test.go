package discovery

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"consul-overlay/internal/dockerapi"
	"consul-overlay/internal/testenv"
)

// fakeEngine is a Docker engine for unit tests: an ID, the networks it
// knows, a container list, and per-container inspect answers. Its fields
// change under mu while a registrar uses it.
type fakeEngine struct {
	mu       sync.Mutex
	id       string            // "" fails /info
	networks map[string]string // network ID -> name
	list     []fakeContainer   // nil with failList: the list fails
	failList bool
	// inspect answers GET /containers/<id>/json; nil: 404.
	inspect func(w http.ResponseWriter, r *http.Request, id string)
}

type fakeContainer struct {
	ID    string
	State string
	// Networks: name -> [network ID, endpoint ID].
	Networks map[string][2]string
}

func (c fakeContainer) json() map[string]any {
	nets := map[string]any{}
	for name, v := range c.Networks {
		nets[name] = map[string]string{"NetworkID": v[0], "EndpointID": v[1]}
	}
	return map[string]any{"Id": c.ID, "State": c.State, "NetworkSettings": map[string]any{"Networks": nets}}
}

func (f *fakeEngine) set(fn func(f *fakeEngine)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *fakeEngine) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	id, networks, list, failList, inspect := f.id, f.networks, slices.Clone(f.list), f.failList, f.inspect
	f.mu.Unlock()
	p := r.URL.Path
	if p == "/version" {
		fmt.Fprint(w, `{"ApiVersion":"1.41"}`)
		return
	}
	p = strings.TrimPrefix(p, "/v1.41")
	switch {
	case p == "/info":
		if id == "" {
			http.Error(w, `{"message":"busy"}`, http.StatusInternalServerError)
			return
		}
		fmt.Fprintf(w, `{"ID":%q,"Name":"fake"}`, id)
	case strings.HasPrefix(p, "/networks/"):
		nid := strings.TrimPrefix(p, "/networks/")
		name, ok := networks[nid]
		if !ok {
			http.Error(w, `{"message":"network not found"}`, http.StatusNotFound)
			return
		}
		fmt.Fprintf(w, `{"Id":%q,"Name":%q,"Driver":"consul-overlay"}`, nid, name)
	case p == "/containers/json":
		if failList {
			http.Error(w, `{"message":"daemon busy"}`, http.StatusInternalServerError)
			return
		}
		out := []map[string]any{}
		for _, c := range list {
			out = append(out, c.json())
		}
		json.NewEncoder(w).Encode(out)
	case strings.HasPrefix(p, "/containers/") && strings.HasSuffix(p, "/json"):
		cid := strings.TrimSuffix(strings.TrimPrefix(p, "/containers/"), "/json")
		if inspect == nil {
			http.Error(w, `{"message":"No such container"}`, http.StatusNotFound)
			return
		}
		inspect(w, r, cid)
	default: // events and the rest
		http.Error(w, `{"message":"not here"}`, http.StatusServiceUnavailable)
	}
}

// start serves the engine on a unix socket and returns a client of it.
func (f *fakeEngine) start(t *testing.T) *dockerapi.Client {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "docker.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(f)
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	c := dockerapi.New(sock)
	t.Cleanup(c.Close)
	return c
}

// answerInspect writes an inspect answer: status and endpoints on the
// network "app".
func answerInspect(w http.ResponseWriter, id, status, networkID, endpointID string) {
	json.NewEncoder(w).Encode(map[string]any{
		"Id": id, "Name": "/c", "State": map[string]any{"Status": status, "Running": status == "running"},
		"NetworkSettings": map[string]any{"Networks": map[string]any{"app": map[string]string{"NetworkID": networkID, "EndpointID": endpointID}}},
	})
}

// passes runs n Sync passes, each after more than grace.
func passes(t *testing.T, r *Registrar, n int, grace time.Duration) {
	t.Helper()
	for range n {
		time.Sleep(grace + time.Millisecond)
		if err := r.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
}

const (
	fakeNetID = "4e7a000000000000000000000000000000000000000000000000000000000001"
	fakeEngID = "AAAA:BBBB:CCCC:DDDD"
)

// TestStaleNeverFromUntrustedEngine: only the pinned engine, answering a
// complete list without the endpoint's container and knowing its network,
// gets an endpoint reclaimed; every other case keeps it and its service.
func TestStaleNeverFromUntrustedEngine(t *testing.T) {
	agent := testenv.StartConsul(t)
	client := agentClient(t, agent)
	ctx := context.Background()
	cid := "abcabcabcabc" + strings.Repeat("1", 52)

	for i, tt := range []struct {
		name      string
		engine    *fakeEngine // nil: no Docker client
		absent    bool        // a client of a socket nobody serves
		pinned    string      // engine ID file content
		listsIt   bool        // the engine lists the endpoint's container
		wantStale bool
	}{
		{name: "no docker client"},
		{name: "socket absent", absent: true},
		{name: "info fails", engine: &fakeEngine{networks: map[string]string{fakeNetID: "app"}, list: []fakeContainer{}}},
		{name: "list fails", engine: &fakeEngine{id: fakeEngID, networks: map[string]string{fakeNetID: "app"}, failList: true}},
		{name: "engine lists the container", engine: &fakeEngine{id: fakeEngID, networks: map[string]string{fakeNetID: "app"}}, listsIt: true},
		{name: "network unknown to the engine", engine: &fakeEngine{id: fakeEngID, networks: map[string]string{}, list: []fakeContainer{}}},
		{name: "engine with another ID than pinned", engine: &fakeEngine{id: fakeEngID, networks: map[string]string{fakeNetID: "app"}, list: []fakeContainer{}},
			pinned: "ZZZZ:ZZZZ"},
		{name: "pinned engine answers without it", engine: &fakeEngine{id: fakeEngID, networks: map[string]string{fakeNetID: "app"}, list: []fakeContainer{}},
			pinned: fakeEngID, wantStale: true},
		{name: "engine pinned at first contact answers without it", engine: &fakeEngine{id: fakeEngID, networks: map[string]string{fakeNetID: "app"}, list: []fakeContainer{}},
			wantStale: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ep := Endpoint{ID: endpointID(400 + i), Network: "app", NetworkID: fakeNetID, IPv4: loopback(40 + i), Register: true}
			if tt.listsIt {
				tt.engine.list = []fakeContainer{{ID: cid, State: "running", Networks: map[string][2]string{"app": {fakeNetID, ep.ID}}}}
			}
			var docker *dockerapi.Client
			switch {
			case tt.engine != nil:
				docker = tt.engine.start(t)
			case tt.absent:
				docker = dockerapi.New(filepath.Join(t.TempDir(), "no.sock"))
			}
			idFile := filepath.Join(t.TempDir(), "engine-id")
			if tt.pinned != "" {
				if err := os.WriteFile(idFile, []byte(tt.pinned+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			drv := &fakeDriver{}
			drv.set(ep)
			const grace = 5 * time.Millisecond
			r, err := New(Config{Node: fmt.Sprintf("host-u%d", i), Agent: client, Docker: docker, Endpoints: drv, StaleGrace: grace,
				EngineIDFile: idFile, Timeout: time.Second, Logger: testLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			passes(t, r, 4, grace)
			services, err := ourServices(ctx, client)
			if err != nil {
				t.Fatal(err)
			}
			_, registered := services[ep.ID]
			if gotStale := len(drv.got()) > 0; gotStale != tt.wantStale || registered == tt.wantStale {
				t.Errorf("reclaimed %v (want reclaimed: %v), service registered %v", drv.got(), tt.wantStale, registered)
			}
			if tt.pinned != "" {
				if b, _ := os.ReadFile(idFile); strings.TrimSpace(string(b)) != tt.pinned {
					t.Errorf("engine ID file changed to %q", b)
				}
			}
		})
	}
}

// TestSlowStartNotReclaimed: a container whose start is in progress is
// listed by the engine in its previous state ("created") without the
// endpoint, for as long as the start lasts. Its endpoint is not reclaimed
// however long that is, while an inspect of the container blocks (Docker
// holds the container's lock for the whole start), shows the endpoint
// (the live state has it from before Join), or says "restarting"; once the
// container is gone it is, after the grace period. A container created and
// never started on the same network does not hold the reclaim back.
func TestSlowStartNotReclaimed(t *testing.T) {
	agent := testenv.StartConsul(t)
	client := agentClient(t, agent)
	ctx := context.Background()
	starting := "5107" + strings.Repeat("a", 60)
	idle := "1d1e" + strings.Repeat("b", 60)
	ep := Endpoint{ID: endpointID(450), Network: "app", NetworkID: fakeNetID, IPv4: loopback(45), Register: true}

	var inspects atomic.Int32
	mode := atomic.Value{} // what an inspect of the starting container does
	mode.Store("block")
	eng := &fakeEngine{
		id:       fakeEngID,
		networks: map[string]string{fakeNetID: "app"},
		// As Docker 20.10 lists a container that was never connected:
		// the network by name, no network ID, no endpoint.
		list: []fakeContainer{{ID: starting, State: "created", Networks: map[string][2]string{"app": {"", ""}}}},
		inspect: func(w http.ResponseWriter, r *http.Request, id string) {
			inspects.Add(1)
			if id == idle {
				answerInspect(w, id, "created", "", "")
				return
			}
			if id != starting {
				http.Error(w, `{"message":"No such container"}`, http.StatusNotFound)
				return
			}
			switch mode.Load().(string) {
			case "block":
				<-r.Context().Done()
			case "owns":
				answerInspect(w, id, "created", fakeNetID, ep.ID)
			case "restarting":
				answerInspect(w, id, "restarting", fakeNetID, "")
			case "gone":
				http.Error(w, `{"message":"No such container"}`, http.StatusNotFound)
			}
		},
	}
	docker := eng.start(t)
	drv := &fakeDriver{}
	drv.set(ep)
	const grace = 20 * time.Millisecond
	r, err := New(Config{Node: "host-slow", Agent: client, Docker: docker, Endpoints: drv, StaleGrace: grace,
		Timeout: 300 * time.Millisecond, EngineIDFile: filepath.Join(t.TempDir(), "engine-id"), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	kept := func(phase string) {
		t.Helper()
		if got := drv.got(); len(got) > 0 {
			t.Fatalf("%s: reclaimed %v", phase, got)
		}
		services, err := ourServices(ctx, client)
		if err != nil {
			t.Fatal(err)
		}
		if services[ep.ID] == nil {
			t.Fatalf("%s: the endpoint's service is gone", phase)
		}
	}

	// The start holds the container's lock: inspect does not answer.
	passes(t, r, 5, grace)
	kept("inspect blocked by the start")
	if inspects.Load() == 0 {
		t.Fatal("the starting container was never inspected: the test does not test the hold-back")
	}
	// The live state shows the endpoint (the listing still does not).
	mode.Store("owns")
	passes(t, r, 4, grace)
	kept("inspect shows the endpoint")
	mode.Store("restarting")
	passes(t, r, 4, grace)
	kept("container restarting")
	// The start is over: the list shows the endpoint.
	eng.set(func(f *fakeEngine) {
		f.list = []fakeContainer{{ID: starting, State: "running", Networks: map[string][2]string{"app": {fakeNetID, ep.ID}}}}
	})
	passes(t, r, 3, grace)
	kept("container running")

	// Removed; another container on the network was created and never
	// started: it is inspected and does not own the endpoint.
	mode.Store("gone")
	eng.set(func(f *fakeEngine) {
		f.list = []fakeContainer{{ID: idle, State: "created", Networks: map[string][2]string{"app": {"", ""}}}}
	})
	if err := r.Sync(ctx); err != nil { // sees it missing
		t.Fatal(err)
	}
	if got := drv.got(); len(got) > 0 {
		t.Fatalf("reclaimed %v in the first pass that saw it missing", got)
	}
	passes(t, r, 1, grace)
	if got := drv.got(); !slices.Equal(got, []string{ep.ID}) {
		t.Fatalf("after removal and the grace period: reclaimed %v, want %s", got, ep.ID)
	}
	services, err := ourServices(ctx, client)
	if err != nil {
		t.Fatal(err)
	}
	if services[ep.ID] != nil {
		t.Errorf("reclaimed endpoint's service still registered")
	}
}

// countHandler counts records at error level.
type countHandler struct {
	slog.Handler
	errors *atomic.Int32
}

func (h countHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelError || h.Handler.Enabled(ctx, l)
}

func (h countHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Level >= slog.LevelError {
		h.errors.Add(1)
	}
	if !h.Handler.Enabled(ctx, r.Level) {
		return nil
	}
	return h.Handler.Handle(ctx, r)
}

func (h countHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return countHandler{h.Handler.WithAttrs(as), h.errors}
}

// TestEngineMismatchLoggedOnce: an engine with another ID than pinned is
// an error once per change of the engine answering, not once per pass.
func TestEngineMismatchLoggedOnce(t *testing.T) {
	agent := testenv.StartConsul(t)
	client := agentClient(t, agent)
	idFile := filepath.Join(t.TempDir(), "engine-id")
	if err := os.WriteFile(idFile, []byte(fakeEngID+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	eng := &fakeEngine{id: "OTHER:1", networks: map[string]string{fakeNetID: "app"}, list: []fakeContainer{}}
	docker := eng.start(t)
	var errs atomic.Int32
	drv := &fakeDriver{}
	ep := Endpoint{ID: endpointID(470), Network: "app", NetworkID: fakeNetID, IPv4: loopback(47), Register: true}
	drv.set(ep)
	r, err := New(Config{Node: "host-l", Agent: client, Docker: docker, Endpoints: drv, StaleGrace: time.Millisecond,
		EngineIDFile: idFile, Logger: slog.New(countHandler{testLogger(t).Handler(), &errs})})
	if err != nil {
		t.Fatal(err)
	}
	passes(t, r, 3, time.Millisecond)
	if n := errs.Load(); n != 1 {
		t.Errorf("%d error records over 3 passes with one foreign engine, want 1", n)
	}
	eng.set(func(f *fakeEngine) { f.id = "OTHER:2" })
	passes(t, r, 3, time.Millisecond)
	if n := errs.Load(); n != 2 {
		t.Errorf("%d error records after the engine changed again, want 2", n)
	}
	if got := drv.got(); len(got) > 0 {
		t.Errorf("reclaimed %v through foreign engines", got)
	}
}
