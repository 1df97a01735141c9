package discovery

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/dockerapi"
	"consul-overlay/internal/dockertest"
	"consul-overlay/internal/testenv"
)

// realDocker returns a client of the machine's engine and makes sure the
// test image exists.
func realDocker(t *testing.T) *dockerapi.Client {
	t.Helper()
	dockertest.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	root, err := dockertest.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if err := dockertest.BuildBusybox(ctx, root); err != nil {
		t.Fatalf("build test image: %v", err)
	}
	sock, err := dockerapi.SocketPath(os.Getenv)
	if err != nil {
		t.Fatal(err)
	}
	c := dockerapi.New(sock)
	t.Cleanup(c.Close)
	return c
}

// createContainer creates (not starts) a container without networking
// and removes it when the test ends.
func createContainer(t *testing.T, args ...string) (id, name string) {
	return dockertest.CreateContainer(t, "discovery-test-", append([]string{"--network", "none"}, args...)...)
}

// TestMetadataCompletion registers an endpoint before its container
// starts, as Join does, and measures how long after `docker start` the
// service carries the container's settings.
func TestMetadataCompletion(t *testing.T) {
	docker := realDocker(t)
	agent := testenv.StartConsul(t)
	client := agentClient(t, agent)
	ctx := context.Background()

	id, name := createContainer(t, "-l", "SERVICE_NAME=web", "-e", "SERVICE_TAGS=a,b", "-l", "SERVICE_REGION=eu")
	r := startRegistrar(t, Config{Node: "host-m", Agent: client, Docker: docker, Interval: time.Hour, RetryMax: time.Second})
	// Wait for Run's first anti-entropy pass and event subscription, whose
	// catch-ups would inspect the (created) container right away: this
	// test is about the path through the start event.
	eventually(t, 10*time.Second, func() error {
		if r.syncPasses.Load() == 0 || r.subscriptions.Load() == 0 {
			return fmt.Errorf("registrar not settled: %d passes, %d subscriptions", r.syncPasses.Load(), r.subscriptions.Load())
		}
		return nil
	})
	ep := Endpoint{ID: endpointID(200), Network: "meta-net", IPv4: loopback(200), ContainerID: id[:12], Register: true}
	r.Register(ep)

	// Until the container starts, the service has the fallback name.
	eventually(t, 10*time.Second, func() error {
		services, err := ourServices(ctx, client)
		if err != nil {
			return err
		}
		if s := services[ep.ID]; s == nil || s.Service != "meta-net" {
			return fmt.Errorf("services %v, want %s named meta-net", services, ep.ID)
		}
		return nil
	})

	before := time.Now()
	if _, err := dockertest.Docker(ctx, "start", id); err != nil {
		t.Fatal(err)
	}
	started := time.Now()
	var done time.Time
	eventually(t, 10*time.Second, func() error {
		services, err := ourServices(ctx, client)
		if err != nil {
			return err
		}
		s := services[ep.ID]
		if s == nil || s.Service != "web" || !slices.Equal(s.Tags, []string{"a", "b"}) ||
			s.Meta[MetaContainerName] != name || s.Meta[MetaContainerID] != id || s.Meta["region"] != "eu" {
			return fmt.Errorf("service %+v, want web with tags a,b and the container's meta", s)
		}
		done = time.Now()
		return nil
	})
	out, err := dockertest.Docker(ctx, "inspect", "-f", "{{.State.StartedAt}}", id)
	if err != nil {
		t.Fatal(err)
	}
	startedAt, err := time.Parse(time.RFC3339Nano, out)
	if err != nil {
		t.Fatalf("container StartedAt %q: %v", out, err)
	}
	latency := done.Sub(startedAt)
	t.Logf("service complete %s after the container started (State.StartedAt), %s after `docker start` returned, %s after it was called",
		latency.Round(time.Millisecond), done.Sub(started).Round(time.Millisecond), done.Sub(before).Round(time.Millisecond))
	if latency > time.Second {
		t.Errorf("metadata completed %s after the container started, want within 1s", latency)
	}

	// A second endpoint of the same container (another network) gets the
	// cached metadata at once, without an event.
	ep2 := Endpoint{ID: endpointID(201), Network: "other", IPv4: loopback(201), ContainerID: id[:12], Register: true,
		ServicePrefix: "o-"}
	r.Register(ep2)
	eventually(t, 5*time.Second, func() error {
		services, err := ourServices(ctx, client)
		if err != nil {
			return err
		}
		if s := services[ep2.ID]; s == nil || s.Service != "o-web" {
			return fmt.Errorf("second endpoint's service %+v, want o-web", s)
		}
		return nil
	})

	// An endpoint of a container that is already running and whose events
	// are long past (a registrar started after the container) gets its
	// metadata from anti-entropy's catch-up.
	id3, _ := createContainer(t, "-l", "com.docker.compose.service=api")
	if _, err := dockertest.Docker(ctx, "start", id3); err != nil {
		t.Fatal(err)
	}
	r2 := startRegistrar(t, Config{Node: "host-m2", Agent: client, Docker: docker, Interval: time.Hour})
	ep3 := Endpoint{ID: endpointID(202), Network: "late", IPv4: loopback(202), ContainerID: id3[:12], Register: true}
	r2.Register(ep3)
	if err := r2.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, func() error {
		services, err := ourServices(ctx, client)
		if err != nil {
			return err
		}
		if s := services[ep3.ID]; s == nil || s.Service != "api" {
			return fmt.Errorf("late endpoint's service %+v, want api (compose label)", s)
		}
		return nil
	})
}

