package dockertest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDockerDataplaneNamespace: the managed plugin built with the
// data-plane namespace's privileges (make plugin PLUGIN_DATAPLANE=1) and
// set DATAPLANE_NAMESPACE keeps a network's bridge, VXLAN device and
// endpoint ports in a namespace pinned under /run/consul-overlay, and only
// the gateway link and the containers' ends in the host's namespace. The
// namespace, and with it the containers' links, outlive a kill -9 of the
// plugin (no echo request lost while Docker restarts it) and a `docker
// plugin disable -f`; the plugin, enabled again, takes the network back,
// and a new container joins it. Removing the network leaves nothing in the
// namespace.
func TestDockerDataplaneNamespace(t *testing.T) {
	enginePID, err := EnginePID()
	if err != nil {
		t.Fatal(err)
	}
	nsName := UniqueName("codt-dp-")
	pin := filepath.Join("/run/consul-overlay", nsName)
	t.Cleanup(func() { // after the plugin's removal: cleanups run last first
		run(context.Background(), "", nil, "umount", "-l", pin)
		os.Remove(pin)
	})
	ref, id := testPlugin(t, "consul-overlay-dockertest:dp", []string{"PLUGIN_DATAPLANE=1"},
		"DATAPLANE_NAMESPACE="+nsName, "HOST_PID="+strconv.Itoa(enginePID))
	ctx := t.Context()
	netName := UniqueName("codt-")
	c1, c2, c3 := netName+"-c1", netName+"-c2", netName+"-c3"
	t.Cleanup(func() {
		if t.Failed() {
			dump(t, ref, id, netName, c1, c2)
		}
	})

	third := 1 + rand.IntN(254)
	subnet := netip.MustParsePrefix(fmt.Sprintf("10.124.%d.0/24", third))
	removeOnCleanup(t, netName, c1, c2, c3)
	if _, err := Docker(ctx, "network", "create", "-d", ref, "--ipam-driver", ref,
		"--subnet", subnet.String(), netName); err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{c1, c2} {
		if _, err := Docker(ctx, "run", "-d", "--name", c, "--network", netName, BusyboxImage, "sleep", "3600"); err != nil {
			t.Fatal(err)
		}
	}
	ip2 := containerIP(t, c2, netName)
	if err := ping(ctx, c1, ip2.String()); err != nil {
		t.Fatalf("ping %s from %s: %v", ip2, c1, err)
	}

	// The layout: the bridge, the VXLAN device, the endpoints' and the
	// gateway's ports in the pinned namespace; the gateway link, holding
	// the gateway address, in the host's.
	dpLinks := func() []string {
		out, err := run(ctx, "", nil, "nsenter", "--net="+pin, "ip", "-o", "link", "show")
		if err != nil {
			t.Fatalf("links of the data-plane namespace %s: %v", pin, err)
		}
		return slices.DeleteFunc(linkNames(out), func(name string) bool { return name == "lo" })
	}
	have := map[string]int{}
	for _, l := range dpLinks() {
		have[l[:strings.Index(l, "-")+1]]++
	}
	if have["vxbr-"] != 1 || have["vx-"] != 1 || have["vxp-"] != 1 || have["vxh-"] != 2 {
		t.Errorf("data-plane namespace holds %v, want one bridge, one VXLAN device, one gateway port and two endpoint ports", dpLinks())
	}
	host, err := HostLinks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for l := range host {
		if strings.HasPrefix(l, "vxbr-") || strings.HasPrefix(l, "vxh-") {
			t.Errorf("host namespace holds %s: the bridge and its ports belong in the data-plane namespace", l)
		}
	}

	// kill -9: Docker restarts the plugin; the namespace holds the links.
	pingThroughKill(ctx, t, id, c1, ip2.String())

	// Disabled, nothing holds the namespace but its pin.
	if _, err := Docker(ctx, "plugin", "disable", "-f", ref); err != nil {
		t.Fatal(err)
	}
	if err := ping(ctx, c1, ip2.String()); err != nil {
		t.Errorf("ping %s from %s with the plugin disabled: %v", ip2, c1, err)
	}
	if _, err := Docker(ctx, "plugin", "enable", "--timeout", "30", ref); err != nil {
		t.Fatal(err)
	}
	if _, err := Docker(ctx, "run", "-d", "--name", c3, "--network", netName, BusyboxImage, "sleep", "3600"); err != nil {
		t.Fatalf("a container joining after the plugin came back: %v", err)
	}
	ip3 := containerIP(t, c3, netName)
	if err := ping(ctx, c3, ip2.String()); err != nil {
		t.Errorf("ping %s from the new container %s: %v", ip2, c3, err)
	}
	if ip3 == ip2 || ip3 == containerIP(t, c1, netName) {
		t.Errorf("the new container got %s, a running container's address", ip3)
	}

	// Removed, the network leaves nothing in the namespace.
	if _, err := Docker(ctx, "rm", "-f", c1, c2, c3); err != nil {
		t.Fatal(err)
	}
	if _, err := Docker(ctx, "network", "rm", netName); err != nil {
		t.Fatal(err)
	}
	if left := dpLinks(); len(left) != 0 {
		t.Errorf("data-plane namespace after the network's removal: %v", left)
	}
}

