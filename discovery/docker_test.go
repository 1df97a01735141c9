package discovery

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
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
	testenv.Eventually(t, 10*time.Second, func() error {
		if r.syncPasses.Load() == 0 || r.subscriptions.Load() == 0 {
			return fmt.Errorf("registrar not settled: %d passes, %d subscriptions", r.syncPasses.Load(), r.subscriptions.Load())
		}
		return nil
	})
	ep := Endpoint{ID: endpointID(200), Network: "meta-net", IPv4: loopback(200), ContainerID: id[:12], Register: true}
	r.Register(ep)

	// Until the container starts, the service has the fallback name.
	testenv.Eventually(t, 10*time.Second, func() error {
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
	testenv.Eventually(t, 10*time.Second, func() error {
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
	testenv.Eventually(t, 5*time.Second, func() error {
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
	testenv.Eventually(t, 5*time.Second, func() error {
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
// longer has are reclaimed and lose their services after passes spanning
// the grace period; the others stay, among them one whose network the
// engine does not know. A created container on the endpoints' network is
// inspected (it could be starting) and found not to own them.
func TestStaleRealEngine(t *testing.T) {
	docker := realDocker(t)
	agent := testenv.StartConsul(t)
	client := agentClient(t, agent)
	ctx := context.Background()

	none, err := dockertest.Docker(ctx, "network", "inspect", "-f", "{{.Id}}", "none")
	if err != nil {
		t.Fatal(err)
	}
	alive, _ := createContainer(t)
	removed, _ := createContainer(t)
	if _, err := dockertest.Docker(ctx, "rm", "-f", removed); err != nil {
		t.Fatal(err)
	}
	eps := []Endpoint{
		{ID: endpointID(300), Network: "n", NetworkID: none, IPv4: loopback(30), ContainerID: alive[:12], Register: true},
		{ID: endpointID(301), Network: "n", NetworkID: none, IPv4: loopback(31), ContainerID: removed[:12], Register: true},
		{ID: endpointID(302), Network: "n", NetworkID: none, IPv4: loopback(32), ContainerID: strings.Repeat("0", 12), Register: false},
		// A network this engine does not have: never reclaimed.
		{ID: endpointID(303), Network: "n", NetworkID: strings.Repeat("e", 64), IPv4: loopback(33), Register: true},
		// No container known, none lists it: reclaimed.
		{ID: endpointID(304), Network: "n", NetworkID: none, IPv4: loopback(34), Register: true},
	}
	drv := &fakeDriver{}
	drv.set(eps...)
	r, err := New(Config{Node: "host-s", Agent: client, Docker: docker, Endpoints: drv, StaleGrace: 50 * time.Millisecond,
		EngineIDFile: filepath.Join(t.TempDir(), "engine-id"), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	// No Run: Sync alone does a whole pass, including the writes. The
	// first pass takes the endpoints in, the second sees them missing,
	// the third (after the grace period) judges them.
	for i := range 2 {
		if err := r.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		if got := drv.got(); len(got) > 0 {
			t.Fatalf("pass %d reclaimed %v before the grace period", i+1, got)
		}
	}
	services, err := ourServices(ctx, client)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := sortedKeys(services), []string{eps[0].ID, eps[1].ID, eps[3].ID, eps[4].ID}; !slices.Equal(got, want) {
		t.Fatalf("before the grace period: services %v, want %v", got, want)
	}
	time.Sleep(60 * time.Millisecond)
	if err := r.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if got, want := drv.got(), []string{eps[1].ID, eps[2].ID, eps[4].ID}; !slices.Equal(got, want) {
		t.Errorf("reclaimed %v, want %v", got, want)
	}
	services, err = ourServices(ctx, client)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := sortedKeys(services), []string{eps[0].ID, eps[3].ID}; !slices.Equal(got, want) {
		t.Errorf("after the stale pass: services %v, want %v", got, want)
	}
}

// TestStaleRealEngineOtherID: the registrar pinned another engine's ID
// (DOCKER_HOST pointing at the wrong engine after a restart): nothing is
// reclaimed, however long. Deleting the file, the remedy the error names,
// pins this engine and reclaiming resumes.
func TestStaleRealEngineOtherID(t *testing.T) {
	docker := realDocker(t)
	agent := testenv.StartConsul(t)
	client := agentClient(t, agent)
	ctx := context.Background()
	none, err := dockertest.Docker(ctx, "network", "inspect", "-f", "{{.Id}}", "none")
	if err != nil {
		t.Fatal(err)
	}
	idFile := filepath.Join(t.TempDir(), "engine-id")
	if err := os.WriteFile(idFile, []byte("OTHR:ENGI:NE00:0000\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ep := Endpoint{ID: endpointID(310), Network: "n", NetworkID: none, IPv4: loopback(41), Register: true}
	drv := &fakeDriver{}
	drv.set(ep)
	r, err := New(Config{Node: "host-o", Agent: client, Docker: docker, Endpoints: drv, StaleGrace: time.Millisecond,
		EngineIDFile: idFile, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	for range 4 {
		time.Sleep(2 * time.Millisecond)
		if err := r.Sync(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if got := drv.got(); len(got) > 0 {
		t.Fatalf("reclaimed %v through an engine with another ID", got)
	}
	if services, err := ourServices(ctx, client); err != nil || services[ep.ID] == nil {
		t.Fatalf("service of the endpoint gone (%v): %v", err, services)
	}
	if err := os.Remove(idFile); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		time.Sleep(2 * time.Millisecond)
		if err := r.Sync(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if got := drv.got(); !slices.Equal(got, []string{ep.ID}) {
		t.Errorf("after re-pinning: reclaimed %v, want %s", got, ep.ID)
	}
	b, err := os.ReadFile(idFile)
	if err != nil {
		t.Fatal(err)
	}
	info, err := docker.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(string(b)) != info.ID {
		t.Errorf("engine ID file holds %q, want %q", b, info.ID)
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
	held := &fakeDriver{}
	held.set(ep(1), ep(2))

	// Left over from an earlier run of this node, of another node sharing
	// the agent, and somebody else's service.
	otherNode := buildServices(owner{node: "host-other"}, ep(8), nil)[0]
	for _, reg := range append(buildServices(owner{node: "host-h"}, ep(9), nil), otherNode) {
		if err := client.Agent().ServiceRegister(reg); err != nil {
			t.Fatal(err)
		}
	}
	if err := client.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "foreign", Name: "foreign"}); err != nil {
		t.Fatal(err)
	}

	r, err := New(Config{Node: "host-h", Agent: client, Endpoints: held, Logger: testLogger(t)})
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
	changed := buildServices(owner{node: "host-h"}, ep(2), nil)[0]
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

// stuckListener returns the port of a loopback TCP listener whose accept
// queue is full and never drained: a connection to it hangs until the
// dialer's timeout (SYNs are dropped).
func stuckListener(t *testing.T) int {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	port := sa.(*syscall.SockaddrInet4).Port
	for range 3 { // fill the queue; later ones just hang
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 200*time.Millisecond)
		if err == nil {
			t.Cleanup(func() { c.Close() })
		}
	}
	return port
}

// TestSlowStartRealEngine holds a real container in a slow start: its
// fluentd log driver dials a listener that never accepts, which the
// engine does after connecting the container's networks and before the
// start is over (about 3 s, the driver's dial timeout, then the start
// fails). Meanwhile the engine lists it "created" without endpoints. A
// held endpoint on its network is not reclaimed during the start
// (inspecting the container blocks on its lock), while one on a network
// it is not attached to is, after the grace period. Once the start is
// over the first one is judged too (it was never really the container's).
func TestSlowStartRealEngine(t *testing.T) {
	docker := realDocker(t)
	agent := testenv.StartConsul(t)
	client := agentClient(t, agent)
	ctx := context.Background()
	netID := func(name string) string {
		id, err := dockertest.Docker(ctx, "network", "inspect", "-f", "{{.Id}}", name)
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	port := stuckListener(t)
	id, _ := createContainer(t, "--log-driver", "fluentd", "--log-opt", fmt.Sprintf("fluentd-address=tcp://127.0.0.1:%d", port))
	onIts := Endpoint{ID: endpointID(800), Network: "none", NetworkID: netID("none"), IPv4: loopback(80), Register: true}
	elsewhere := Endpoint{ID: endpointID(801), Network: "host", NetworkID: netID("host"), IPv4: loopback(81), Register: true}
	drv := &fakeDriver{}
	drv.set(onIts, elsewhere)
	const grace = 300 * time.Millisecond
	r, err := New(Config{Node: "host-ss", Agent: client, Docker: docker, Endpoints: drv, StaleGrace: grace,
		Timeout: 500 * time.Millisecond, EngineIDFile: filepath.Join(t.TempDir(), "engine-id"), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Sync(ctx); err != nil { // takes the endpoints in
		t.Fatal(err)
	}

	started := time.Now()
	done := make(chan error, 1)
	go func() {
		_, err := dockertest.Docker(ctx, "start", id)
		done <- err
	}()
	// The start lasts at least the log driver's 3 s dial timeout; passes
	// (each up to Timeout) run until 2.2 s into it, so all of them end
	// before the start does.
	time.Sleep(200 * time.Millisecond)
	passesDuring := 0
	for time.Since(started) < 2200*time.Millisecond {
		if err := r.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		passesDuring++
		time.Sleep(100 * time.Millisecond)
	}
	observed := time.Since(started)
	during := drv.got()
	select {
	case err := <-done:
		t.Fatalf("docker start returned within %s (%v): the container was not held in a slow start", observed, err)
	default:
	}
	if !slices.Equal(during, []string{elsewhere.ID}) {
		t.Fatalf("during the first %s of the start (%d passes): reclaimed %v, want only %s", observed.Round(time.Millisecond), passesDuring, during, elsewhere.ID)
	}
	err = <-done
	t.Logf("docker start returned after %s: %v", time.Since(started).Round(time.Millisecond), err)
	testenv.Eventually(t, 10*time.Second, func() error {
		if err := r.Sync(ctx); err != nil {
			return err
		}
		if got := drv.got(); !slices.Equal(got, []string{onIts.ID, elsewhere.ID}) {
			return fmt.Errorf("after the start: reclaimed %v", got)
		}
		return nil
	})
}