// TestStaleRealEngine: held endpoints whose containers the engine no
// longer has are reported and lose their services; the others stay.
func TestStaleRealEngine(t *testing.T) {
	docker := realDocker(t)
	agent := testenv.StartConsul(t)
	client := agentClient(t, agent)
	ctx := context.Background()

	alive, _ := createContainer(t)
	removed, _ := createContainer(t)
	if _, err := dockertest.Docker(ctx, "rm", "-f", removed); err != nil {
		t.Fatal(err)
	}
	eps := []Endpoint{
		{ID: endpointID(300), Network: "n", IPv4: loopback(30), ContainerID: alive[:12], Register: true},
		{ID: endpointID(301), Network: "n", IPv4: loopback(31), ContainerID: removed[:12], Register: true},
		{ID: endpointID(302), Network: "n", IPv4: loopback(32), ContainerID: strings.Repeat("0", 12), Register: false},
		{ID: endpointID(303), Network: "n", IPv4: loopback(33), Register: true}, // container unknown: never stale
	}
	held := &heldList{}
	held.set(eps...)
	stale := &staleLog{}
	r, err := New(Config{Node: "host-s", Agent: client, Docker: docker, Held: held.held, OnStale: stale.onStale, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	// No Run: Sync alone does a whole pass, including the writes.
	if err := r.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	services, err := ourServices(ctx, client)
	if err != nil {
		t.Fatal(err)
	}
	// The first pass takes the endpoints in; the next judges them.
	if got, want := sortedKeys(services), []string{eps[0].ID, eps[1].ID, eps[3].ID}; !slices.Equal(got, want) {
		t.Fatalf("after the first pass: services %v, want %v", got, want)
	}
	if err := r.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if got, want := stale.get(), []string{eps[1].ID, eps[2].ID}; !slices.Equal(got, want) {
		t.Errorf("OnStale called for %v, want %v", got, want)
	}
	services, err = ourServices(ctx, client)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := sortedKeys(services), []string{eps[0].ID, eps[3].ID}; !slices.Equal(got, want) {
		t.Errorf("after the stale pass: services %v, want %v", got, want)
	}
}

// fakeDocker serves an engine that answers /version and either lists the
// given containers or fails.
func fakeDocker(t *testing.T, list func(w http.ResponseWriter)) *dockerapi.Client {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "docker.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/version":
			fmt.Fprint(w, `{"ApiVersion":"1.41"}`)
		case strings.HasSuffix(r.URL.Path, "/containers/json"):
			list(w)
		case strings.HasSuffix(r.URL.Path, "/events"):
			w.WriteHeader(http.StatusServiceUnavailable)
		default:
			http.NotFound(w, r)
		}
	}))
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	c := dockerapi.New(sock)
	t.Cleanup(c.Close)
	return c
}

