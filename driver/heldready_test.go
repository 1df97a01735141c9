package driver

import (
	"net/netip"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/ipam"
)

// TestDockerRunWhileRestoreWithinCallTimeout: the plugin restarts and its
// restore (the kernel reconcile of a busy host) takes longer than
// Config.HeldReady waits but less than the driver's own calls wait for it
// (plugin/main.go: 5 s against CallTimeout's 10 s; here 200 ms against
// 1 s). `docker run` right then: its RequestAddress comes first, and
// failed with "still restoring", although the CreateEndpoint and Join
// that follow would have waited for the restore and succeeded, as they
// did before HeldReady. Docker does not retry it; a `--restart always`
// container that dockerd starts at boot stays down.
func TestDockerRunWhileRestoreWithinCallTimeout(t *testing.T) {
	h, dp := slowRestoreHost(t, 5*keptWait)
	poolID := h.network("n1")
	h.endpoint(poolID, "n1", "ep1", "02:42:0a:01:00:02")

	// kill -9; the plugin restarts and its restore takes 2*keptWait.
	d := h.slowRestart(dp)
	time.AfterFunc(2*keptWait, func() { close(dp.gate) })

	// docker run --network n1: RequestAddress, CreateEndpoint, Join.
	a, err := h.ip.AllocateAddress(h.ctx, ipam.AddressRequest{PoolID: poolID, MAC: "02:42:0a:01:00:03"})
	if err != nil {
		t.Fatalf("docker run while the restore takes %s (the driver's calls wait %s): its address request failed: %v", 2*keptWait, 5*keptWait, err)
	}
	joinedEndpoint(t, d, "n1", "ep2", a.String())
}

// TestNetworkRmWhileRestore: the plugin restarts and its restore takes
// longer than the two releases of `docker network rm n1` wait for it
// (KeptHolds: 5 s each in plugin/main.go, here keptWait), n1 being the
// pool's last network, then DeleteNetwork waits for the restore and
// unbinds n1 (engine 29's order). The releases, kept while the driver
// could not tell, are applied once it has restored (Config.Restored): the
// pool goes, and `docker network create --subnet 10.1.0.0/24 --gateway
// 10.1.0.254` works, instead of failing until the pool sweep.
func TestNetworkRmWhileRestore(t *testing.T) {
	h, dp := slowRestoreHost(t, 5*keptWait)
	poolID := h.network("n1")

	// kill -9; the plugin restarts and its restore takes longer than the
	// two releases wait, less than DeleteNetwork does.
	d := h.slowRestart(dp)
	time.AfterFunc(3*keptWait, func() { close(dp.gate) })

	// docker network rm n1: releases, then DeleteNetwork.
	h.release(poolID)
	if err := d.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n1"}); err != nil {
		t.Fatal(err)
	}
	// The deferred releases run once the restore is done: the pool goes,
	// every key of it (its removal may still be under way when the hold
	// is).
	deadline := time.Now().Add(5 * time.Second)
	for {
		if !h.poolKeysLeft() {
			break
		}
		if time.Now().After(deadline) {
			p, g := h.holds()
			t.Fatalf("after docker network rm of the pool's last network, pool %s is still there: a holds it %d times and its gateway %d times", poolID, p, g)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// docker network create --subnet 10.1.0.0/24 --gateway 10.1.0.254.
	p, err := h.ip.AllocatePool(h.ctx, ipam.PoolRequest{Pool: h.subnet})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.ip.AllocateAddress(h.ctx, ipam.AddressRequest{PoolID: p.ID, Gateway: true, Address: netip.MustParseAddr("10.1.0.254")}); err != nil {
		t.Errorf("docker network create with another gateway after the rm: %v", err)
	}
}

// slowRestoreHost is newPoolHost whose data plane holds the kernel step of
// a restore while it is told to (a busy host's reconcile), and whose
// driver's calls wait callTimeout for a restore.
func slowRestoreHost(t *testing.T, callTimeout time.Duration) (*poolHost, *gatedDataplane) {
	t.Helper()
	var dp *gatedDataplane
	h := newPoolHost(t, poolOpts{
		driver: []func(*Config){func(c *Config) { c.CallTimeout = callTimeout }},
		dp: func(f *fakeDataplane) Dataplane {
			if dp == nil {
				dp = &gatedDataplane{fakeDataplane: f, gate: make(chan struct{})}
			}
			return dp
		}})
	return h, dp
}

// slowRestart stops host a's driver (a kill -9: nothing is cleaned up) and
// starts another, whose restore waits in the kernel step until dp's gate
// is closed. It does not wait for the restore.
func (h *poolHost) slowRestart(dp *gatedDataplane) *Driver {
	h.t.Helper()
	h.a.Close()
	dp.block.Store(true)
	d := h.newDriver()
	h.a = d
	d.Start()
	h.t.Cleanup(func() { d.Close() })
	return d
}
