package reaper

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"consul-overlay/internal/testenv"
	"consul-overlay/ipam"
	"consul-overlay/kvstore"

	"github.com/hashicorp/consul/api"
)

// TestConsulSessionlessHostThatWrites: host B's agent is cut off from the
// servers' gossip (Serf over UDP dropped by a firewall) while its RPC to
// them still works. The servers mark B's node failed (serfHealth
// critical), which ends B's session: its host record loses it, and B's
// claim cannot take it again, as Consul refuses any session bound to a
// critical serfHealth. Every KV read and write of B still goes through:
// B's plugin keeps serving `docker run`, allocating addresses and writing
// endpoint records. Five minutes later (HOST_GRACE), the other hosts reap
// B as a dead host: its endpoint records, its addresses (those of its
// running containers and the one it allocated after its session ended)
// and its pool holds. The next host asking for one of those addresses
// gets it, while B's container runs with it: one address, two containers
// on two hosts, while B was never cut off from the store at all.
//
// A host record's ModifyIndex changing is how a host says it is back (the
// count restarts and a reap in progress is fenced off), so a claim that
// cannot get a session but can still write the store writes its record
// anew, without a session, every pass: a host whose writes reach the
// store is never taken for a dead one.
//
// The gossip partition is made by registering the client node's
// serfHealth as critical in the catalog, as the servers' leader does when
// Serf reports the node failed; the leader puts it back to passing at its
// next reconcile (every minute), so the test asserts the partition held
// throughout, and goes on re-marking it critical meanwhile.
func TestConsulSessionlessHostThatWrites(t *testing.T) {
	tag := randTag(t)
	server := testenv.StartConsul(t, testenv.WithNodeName("hunt53-srv-"+tag))
	if server == nil {
		return
	}
	client := testenv.StartConsul(t, testenv.WithNodeName("hunt53-cli-"+tag), testenv.WithRetryJoin(server.SerfLANAddr),
		testenv.WithArgs("-server=false", "-data-dir", filepath.Join(t.TempDir(), "data")))
	if client == nil {
		return
	}
	e := newEnv(t, server)
	a := e.host(t, "host-a", server.NodeName, "192.0.2.1")
	eb := &env{agent: client, prefix: e.prefix, clock: e.clock}
	b := eb.host(t, "host-b", client.NodeName, "192.0.2.2")
	addrB := b.join(t, "app", "10.57.0.0/24", "ep-b")
	a.join(t, "app", "10.57.0.0/24", "ep-a")
	ctx := bg(t)
	pool := ipam.PoolID(ipam.LocalAddressSpace, netip.MustParsePrefix("10.57.0.0/24"), netip.Prefix{})

	// The gossip partition: the servers see B's node failed.
	srv := a.store.Client()
	markFailed := func() error {
		_, err := srv.Catalog().Register(&api.CatalogRegistration{Node: client.NodeName, Address: "127.0.0.1",
			Check: &api.AgentCheck{Node: client.NodeName, CheckID: "serfHealth", Name: "Serf Health Status", Status: api.HealthCritical}}, nil)
		return err
	}
	if err := markFailed(); err != nil {
		t.Fatal(err)
	}
	pctx, stopPartition := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for pctx.Err() == nil {
			_ = markFailed()
			sleepCtx(pctx, 50*time.Millisecond)
		}
	}()
	t.Cleanup(func() { stopPartition(); wg.Wait() })

	recB := func() *kvstore.Pair {
		t.Helper()
		p, err := a.store.Get(ctx, HostsPrefix+"host-b")
		if errors.Is(err, kvstore.ErrNotFound) {
			return &kvstore.Pair{} // reaped
		}
		if err != nil {
			t.Fatalf("B's host record: %v", err)
		}
		return p
	}
	deadline := time.Now().Add(15 * time.Second)
	for recB().Session != "" {
		if time.Now().After(deadline) {
			t.Fatal("setup: B's record kept its session with its node's serfHealth critical")
		}
		time.Sleep(50 * time.Millisecond)
	}

	// B is alive and serves: a container started now gets an address and
	// its record, through B's agent.
	addrB3, err := b.ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: pool, Endpoint: "ep-b3", MAC: "02:00:00:00:00:03"})
	if err != nil {
		t.Fatalf("B cannot allocate while its session is lost (so it is cut off, not the case here): %v", err)
	}

	// A's reaper sees B's record without a session and starts the count.
	r := a.reaper(t, e, server.NodeName)
	if err := r.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	// Two grace periods pass (the test's clock), while B goes on working:
	// each time, give B's claim the time to say so (it writes its record
	// every TTL/2), then A's reaper judges B again. A record written once
	// and then no more would be reaped at the second.
	for round := 1; round <= 2; round++ {
		lp, err := a.store.Get(ctx, LostPrefix+"host-b")
		if errors.Is(err, kvstore.ErrNotFound) {
			break // reaped
		}
		if err != nil {
			t.Fatalf("round %d: B's record without a session was not marked lost: %v", round, err)
		}
		var lost lostRecord
		if err := kvstore.Decode(lp.Value, &lost); err != nil {
			t.Fatal(err)
		}
		e.clock.Add(grace + time.Second)
		wait := time.Now().Add(25 * time.Second)
		for recB().ModifyIndex == lost.HostIndex && time.Now().Before(wait) {
			time.Sleep(100 * time.Millisecond)
		}
		if recB().Session != "" {
			t.Fatal("setup: B took a session again (the leader's reconcile healed the partition); run again")
		}
		if _, err := b.ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: pool, Endpoint: fmt.Sprintf("ep-b4-%d", round), MAC: "02:00:00:00:00:04"}); err != nil {
			t.Fatalf("round %d: B cannot allocate while its session is lost: %v", round, err)
		}
		if err := r.Scan(ctx); err != nil {
			t.Fatal(err)
		}
		if recB().Session != "" {
			t.Fatal("setup: B took a session again during the scan; run again")
		}
	}

	// B's running containers must keep their addresses: B never stopped
	// writing to the store.
	for _, x := range []struct {
		ep string
		a  netip.Addr
	}{{"ep-b", addrB}, {"ep-b3", addrB3.Addr()}} {
		_, holder, _, err := a.ip.AddressHolder(ctx, x.a)
		if err != nil {
			t.Fatal(err)
		}
		if holder == "host-b" {
			continue
		}
		t.Errorf("address %s of B's running endpoint %s: holder %q; B was reaped while it kept writing to the store", x.a, x.ep, holder)
		// The outcome: another host gets it for its new container.
		got, err := a.ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: pool, Address: x.a, Endpoint: "ep-a-new-" + x.ep, MAC: "02:00:00:00:0a:01"})
		if err == nil {
			t.Errorf("address %s handed out twice: to B's running endpoint %s and to A's new endpoint (%s)", x.a, x.ep, got)
		} else if !errors.Is(err, ipam.ErrAddressInUse) {
			t.Fatal(err)
		}
	}
	if !exists(t, a.store, "members/host-b") {
		t.Error("B's members/ record was removed: B was evicted while it kept writing to the store")
	}
}

func randTag(t *testing.T) string {
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func sleepCtx(ctx context.Context, d time.Duration) {
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-ctx.Done():
	case <-tm.C:
	}
}
