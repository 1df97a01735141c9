package dockerapi

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"consul-overlay/internal/dockertest"
)

// realEngine returns a client of the machine's engine, built as the
// plugin builds it, and makes sure the test image exists.
func realEngine(t *testing.T) *Client {
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
	sock, err := SocketPath(os.Getenv)
	if err != nil {
		t.Fatal(err)
	}
	c := New(sock)
	t.Cleanup(c.Close)
	return c
}

// createContainer creates (not starts) a container from the test image and
// removes it when the test ends.
func createContainer(t *testing.T, args ...string) (id, name string) {
	return dockertest.CreateContainer(t, "dockerapi-test-", args...)
}

func TestEngineInspectList(t *testing.T) {
	c := realEngine(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	v, err := c.Negotiate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("negotiated API version %s", v)

	id, name := createContainer(t, "-l", "SERVICE_NAME=web", "-l", "com.docker.compose.service=front", "-e", "SERVICE_TAGS=a,b")
	for _, ref := range []string{id, id[:12], name} {
		got, err := c.Inspect(ctx, ref)
		if err != nil {
			t.Fatalf("Inspect(%s): %v", ref, err)
		}
		if got.ID != id || got.Name != name || got.Labels["SERVICE_NAME"] != "web" ||
			got.Labels["com.docker.compose.service"] != "front" || !slices.Contains(got.Env, "SERVICE_TAGS=a,b") || got.Running {
			t.Fatalf("Inspect(%s) = %+v", ref, got)
		}
	}
	if _, err := c.Inspect(ctx, strings.Repeat("f", 64)); !errors.Is(err, ErrNotFound) {
		t.Errorf("Inspect(absent) = %v, want ErrNotFound", err)
	}

	list, err := c.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(list, func(s Summary) bool { return s.ID == id })
	if i < 0 {
		t.Fatalf("List does not hold created container %s (all=true)", id)
	}
	if s := list[i]; !slices.Contains(s.Names, name) || s.State != "created" || s.Labels["SERVICE_NAME"] != "web" {
		t.Errorf("List entry = %+v", s)
	}
}

func TestEngineEvents(t *testing.T) {
	c := realEngine(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	id, _ := createContainer(t)

	filters := map[string][]string{"type": {"container"}, "event": {"start", "die", "destroy"}, "container": {id}}
	sctx, stop := context.WithCancel(ctx)
	evs, errc, err := c.Events(sctx, time.Time{}, filters)
	if err != nil {
		t.Fatal(err)
	}
	before := time.Now()
	if _, err := dockertest.Docker(ctx, "start", id); err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-evs:
		if ev.Type != "container" || ev.Action != "start" || ev.ActorID != id {
			t.Fatalf("first event = %+v, want start of %s", ev, id)
		}
		t.Logf("start event %s after docker start began", time.Since(before))
	case err := <-errc:
		t.Fatalf("stream ended: %v", err)
	case <-ctx.Done():
		t.Fatal("no start event")
	}
	stop()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("stream error after cancel = %v", err)
	}

	// since replays what the engine still holds.
	evs, errc, err = c.Events(ctx, before.Add(-time.Second), filters)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-evs:
		if ev.Action != "start" || ev.ActorID != id {
			t.Fatalf("replayed event = %+v, want start of %s", ev, id)
		}
	case err := <-errc:
		t.Fatalf("stream ended: %v", err)
	case <-ctx.Done():
		t.Fatal("start event not replayed with since")
	}
	cancel()
	<-errc
}

// TestEngineInfoNetworks: the engine has an ID, knows its "none" network
// and not an absent one, and a created container lists its attachment
// by name without an endpoint (endpoints exist only while it runs); the
// engine (20.10) fills in NetworkID only once it is connected.
func TestEngineInfoNetworks(t *testing.T) {
	c := realEngine(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	info, err := c.Info(ctx)
	if err != nil || info.ID == "" {
		t.Fatalf("Info = %+v, %v", info, err)
	}
	n, err := c.InspectNetwork(ctx, "none")
	if err != nil || n.ID == "" || n.Name != "none" {
		t.Fatalf("InspectNetwork(none) = %+v, %v", n, err)
	}
	if _, err := c.InspectNetwork(ctx, strings.Repeat("e", 64)); !errors.Is(err, ErrNotFound) {
		t.Errorf("InspectNetwork(absent) = %v, want ErrNotFound", err)
	}
	id, _ := createContainer(t, "--network", "none")
	list, err := c.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(list, func(s Summary) bool { return s.ID == id })
	if i < 0 {
		t.Fatalf("List lacks %s", id)
	}
	if a := list[i].Networks; len(a) != 1 || a[0].Name != "none" || a[0].EndpointID != "" || (a[0].NetworkID != "" && a[0].NetworkID != n.ID) {
		t.Errorf("created container's attachments %+v, want none (ID %s or empty) without an endpoint", a, n.ID)
	}
}

// TestEngineNetworkContainers: the engine's network inspect counts running
// containers only; NetworkContainers counts a created (never started) and
// a stopped container too, which the engine would let a network removal
// strand.
func TestEngineNetworkContainers(t *testing.T) {
	c := realEngine(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	name := "dockerapi-test-users-" + strings.ReplaceAll(time.Now().Format("150405.000"), ".", "")
	id, err := c.CreateNetwork(ctx, NetworkCreate{Name: name, Driver: "bridge", Internal: true,
		IPAM: NetworkIPAM{Config: []NetworkIPAMConfig{{Subnet: "10.213.77.0/24"}}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.RemoveNetwork(context.Background(), id) })
	if n, err := c.NetworkContainers(ctx, id, name); err != nil || n != 0 {
		t.Fatalf("NetworkContainers of a new network = %d, %v; want 0", n, err)
	}
	cid, _ := createContainer(t, "--network", name)
	d, err := c.InspectNetworkDetail(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	n, err := c.NetworkContainers(ctx, id, name)
	if err != nil || n != 1 {
		t.Fatalf("NetworkContainers = %d, %v; want 1 (the created container; inspect counts %d)", n, err, d.Containers)
	}
	// Started and stopped: attached by ID now, and still not running.
	if out, err := exec.CommandContext(ctx, "docker", "start", cid).CombinedOutput(); err != nil {
		t.Fatalf("docker start: %v: %s", err, out)
	}
	if out, err := exec.CommandContext(ctx, "docker", "stop", "-t", "0", cid).CombinedOutput(); err != nil {
		t.Fatalf("docker stop: %v: %s", err, out)
	}
	if n, err := c.NetworkContainers(ctx, id, name); err != nil || n != 1 {
		t.Fatalf("NetworkContainers with the container stopped = %d, %v; want 1", n, err)
	}
}
