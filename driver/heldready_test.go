package driver

import (
	"testing"
	"time"

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
	var dp *gatedDataplane
	h := newPoolHost(t, poolOpts{
		driver: []func(*Config){func(c *Config) { c.CallTimeout = 5 * keptWait }},
		dp: func(f *fakeDataplane) Dataplane {
			if dp == nil {
				dp = &gatedDataplane{fakeDataplane: f, gate: make(chan struct{})}
			}
			return dp
		}})
	poolID := h.network("n1")
	h.endpoint(poolID, "n1", "ep1", "02:42:0a:01:00:02")

	// kill -9; the plugin restarts and its restore takes 2*keptWait.
	h.a.Close()
	dp.block.Store(true)
	d := h.newDriver()
	h.a = d
	d.Start()
	t.Cleanup(func() { d.Close() })
	time.AfterFunc(2*keptWait, func() { close(dp.gate) })

	// docker run --network n1: RequestAddress, CreateEndpoint, Join.
	a, err := h.ip.AllocateAddress(h.ctx, ipam.AddressRequest{PoolID: poolID, MAC: "02:42:0a:01:00:03"})
	if err != nil {
		t.Fatalf("docker run while the restore takes %s (the driver's calls wait %s): its address request failed: %v", 2*keptWait, 5*keptWait, err)
	}
	joinedEndpoint(t, d, "n1", "ep2", a.String())
}