// TestStaleNeverFromUnavailableEngine: an engine that fails, or is not
// there at all, never makes an endpoint stale; one that answers does.
func TestStaleNeverFromUnavailableEngine(t *testing.T) {
	agent := testenv.StartConsul(t)
	client := agentClient(t, agent)
	ctx := context.Background()
	ep := Endpoint{ID: endpointID(400), Network: "n", IPv4: loopback(40), ContainerID: "abcabcabcabc", Register: true}

	failing := fakeDocker(t, func(w http.ResponseWriter) { http.Error(w, `{"message":"daemon busy"}`, 500) })
	emptyList := fakeDocker(t, func(w http.ResponseWriter) { fmt.Fprint(w, `[]`) })
	listed := fakeDocker(t, func(w http.ResponseWriter) { fmt.Fprint(w, `[{"Id":"abcabcabcabc`+strings.Repeat("1", 52)+`"}]`) })
	absent := dockerapi.New(filepath.Join(t.TempDir(), "no.sock"))

	for _, tt := range []struct {
		name      string
		docker    *dockerapi.Client
		wantStale bool
	}{
		{"no docker client", nil, false},
		{"socket absent", absent, false},
		{"engine fails", failing, false},
		{"engine lists the container", listed, false},
		{"engine answers without it", emptyList, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			held := &heldList{}
			held.set(ep)
			stale := &staleLog{}
			r, err := New(Config{Node: "host-u", Agent: client, Docker: tt.docker, Held: held.held, OnStale: stale.onStale, Logger: testLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			r.Register(ep)
			for range 2 {
				if err := r.Sync(ctx); err != nil {
					t.Fatal(err)
				}
			}
			services, err := ourServices(ctx, client)
			if err != nil {
				t.Fatal(err)
			}
			_, registered := services[ep.ID]
			if gotStale := len(stale.get()) > 0; gotStale != tt.wantStale || registered == tt.wantStale {
				t.Errorf("stale reported %v (want %v), service registered %v", stale.get(), tt.wantStale, registered)
			}
		})
	}
}

// TestHeldFollowsDriver: anti-entropy adds what the driver holds and the
// agent lacks, drops what it no longer holds, removes our services nobody
// holds (left over from an earlier run), leaves other nodes' and foreign
// services alone, and repairs a service changed behind its back.
func TestHeldFollowsDriver(t *testing.T) {
	agent := testenv.StartConsul(t)
	client := agentClient(t, agent)
	ctx := context.Background()
	ep := func(n int) Endpoint {
		return Endpoint{ID: endpointID(500 + n), Network: "n", IPv4: loopback(50 + n), Register: true}
	}
	held := &heldList{}
	held.set(ep(1), ep(2))

	// Left over from an earlier run of this node, of another node sharing
	// the agent, and somebody else's service.
	otherNode := buildServices("host-other", ep(8), nil)[0]
	for _, reg := range append(buildServices("host-h", ep(9), nil), otherNode) {
		if err := client.Agent().ServiceRegister(reg); err != nil {
			t.Fatal(err)
		}
	}
	if err := client.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "foreign", Name: "foreign"}); err != nil {
		t.Fatal(err)
	}

	r, err := New(Config{Node: "host-h", Agent: client, Held: held.held, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	check := func(want ...string) {
		t.Helper()
		if err := r.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		all, err := client.Agent().Services()
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(want)
		if got := sortedKeys(all); !slices.Equal(got, want) {
			t.Fatalf("agent services %v, want %v", got, want)
		}
	}
	check(ep(1).ID, ep(2).ID, otherNode.ID, "foreign")

	held.set(ep(2), ep(3))
	check(ep(2).ID, ep(3).ID, otherNode.ID, "foreign")

	// Changed behind our back: anti-entropy puts it back.
	changed := buildServices("host-h", ep(2), nil)[0]
	changed.Tags = []string{"tampered"}
	changed.Port = 1
	if err := client.Agent().ServiceRegister(changed); err != nil {
		t.Fatal(err)
	}
	check(ep(2).ID, ep(3).ID, otherNode.ID, "foreign")
	all, _ := client.Agent().Services()
	if s := all[ep(2).ID]; len(s.Tags) != 0 || s.Port != 0 {
		t.Errorf("tampered service not repaired: %+v", s)
	}

	// A Deregister wins over a Held snapshot that still lists the
	// endpoint (Leave happens before the driver forgets it).
	r.Deregister(ep(3).ID)
	check(ep(2).ID, otherNode.ID, "foreign")
}