// pingThroughKill sends 30 echo requests, 0.2 s apart, from container to
// dst while the plugin with ID id is killed with SIGKILL a second in; it
// fails t unless every request is answered and Docker starts the plugin
// again.
func pingThroughKill(ctx context.Context, t *testing.T, id, container, dst string) {
	t.Helper()
	pid, err := pluginPIDByID(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		out string
		err error
	}
	flood := make(chan result, 1)
	go func() {
		out, err := Docker(ctx, "exec", container, "ping", "-c", "30", "-i", "0.2", "-W", "1", dst)
		flood <- result{out, err}
	}()
	time.Sleep(time.Second)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if r := <-flood; r.err != nil || !strings.Contains(r.out, " 0% packet loss") {
		t.Errorf("echo requests from %s to %s across a kill -9 of the plugin: %v\n%s", container, dst, r.err, r.out)
	}
	if err := Eventually(ctx, 30*time.Second, func(ctx context.Context) error {
		p, err := pluginPIDByID(ctx, id)
		if err == nil && p == pid {
			return fmt.Errorf("plugin pid still %d", p)
		}
		return err
	}); err != nil {
		t.Fatalf("plugin back after kill -9: %v", err)
	}
}

// pluginPIDByID is the process of the managed plugin with ID id: the child
// of the containerd shim that runs it (README, Troubleshooting).
func pluginPIDByID(ctx context.Context, id string) (int, error) {
	shim, err := run(ctx, "", nil, "pgrep", "-o", "-f", "--", "-id "+id)
	if err != nil {
		return 0, fmt.Errorf("no shim of plugin %s: %w", id, err)
	}
	child, err := run(ctx, "", nil, "pgrep", "-o", "-P", strings.TrimSpace(shim))
	if err != nil {
		return 0, fmt.Errorf("no process under the shim %s of plugin %s: %w", strings.TrimSpace(shim), id, err)
	}
	return strconv.Atoi(strings.TrimSpace(child))
}

// testPlugin requires the engine and the busybox image, builds a plugin of
// the test's own named prefix plus a unique suffix (make plugin with
// vars), sets settings (and the engine's) on it and enables it; it is
// disabled and removed when the test ends.
func testPlugin(t *testing.T, prefix string, vars []string, settings ...string) (ref, id string) {
	t.Helper()
	Require(t)
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	requireBusybox(t)
	if err := BuildBusybox(ctx, root); err != nil {
		t.Fatalf("make busybox-image: %v", err)
	}
	ref = UniqueName(prefix)
	start := time.Now()
	if err := BuildPlugin(ctx, root, ref, t.TempDir(), vars...); err != nil {
		t.Fatalf("make plugin %v: %v", vars, err)
	}
	t.Logf("make plugin %s: %s", ref, time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		Docker(ctx, "plugin", "disable", "-f", ref)
		Docker(ctx, "plugin", "rm", "-f", ref)
	})
	engine, err := EngineSettings()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Docker(ctx, append(append([]string{"plugin", "set", ref, "data.source=" + t.TempDir(), "LOG_LEVEL=debug"}, settings...), engine...)...); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	if _, err := Docker(ctx, "plugin", "enable", "--timeout", "30", ref); err != nil {
		t.Fatal(err)
	}
	t.Logf("docker plugin enable: %s", time.Since(start).Round(time.Millisecond))
	if id, err = Docker(ctx, "plugin", "inspect", "-f", "{{.Id}}", ref); err != nil {
		t.Fatal(err)
	}
	return ref, id
}

// removeOnCleanup removes the containers and then the network when the
// test ends.
func removeOnCleanup(t *testing.T, network string, containers ...string) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		Docker(ctx, append([]string{"rm", "-f"}, containers...)...)
		Docker(ctx, "network", "rm", network)
	})
}
