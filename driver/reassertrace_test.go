package driver

import (
	"context"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/cluster"
	"consul-overlay/ipam"
	"consul-overlay/reaper"
	"consul-overlay/vxlan"
)

// joinHook is a reaper.Rejoiner that runs after each Join: what Docker
// does on this host while the re-assertion runs.
type joinHook struct {
	*cluster.Cluster
	after func()
}

func (j joinHook) Join(ctx context.Context, key, networkID string, spec cluster.NetworkSpec) (cluster.Network, error) {
	n, err := j.Cluster.Join(ctx, key, networkID, spec)
	if err == nil && j.after != nil {
		j.after()
	}
	return n, err
}

// TestReassertRaceNewContainerGetsRunningAddress: host a alone runs
// network app (n1, container ep1 with 10.1.0.2) and is evicted while it
// is away: its membership, ep1's record, its address and the pool (a was
// its only holder) go. Back, the liveness check re-asserts: the pool (a
// new pool record, no cursor), the gateway, the membership, then ep1's
// address. Between the membership and ep1's address, `docker run
// --network app` on a: RequestAddress hands out the first free address
// after the gateway, 10.1.0.2, ep1's, and CreateEndpoint and Join succeed
// (the membership is back). The re-assertion of ep1's address then finds
// it held by this host and takes it for its own: two containers of a run
// with 10.1.0.2 on one overlay, and nothing is reported.
func TestReassertRaceNewContainerGetsRunningAddress(t *testing.T) {
	reassertRace(t, false)
}

// TestReassertRaceNewContainerGetsRunningAddressStatic: as
// TestReassertRaceNewContainerGetsRunningAddress, the new container asking
// for ep1's address (docker run --ip 10.1.0.2): its record is gone, so it
// is granted.
func TestReassertRaceNewContainerGetsRunningAddressStatic(t *testing.T) {
	reassertRace(t, true)
}

func reassertRace(t *testing.T, static bool) {
	h := newPoolHost(t, poolOpts{driver: []func(*Config){func(c *Config) { c.Reapable = true }}})
	poolID := h.network("n1")
	ep1 := h.endpoint(poolID, "n1", "ep1", "02:42:0a:01:00:02")

	// The eviction comes minutes later: the IPAM's view of the pool
	// from ep1's allocation (reused for a second) has expired.
	time.Sleep(1100 * time.Millisecond)
	h.evicted()
	if holder := h.heldBy(ep1.Addr()); holder != "" {
		t.Fatalf("after the eviction ep1's address is held by %q: the test proves nothing", holder)
	}

	// docker run --network app on a, while the re-assertion runs.
	var ep2 netip.Prefix
	run := func() {
		req := ipam.AddressRequest{PoolID: poolID, MAC: "02:42:0a:01:00:99"}
		if static {
			req.Address = ep1.Addr()
		}
		x, err := h.ip.AllocateAddress(h.ctx, req)
		if err != nil {
			return // refused: nothing handed out
		}
		if _, err := h.a.CreateEndpoint(epReq("n1", "ep2", x.String())); err != nil {
			h.ip.FreeAddress(h.ctx, poolID, x.Addr()) // Docker's rollback
			return
		}
		if _, err := h.a.Join(&network.JoinRequest{NetworkID: "n1", EndpointID: "ep2", SandboxKey: "/var/run/docker/netns/ep2"}); err != nil {
			t.Fatal(err)
		}
		ep2 = x
	}
	local, _ := localOf(t, h.a)
	rep, err := reaper.Reassert(h.ctx, "a", "a", joinHook{Cluster: h.a.cl, after: run}, h.ip, h.a, local, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !ep2.IsValid() {
		if static {
			return // refused
		}
		t.Fatal("docker run during the re-assertion failed: the test proves nothing")
	}
	if ep2.Addr() == ep1.Addr() {
		t.Errorf("the new container ep2 got %s, the address ep1's running container has (re-assertion: %d endpoints, conflicts %v)", ep2, rep.Endpoints, rep.Conflicts)
	}
}

// gatedDataplane holds Reconcile (the restore's kernel step, long on a
// host with many endpoints) while block is set, until gate closes.
type gatedDataplane struct {
	*fakeDataplane
	block atomic.Bool
	gate  chan struct{}
}

func (g *gatedDataplane) Reconcile(ctx context.Context, s vxlan.State) (vxlan.Changes, error) {
	if g.block.Load() {
		<-g.gate
	}
	return g.fakeDataplane.Reconcile(ctx, s)
}

// TestHeldWhileRestoring: host a runs n1 with container ep1
// (10.1.0.2); host b holds the pool too. The plugin of a is killed (-9),
// and while it is down the store loses ep1's address record (a's IPAM
// holds and addresses are evicted). The plugin restarts; while its
// restore runs (the kernel reconcile of a busy host), `docker run --ip
// 10.1.0.2` on a: the record is gone, and a driver that has not loaded
// its endpoints yet cannot say that ep1 has it. The request fails
// (Config.HeldReady) instead of handing ep1's address out again.
func TestHeldWhileRestoring(t *testing.T) {
	h, dp := slowRestoreHost(t, keptWait) // WaitRestored waits as long
	poolID := h.network("n1")
	ep1 := h.endpoint(poolID, "n1", "ep1", "02:42:0a:01:00:02").Addr()
	ipb, err := ipam.New(ipam.Config{Node: "b"}, h.store)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ipb.AllocatePool(h.ctx, ipam.PoolRequest{Pool: h.subnet}); err != nil {
		t.Fatal(err)
	}

	// kill -9; the store loses a's IPAM holds and addresses meanwhile.
	h.a.Close()
	r, err := ipam.New(ipam.Config{Node: "r"}, h.store)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.EvictNode(h.ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if holder := h.heldBy(ep1); holder != "" {
		t.Fatalf("ep1's address held by %q after the eviction: the test proves nothing", holder)
	}

	// The plugin restarts; its restore is in the kernel reconcile.
	d := h.slowRestart(dp)
	defer close(dp.gate)
	time.Sleep(100 * time.Millisecond)
	select {
	case <-d.Ready():
		t.Fatal("restore finished: the test proves nothing")
	default:
	}
	// docker run --ip 10.1.0.2 on a.
	if got, err := h.ip.AllocateAddress(h.ctx, ipam.AddressRequest{PoolID: poolID, Address: ep1, MAC: "02:42:0a:01:00:99"}); err == nil {
		t.Errorf("ep1's address %s handed out again (%s) while ep1's container runs and the driver restores", ep1, got)
	}
}
