package reaper

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"consul-overlay/cluster"
	"consul-overlay/discovery"
	"consul-overlay/internal/testenv"
	"consul-overlay/ipam"
	"consul-overlay/kvstore"

	"github.com/hashicorp/consul/api"
)

func bg(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// clock is a settable test clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// cluster of test hosts on one Consul agent and one key prefix.
type env struct {
	agent  *testenv.ConsulAgent
	prefix string
	clock  *clock
}

// testHost is one simulated host: its own store client, claimed host
// record, cluster view and IPAM.
type testHost struct {
	id, node string
	// agentNode, when set, is written as the record's agent_node (the
	// plugin's NODE_NAME differs from its agent's node name).
	agentNode string
	vtep      netip.Addr
	store     *kvstore.Consul
	claim     *kvstore.Claim
	cl        *cluster.Cluster
	ip        *ipam.Driver
}

const grace = time.Minute

func newEnv(t *testing.T, agent *testenv.ConsulAgent) *env {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return &env{agent: agent, prefix: "reaper-" + hex.EncodeToString(b) + "/", clock: &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}}
}

func (e *env) host(t *testing.T, id, node, vtep string) *testHost {
	t.Helper()
	s, err := kvstore.NewConsul(kvstore.ConsulConfig{Address: e.agent.Addr, Prefix: e.prefix, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	h := &testHost{id: id, node: node, store: s, vtep: netip.MustParseAddr(vtep)}
	h.claimRecord(t)
	return h
}

func (h *testHost) claimRecord(t *testing.T) {
	t.Helper()
	val, err := kvstore.Encode(hostRecord{ID: h.id, Node: h.node, AgentNode: h.agentNode, PID: 1, Started: time.Now().UTC()})
	if err != nil {
		t.Fatal(err)
	}
	h.claim, err = h.store.Claim(bg(t), HostsPrefix+h.id, val, kvstore.ClaimConfig{Name: "test " + h.id})
	if err != nil {
		t.Fatal(err)
	}
	cl := h.claim
	t.Cleanup(func() { _ = cl.Release(context.Background()) })
	// As the plugin wires them (plugin/main.go): the host's cluster view
	// and IPAM write through its own fence on its record; a new claim is a
	// new plugin process, with its own.
	own := kvstore.OwnFenced(h.store, h.claim)
	h.cl, err = cluster.New(cluster.Config{HostID: h.id, Node: h.node, VTEP: h.vtep}, own)
	if err != nil {
		t.Fatal(err)
	}
	h.ip, err = ipam.New(ipam.Config{Node: h.id}, own)
	if err != nil {
		t.Fatal(err)
	}
}

// stop is the plugin stopping or dying: the record stays, without a
// session.
func (h *testHost) stop(t *testing.T) {
	t.Helper()
	if err := h.claim.Release(bg(t)); err != nil {
		t.Fatal(err)
	}
}

func (h *testHost) reaper(t *testing.T, e *env, agentNode string) *Reaper {
	t.Helper()
	r, err := New(Config{HostID: h.id, Grace: grace, Now: e.clock.Now}, h.store, h.cl, h.ip,
		ConsulCatalog{Client: h.store.Client(), LocalNode: agentNode})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// netState is what a host sets up on one network: membership, pool,
// gateway, one address and its endpoint record.
func (h *testHost) join(t *testing.T, name, subnet, epID string) netip.Addr {
	t.Helper()
	ctx := bg(t)
	p := netip.MustParsePrefix(subnet)
	key := "name-" + name
	if _, err := h.cl.Join(ctx, key, "docker-"+name+"-"+h.id, cluster.NetworkSpec{Name: name, Subnets: []netip.Prefix{p}, Gateways: []netip.Prefix{netip.PrefixFrom(p.Addr().Next(), p.Bits())}, Spaces: []string{ipam.LocalAddressSpace}}); err != nil {
		t.Fatal(err)
	}
	pool, err := h.ip.AllocatePool(ctx, ipam.PoolRequest{Pool: p})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: pool.ID, Gateway: true}); err != nil {
		t.Fatal(err)
	}
	a, err := h.ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: pool.ID, Endpoint: epID, MAC: "02:00:00:00:00:01"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.cl.CreateEndpoint(ctx, cluster.Endpoint{ID: epID, NetworkKey: key, NetworkID: "docker-" + name + "-" + h.id, IPv4: a.String(), MAC: "02:00:00:00:00:01"}); err != nil {
		t.Fatal(err)
	}
	return a.Addr()
}

func registerService(t *testing.T, c *api.Client, id, hostID string) {
	t.Helper()
	err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: id, Name: "svc-" + id,
		Meta: map[string]string{discovery.MetaHostID: hostID, discovery.MetaManagedBy: discovery.ManagedByValue}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Agent().ServiceDeregister(id) })
}

func exists(t *testing.T, s kvstore.Store, key string) bool {
	t.Helper()
	_, err := s.Get(bg(t), key)
	if errors.Is(err, kvstore.ErrNotFound) {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	return true
}

func serviceIDs(t *testing.T, c *api.Client) map[string]bool {
	t.Helper()
	svcs, err := c.Agent().Services()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for id := range svcs {
		out[id] = true
	}
	return out
}

// scenario: A and B share network "app"; B alone has network "bonly".
type scenario struct {
	e          *env
	a, b       *testHost
	addrA      netip.Addr
	addrB      netip.Addr
	addrBOnly  netip.Addr
	bonlyVNI   uint32
	agentNode  string
	appNetwork cluster.Network
}

func setup(t *testing.T, agent *testenv.ConsulAgent) *scenario {
	t.Helper()
	e := newEnv(t, agent)
	s := &scenario{e: e, agentNode: agent.NodeName}
	// Both hosts behind one agent (shared node name).
	s.a = e.host(t, "host-a", agent.NodeName, "192.0.2.1")
	s.b = e.host(t, "host-b", agent.NodeName, "192.0.2.2")
	s.addrA = s.a.join(t, "app", "10.50.0.0/24", "ep-a")
	s.addrB = s.b.join(t, "app", "10.50.0.0/24", "ep-b")
	s.addrBOnly = s.b.join(t, "bonly", "10.60.0.0/24", "ep-b2")
	n, err := s.b.cl.Network(bg(t), "name-bonly")
	if err != nil {
		t.Fatal(err)
	}
	s.bonlyVNI = n.VNI
	registerService(t, s.a.store.Client(), "svc-a-"+e.prefix[7:15], "host-a")
	registerService(t, s.b.store.Client(), "svc-b-"+e.prefix[7:15], "host-b")
	// Each host's liveness check service, as the plugin registers it (no
	// managed-by).
	for _, h := range []string{"host-a", "host-b"} {
		id := discovery.HostServiceID(h + "-" + e.prefix[7:15])
		err := s.a.store.Client().Agent().ServiceRegister(&api.AgentServiceRegistration{ID: id, Name: discovery.HostServiceName,
			Meta: map[string]string{discovery.MetaHostID: h}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.a.store.Client().Agent().ServiceDeregister(id) })
	}
	return s
}

// checkAUntouched: A's membership, record, addresses and service stay.
func (s *scenario) checkAUntouched(t *testing.T) {
	t.Helper()
	ctx := bg(t)
	n, err := s.a.cl.Network(ctx, "name-app")
	if err != nil {
		t.Fatalf("network app: %v", err)
	}
	if _, ok := n.Hosts["host-a"]; !ok {
		t.Errorf("A lost its membership of app: %v", n.Hosts)
	}
	eps, err := s.a.cl.Endpoints(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	foundA := false
	for _, ep := range eps {
		if ep.ID == "ep-a" {
			foundA = true
		}
	}
	if !foundA {
		t.Errorf("A's endpoint record is gone")
	}
	if _, holder, _, err := s.a.ip.AddressHolder(ctx, s.addrA); err != nil || holder != "host-a" {
		t.Errorf("A's address %s: holder %q, %v", s.addrA, holder, err)
	}
	if !serviceIDs(t, s.a.store.Client())["svc-a-"+s.e.prefix[7:15]] {
		t.Errorf("A's service was deregistered")
	}
	if !serviceIDs(t, s.a.store.Client())[discovery.HostServiceID("host-a-"+s.e.prefix[7:15])] {
		t.Errorf("A's liveness check service was deregistered")
	}
	if !exists(t, s.a.store, HostsPrefix+"host-a") {
		t.Errorf("A's host record is gone")
	}
}

// checkBReaped: nothing of B is left anywhere.
func (s *scenario) checkBReaped(t *testing.T) { s.checkBReapedBut(t, "") }

// checkBReapedBut skips key skip.
func (s *scenario) checkBReapedBut(t *testing.T, skip string) {
	t.Helper()
	ctx := bg(t)
	st := s.a.store
	n, err := s.a.cl.Network(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := n.Hosts["host-b"]; ok {
		t.Errorf("B still a member of app")
	}
	eps, err := s.a.cl.Endpoints(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	for _, ep := range eps {
		if ep.HostID == "host-b" {
			t.Errorf("B's endpoint record %s is left", ep.ID)
		}
	}
	for _, k := range []string{"networks/name-bonly/config", "networks/name-bonly/endpoints/ep-b2", "subnets/10.60.0.0_24",
		"members/host-b", HostsPrefix + "host-b", LostPrefix + "host-b"} {
		if k != skip && exists(t, st, k) {
			t.Errorf("%s is left", k)
		}
	}
	if exists(t, st, "vnis/"+strconv.FormatUint(uint64(s.bonlyVNI), 10)) {
		t.Errorf("vni %d of bonly is still reserved", s.bonlyVNI)
	}
	for _, a := range []netip.Addr{s.addrB, s.addrBOnly} {
		if _, holder, _, err := s.a.ip.AddressHolder(ctx, a); err != nil || holder != "" {
			t.Errorf("B's address %s: holder %q, %v", a, holder, err)
		}
	}
	pool, err := s.a.ip.PoolInfo(ctx, ipam.PoolID(ipam.LocalAddressSpace, netip.MustParsePrefix("10.50.0.0/24"), netip.Prefix{}))
	if err != nil {
		t.Fatal(err)
	}
	if len(pool.Holders) != 1 || pool.Holders["host-a"] != 1 {
		t.Errorf("pool 10.50.0.0/24 holders %v, want only host-a", pool.Holders)
	}
	if _, err := s.a.ip.PoolInfo(ctx, ipam.PoolID(ipam.LocalAddressSpace, netip.MustParsePrefix("10.60.0.0/24"), netip.Prefix{})); err == nil {
		t.Errorf("pool 10.60.0.0/24 of B alone is left")
	}
	gw := netip.MustParseAddr("10.50.0.1")
	if _, holder, _, err := s.a.ip.AddressHolder(ctx, gw); err != nil || holder != `"host-a"` {
		t.Errorf("gateway holders %s, %v; want only host-a", holder, err)
	}
	if serviceIDs(t, st.Client())["svc-b-"+s.e.prefix[7:15]] {
		t.Errorf("B's service is still registered")
	}
	if serviceIDs(t, st.Client())[discovery.HostServiceID("host-b-"+s.e.prefix[7:15])] {
		t.Errorf("B's liveness check service is still registered")
	}
}

func TestConsul(t *testing.T) {
	agent := testenv.StartConsul(t)
	t.Run("GoneHostReaped", func(t *testing.T) { testGoneHostReaped(t, agent) })
	t.Run("BackWithinGrace", func(t *testing.T) { testBackWithinGrace(t, agent) })
	t.Run("RacingReapers", func(t *testing.T) { testRacingReapers(t, agent) })
	t.Run("Evict", func(t *testing.T) { testEvict(t, agent) })
	t.Run("CheckSelf", func(t *testing.T) { testCheckSelf(t, agent) })
	t.Run("OtherNodeCatalog", func(t *testing.T) { testOtherNodeCatalog(t, agent) })
	t.Run("ReapResumes", func(t *testing.T) { testReapResumes(t, agent) })
	t.Run("Reassert", func(t *testing.T) { testReassert(t, agent, false) })
	t.Run("ReassertConflict", func(t *testing.T) { testReassert(t, agent, true) })
	t.Run("ReassertCountsHolds", func(t *testing.T) { testReassertCountsHolds(t, agent) })
	t.Run("RunFollowsWithoutPolling", func(t *testing.T) { testRunFollows(t, agent) })
	t.Run("BackDuringReap", func(t *testing.T) { testBackDuringReap(t, agent) })
	t.Run("BackBeforeServices", func(t *testing.T) { testBackBeforeServices(t, agent) })
	t.Run("HealDuringReap", func(t *testing.T) { testHealDuringReap(t, agent) })
	t.Run("AllocateDuringReap", func(t *testing.T) { testAllocateDuringReap(t, agent) })
	t.Run("ServicesUnderAgentNode", func(t *testing.T) { testServicesUnderAgentNode(t, agent) })
}

// testServicesUnderAgentNode: host B runs with NODE_NAME web-1 while its
// agent's node is another name, so its registrar's services are on the
// agent's node. Once B is gone, the reaper removes them there: looked up
// under web-1 they were never found, and on a shared agent that outlives B
// they kept answering DNS for containers that no longer run.
func testServicesUnderAgentNode(t *testing.T, agent *testenv.ConsulAgent) {
	e := newEnv(t, agent)
	ctx := bg(t)
	a := e.host(t, "host-a", agent.NodeName, "192.0.2.1")
	b := e.host(t, "host-b", "web-1", "192.0.2.2")
	b.agentNode = agent.NodeName
	if err := b.claim.Release(ctx); err != nil {
		t.Fatal(err)
	}
	b.claimRecord(t)
	b.join(t, "app", "10.51.0.0/24", "ep-b")
	svc := "svc-b-" + e.prefix[7:15]
	registerService(t, b.store.Client(), svc, "host-b")
	r := a.reaper(t, e, agent.NodeName)
	b.stop(t)
	if err := r.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	e.clock.Add(grace + time.Second)
	if err := r.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	if exists(t, a.store, "members/host-b") {
		t.Fatal("B was not reaped")
	}
	if serviceIDs(t, a.store.Client())[svc] {
		t.Error("B's service is still registered on its agent's node: the reaper looked for it under NODE_NAME (web-1) only")
	}
}

func testGoneHostReaped(t *testing.T, agent *testenv.ConsulAgent) {
	s := setup(t, agent)
	r := s.a.reaper(t, s.e, s.agentNode)
	ctx := bg(t)
	if err := r.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	if exists(t, s.a.store, LostPrefix+"host-b") {
		t.Fatal("a live host was marked lost")
	}
	s.b.stop(t)
	if err := r.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	if !exists(t, s.a.store, LostPrefix+"host-b") {
		t.Fatal("B's record without session not marked lost")
	}
	// Within the grace period: nothing is reaped.
	s.e.clock.Add(grace - time.Second)
	if err := r.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	if !exists(t, s.a.store, "members/host-b") || !exists(t, s.a.store, "networks/name-bonly/config") {
		t.Fatal("B reaped before the grace period ended")
	}
	hosts, err := r.Hosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hosts {
		if h.ID == "host-b" && (h.Alive || h.LostSince.IsZero() || h.Gone) {
			t.Errorf("B within grace: %+v", h)
		}
		if h.ID == "host-a" && !h.Alive {
			t.Errorf("A not alive: %+v", h)
		}
	}
	s.e.clock.Add(2 * time.Second)
	if err := r.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	s.checkBReaped(t)
	s.checkAUntouched(t)
	// Idempotent.
	if err := r.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Evict(ctx, "host-b", true); err != nil {
		t.Fatalf("evict again: %v", err)
	}
	s.checkAUntouched(t)
}

func testBackWithinGrace(t *testing.T, agent *testenv.ConsulAgent) {
	s := setup(t, agent)
	r := s.a.reaper(t, s.e, s.agentNode)
	ctx := bg(t)
	s.b.stop(t)
	if err := r.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	s.e.clock.Add(grace / 2)
	s.b.claimRecord(t) // a plugin restart
	if err := r.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	if exists(t, s.a.store, LostPrefix+"host-b") {
		t.Error("B came back but its lost mark stays")
	}
	s.e.clock.Add(2 * grace)
	if err := r.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"members/host-b", "networks/name-bonly/config", "networks/name-app/endpoints/ep-b", HostsPrefix + "host-b"} {
		if !exists(t, s.a.store, k) {
			t.Errorf("%s of a host back within grace was reaped", k)
		}
	}
	if _, holder, _, _ := s.a.ip.AddressHolder(ctx, s.addrB); holder != "host-b" {
		t.Errorf("B's address holder %q", holder)
	}
	if !serviceIDs(t, s.a.store.Client())["svc-b-"+s.e.prefix[7:15]] {
		t.Error("B's service deregistered")
	}
	// Lost again later: the count starts anew, not from the old mark.
	s.b.stop(t)
	if err := r.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	s.e.clock.Add(grace / 2)
	if err := r.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	if !exists(t, s.a.store, "members/host-b") {
		t.Error("B reaped by an old count")
	}
}

func testRacingReapers(t *testing.T, agent *testenv.ConsulAgent) {
	s := setup(t, agent)
	c := s.e.host(t, "host-c", agent.NodeName, "192.0.2.3")
	ra := s.a.reaper(t, s.e, s.agentNode)
	rc := c.reaper(t, s.e, s.agentNode)
	ctx := bg(t)
	s.b.stop(t)
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i, r := range []*Reaper{ra, rc, ra, rc} {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = r.Scan(ctx) }()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("scan %d: %v", i, err)
		}
	}
	s.e.clock.Add(grace + time.Second)
	for i, r := range []*Reaper{ra, rc, ra, rc} {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = r.Scan(ctx) }()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("racing scan %d: %v", i, err)
		}
	}
	s.checkBReaped(t)
	s.checkAUntouched(t)
}

func testEvict(t *testing.T, agent *testenv.ConsulAgent) {
	s := setup(t, agent)
	// An operator's tool: no host ID of its own.
	r, err := New(Config{Grace: grace, Now: s.e.clock.Now}, s.a.store, s.a.cl, s.a.ip, ConsulCatalog{Client: s.a.store.Client(), LocalNode: s.agentNode})
	if err != nil {
		t.Fatal(err)
	}
	ctx := bg(t)
	if _, err := r.Evict(ctx, "host-b", false); !errors.Is(err, ErrAlive) {
		t.Fatalf("evict of a live host: %v, want ErrAlive", err)
	}
	if !exists(t, s.a.store, "members/host-b") {
		t.Fatal("refused evict changed something")
	}
	if _, err := r.Evict(ctx, "no-such-host", false); !errors.Is(err, ErrUnknownHost) {
		t.Fatalf("evict of an unknown host: %v", err)
	}
	rep, err := r.Evict(ctx, "host-b", true)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Cluster.Left) != 2 || len(rep.Cluster.Removed) != 1 || rep.IPAM.Addresses != 2 || rep.Services != 2 { // its container service and its liveness check
		t.Errorf("evict report %+v", rep)
	}
	// B's claim takes its record again: a live host evicted by force
	// keeps only that.
	s.checkBReapedBut(t, HostsPrefix+"host-b")
	s.checkAUntouched(t)
}

func testCheckSelf(t *testing.T, agent *testenv.ConsulAgent) {
	s := setup(t, agent)
	ctx := bg(t)
	local := []LocalEndpoint{{ID: "ep-b", Network: "app", Addrs: []netip.Addr{s.addrB}}, {ID: "ep-b2", Network: "bonly", Addrs: []netip.Addr{s.addrBOnly}}}
	rep, err := CheckSelf(ctx, "host-b", "b", s.b.cl, s.b.ip, local, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Evicted || len(rep.Held) != 2 || len(rep.Conflicts) != 0 {
		t.Fatalf("before eviction: %+v", rep)
	}
	s.b.stop(t)
	r := s.a.reaper(t, s.e, s.agentNode)
	if _, err := r.Evict(ctx, "host-b", false); err != nil {
		t.Fatal(err)
	}
	// A takes B's old address meanwhile.
	pool := ipam.PoolID(ipam.LocalAddressSpace, netip.MustParsePrefix("10.50.0.0/24"), netip.Prefix{})
	if _, err := s.a.ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: pool, Address: s.addrB, Endpoint: "ep-a2"}); err != nil {
		t.Fatal(err)
	}
	rep, err = CheckSelf(ctx, "host-b", "b", s.b.cl, s.b.ip, local, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Evicted || len(rep.Free) != 1 || rep.Free[0] != s.addrBOnly || len(rep.Conflicts) != 1 ||
		rep.Conflicts[0].Addr != s.addrB || rep.Conflicts[0].Holder != "host-a" || rep.Conflicts[0].HolderEndpoint != "ep-a2" {
		t.Fatalf("after eviction: %+v", rep)
	}
}

// A host on its own agent (another node): its services are removed from
// the catalog.
func testOtherNodeCatalog(t *testing.T, agent *testenv.ConsulAgent) {
	e := newEnv(t, agent)
	a := e.host(t, "host-a", agent.NodeName, "192.0.2.1")
	d := e.host(t, "host-d", "node-d-"+e.prefix[7:15], "192.0.2.4")
	cat := a.store.Client().Catalog()
	reg := func(id, hostID string) {
		_, err := cat.Register(&api.CatalogRegistration{Node: d.node, Address: "192.0.2.4",
			Service: &api.AgentService{ID: id, Service: id, Meta: map[string]string{discovery.MetaHostID: hostID, discovery.MetaManagedBy: discovery.ManagedByValue}}}, nil)
		if err != nil {
			t.Fatal(err)
		}
	}
	reg("svc-d", "host-d")
	reg("svc-other", "host-x")
	t.Cleanup(func() { _, _ = cat.Deregister(&api.CatalogDeregistration{Node: d.node}, nil) })
	d.stop(t)
	r := a.reaper(t, e, agent.NodeName)
	rep, err := r.Evict(bg(t), "host-d", false)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Services != 1 {
		t.Errorf("deregistered %d services, want 1", rep.Services)
	}
	list, _, err := cat.NodeServiceList(d.node, nil)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, s := range list.Services {
		ids = append(ids, s.ID)
	}
	if len(ids) != 1 || ids[0] != "svc-other" {
		t.Errorf("services left on node %s: %v, want [svc-other]", d.node, ids)
	}
}

// localOf is what B's driver knows before it is evicted.
func (s *scenario) localOf(t *testing.T, h *testHost) []LocalNetwork {
	t.Helper()
	var out []LocalNetwork
	for _, key := range []string{"name-app", "name-bonly"} {
		n, err := h.cl.Network(bg(t), key)
		if err != nil {
			t.Fatal(err)
		}
		eps, err := h.cl.Endpoints(bg(t), key)
		if err != nil {
			t.Fatal(err)
		}
		ln := LocalNetwork{Network: n, NetworkIDs: n.Hosts[h.id].NetworkIDs}
		for _, ep := range eps {
			if ep.HostID == h.id {
				ln.Endpoints = append(ln.Endpoints, ep)
			}
		}
		out = append(out, ln)
	}
	return out
}

func testReassert(t *testing.T, agent *testenv.ConsulAgent, conflict bool) {
	s := setup(t, agent)
	ctx := bg(t)
	local := s.localOf(t, s.b)
	s.b.stop(t)
	r := s.a.reaper(t, s.e, s.agentNode)
	if _, err := r.Evict(ctx, "host-b", false); err != nil {
		t.Fatal(err)
	}
	pool := ipam.PoolID(ipam.LocalAddressSpace, netip.MustParsePrefix("10.50.0.0/24"), netip.Prefix{})
	if conflict {
		if _, err := s.a.ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: pool, Address: s.addrB, Endpoint: "ep-a2"}); err != nil {
			t.Fatal(err)
		}
	}
	s.b.claimRecord(t)
	for round := 0; round < 2; round++ { // idempotent
		rep, err := Reassert(ctx, "host-b", s.b.node, s.b.cl, s.b.ip, nil, local, nil)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		wantEPs, wantConflicts := 2, 0
		if conflict {
			wantEPs, wantConflicts = 1, 1
		}
		if rep.Networks != 2 || rep.Endpoints != wantEPs || len(rep.Conflicts) != wantConflicts {
			t.Fatalf("round %d: %+v", round, rep)
		}
		if conflict && (rep.Conflicts[0].Addr != s.addrB || rep.Conflicts[0].Holder != "host-a") {
			t.Fatalf("conflict %+v", rep.Conflicts[0])
		}
	}
	if ok, _ := s.b.cl.HostRecorded(ctx, "host-b"); !ok {
		t.Error("members/host-b not written again")
	}
	n, err := s.a.cl.Network(ctx, "name-bonly")
	if err != nil || n.VNI != s.bonlyVNI {
		t.Errorf("bonly re-created with vni %d (want %d): %v", n.VNI, s.bonlyVNI, err)
	}
	if _, ok := n.Hosts["host-b"]; !ok {
		t.Error("B not a member of bonly again")
	}
	if !exists(t, s.a.store, "networks/name-bonly/endpoints/ep-b2") {
		t.Error("ep-b2 not recorded again")
	}
	if _, holder, _, _ := s.a.ip.AddressHolder(ctx, s.addrBOnly); holder != "host-b" {
		t.Errorf("address %s holder %q", s.addrBOnly, holder)
	}
	if got := exists(t, s.a.store, "networks/name-app/endpoints/ep-b"); got == conflict {
		t.Errorf("ep-b recorded again: %v, with a conflict: %v", got, conflict)
	}
	p, err := s.a.ip.PoolInfo(ctx, pool)
	if err != nil || p.Holders["host-b"] != 1 || p.Holders["host-a"] != 1 {
		t.Errorf("pool holders %v, %v", p.Holders, err)
	}
	if _, holder, _, _ := s.a.ip.AddressHolder(ctx, netip.MustParseAddr("10.50.0.1")); holder != `"host-a","host-b"` {
		t.Errorf("gateway holders %s", holder)
	}
	s.checkAUntouched(t)
}

// testReassertCountsHolds: B runs two Docker networks on one subnet (two
// pool holds, two gateway holds) and is evicted. Its re-assertion takes
// both holds of each again, so `docker network rm` of one (its
// ReleaseAddress of the gateway, its ReleasePool) leaves the pool and the
// other network's addresses in place. With one hold, that release removed
// the pool and every address record in it while the other network still
// ran: its addresses could be handed out a second time.
func testReassertCountsHolds(t *testing.T, agent *testenv.ConsulAgent) {
	s := setup(t, agent)
	ctx := bg(t)
	subnet := netip.MustParsePrefix("10.50.0.0/24")
	gw := netip.MustParseAddr("10.50.0.1")
	// B's second Docker network on "app": its own pool and gateway hold.
	second := "docker-app2-host-b"
	n, err := s.b.cl.Network(ctx, "name-app")
	if err != nil {
		t.Fatal(err)
	}
	spec, err := specOf(n)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.b.cl.Join(ctx, "name-app", second, spec); err != nil {
		t.Fatal(err)
	}
	pool, err := s.b.ip.AllocatePool(ctx, ipam.PoolRequest{Pool: subnet})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.b.ip.AllocateAddress(ctx, ipam.AddressRequest{PoolID: pool.ID, Gateway: true}); err != nil {
		t.Fatal(err)
	}
	if p, err := s.a.ip.PoolInfo(ctx, pool.ID); err != nil || p.Holders["host-b"] != 2 {
		t.Fatalf("before the eviction B holds pool %s %d times (%v), want 2", pool.ID, p.Holders["host-b"], err)
	}
	local := s.localOf(t, s.b)
	s.b.stop(t)
	r := s.a.reaper(t, s.e, s.agentNode)
	if _, err := r.Evict(ctx, "host-b", false); err != nil {
		t.Fatal(err)
	}
	s.b.claimRecord(t)
	if _, err := Reassert(ctx, "host-b", s.b.node, s.b.cl, s.b.ip, nil, local, nil); err != nil {
		t.Fatal(err)
	}
	p, err := s.a.ip.PoolInfo(ctx, pool.ID)
	if err != nil || p.Holders["host-b"] != 2 {
		t.Fatalf("after the re-assertion B holds pool %s %d times (%v), want 2: one per network", pool.ID, p.Holders["host-b"], err)
	}
	if err := s.b.ip.FreeAddress(ctx, pool.ID, gw); err != nil {
		t.Fatal(err)
	}
	if err := s.b.ip.FreePool(ctx, pool.ID); err != nil {
		t.Fatal(err)
	}
	if _, holder, _, err := s.a.ip.AddressHolder(ctx, s.addrB); err != nil || holder != "host-b" {
		t.Errorf("after one of B's two networks released the pool, ep-b's address %s is held by %q, %v; want host-b", s.addrB, holder, err)
	}
	if _, holder, _, err := s.a.ip.AddressHolder(ctx, gw); err != nil || !strings.Contains(holder, `"host-b"`) {
		t.Errorf("after one of B's two networks released the gateway, its holders are %s, %v; want host-b still", holder, err)
	}
	p, err = s.a.ip.PoolInfo(ctx, pool.ID)
	if err != nil || p.Holders["host-b"] != 1 {
		t.Errorf("after one release B holds pool %s %d times (%v), want 1", pool.ID, p.Holders["host-b"], err)
	}
}

// A reap cut short (a crash after its first step, or after the host
// record's removal) is finished by the next scan.
func testReapResumes(t *testing.T, agent *testenv.ConsulAgent) {
	s := setup(t, agent)
	r := s.a.reaper(t, s.e, s.agentNode)
	ctx := bg(t)
	s.b.stop(t)
	if err := r.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	s.e.clock.Add(grace + time.Second)
	if _, err := s.a.cl.EvictHost(ctx, "host-b"); err != nil { // reap/after-cluster
		t.Fatal(err)
	}
	if err := r.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	s.checkBReaped(t)
	s.checkAUntouched(t)
	// Only the lost mark is left (reap/after-host-record).
	if err := s.a.store.Put(ctx, LostPrefix+"host-x", []byte(`{"schema":1,"data":{"since":"2026-01-01T00:00:00Z","host_index":1}}`)); err != nil {
		t.Fatal(err)
	}
	if err := r.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	if exists(t, s.a.store, LostPrefix+"host-x") {
		t.Error("a lost mark without its host record is left")
	}
}

// opCounter counts a Metered store's operations by name.
type opCounter struct {
	mu  sync.Mutex
	ops map[string]int
}

func (c *opCounter) ObserveStoreOp(op string, _ error, _ time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ops[op]++
}

func (c *opCounter) ObserveWatchUpdate() {}

func (c *opCounter) reads() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ops["get"] + c.ops["list"]
}

// Run marks a host lost as soon as its record loses its session (the
// watch, not a periodic list, brings it), reads nothing while nothing
// changes, and still reaps once the grace period ends (the periodic pass).
func testRunFollows(t *testing.T, agent *testenv.ConsulAgent) {
	s := setup(t, agent)
	ops := &opCounter{ops: map[string]int{}}
	run := func(interval time.Duration) (stop func()) {
		r, err := New(Config{HostID: s.a.id, Grace: grace, Interval: interval, Now: s.e.clock.Now},
			kvstore.Metered(s.a.store, ops), s.a.cl, s.a.ip, ConsulCatalog{Client: s.a.store.Client(), LocalNode: s.agentNode})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); r.Run(ctx, nil) }()
		return func() { cancel(); <-done }
	}
	waitUntil := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within 10s", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	// Phase 1: no periodic pass within the test (an hour's interval).
	stop := run(time.Hour)
	time.Sleep(time.Second) // the first snapshot and its pass
	if n := ops.reads(); n != 0 {
		t.Fatalf("Run read the store %d times besides its watch while nothing changed", n)
	}
	s.b.stop(t)
	start := time.Now()
	waitUntil("B marked lost from the watch", func() bool { return exists(t, s.a.store, LostPrefix+"host-b") })
	t.Logf("B marked lost %s after its record lost its session", time.Since(start).Round(time.Millisecond))
	time.Sleep(500 * time.Millisecond)
	if !exists(t, s.a.store, "members/host-b") {
		t.Fatal("B reaped within the grace period")
	}
	stop()

	// Phase 2: past the grace period, the periodic pass reaps B.
	s.e.clock.Add(grace + time.Second)
	stop = run(50 * time.Millisecond)
	defer stop()
	waitUntil("B reaped after the grace period", func() bool {
		return !exists(t, s.a.store, HostsPrefix+"host-b") && !exists(t, s.a.store, LostPrefix+"host-b")
	})
	if exists(t, s.a.store, "members/host-b") || exists(t, s.a.store, "networks/name-bonly/config") {
		t.Fatal("B's host record reaped but not its cluster state")
	}
	s.checkAUntouched(t)
}

// evictHook runs before before the IPAM step of a reap, and after (if
// set) after it.
type evictHook struct {
	ip            *ipam.Driver
	before, after func()
}

func (e evictHook) EvictNode(ctx context.Context, node string) (ipam.Evicted, error) {
	e.before()
	ev, err := e.ip.EvictNode(ctx, node)
	if e.after != nil {
		e.after()
	}
	return ev, err
}

// testBackBeforeServices: a host that takes its record back after the
// reap's last store write (its IPAM step) keeps its services, which are
// in the catalog, not in the store, where no fence reaches: the reap
// looks at the host record again before it lists them and stops.
func testBackBeforeServices(t *testing.T, agent *testenv.ConsulAgent) {
	s := setup(t, agent)
	s.b.stop(t)
	rep, err := s.reapBHooked(t, func() {}, func() { s.b.claimRecord(t) })
	if err != nil {
		t.Fatalf("reap of a host that came back during it: %v", err)
	}
	if rep.Services != 0 {
		t.Errorf("reap deregistered %d services of a host that came back: %+v", rep.Services, rep)
	}
	if !serviceIDs(t, s.a.store.Client())["svc-b-"+s.e.prefix[7:15]] {
		t.Error("B's service was deregistered")
	}
	if !exists(t, s.a.store, HostsPrefix+"host-b") {
		t.Error("B's host record was removed")
	}
}

// testBackDuringReap: a host that takes its record back while it is being
// reaped (between the cluster step and the IPAM step) keeps every address
// and pool hold: the IPAM step's writes are fenced on the host record the
// reaper judged, and the reap stops there, without error. The host's own
// check then re-asserts what the cluster step removed.
func testBackDuringReap(t *testing.T, agent *testenv.ConsulAgent) {
	s := setup(t, agent)
	ctx := bg(t)
	local := s.localOf(t, s.b)
	s.b.stop(t)
	rep, err := s.reapB(t, func() { s.b.claimRecord(t) })
	if err != nil {
		t.Fatalf("reap of a host that came back during it: %v", err)
	}
	if rep.IPAM.Addresses != 0 || rep.IPAM.PoolHolds != 0 || rep.Services != 0 {
		t.Errorf("reap went on after the host came back: %+v", rep)
	}
	for _, a := range []netip.Addr{s.addrB, s.addrBOnly} {
		if _, holder, _, err := s.a.ip.AddressHolder(ctx, a); err != nil || holder != "host-b" {
			t.Errorf("B's address %s: holder %q, %v", a, holder, err)
		}
	}
	for _, subnet := range []string{"10.50.0.0/24", "10.60.0.0/24"} {
		p, err := s.a.ip.PoolInfo(ctx, ipam.PoolID(ipam.LocalAddressSpace, netip.MustParsePrefix(subnet), netip.Prefix{}))
		if err != nil || p.Holders["host-b"] != 1 {
			t.Errorf("pool %s holders %v, %v", subnet, p.Holders, err)
		}
	}
	if !exists(t, s.a.store, HostsPrefix+"host-b") {
		t.Error("B's host record was removed")
	}
	if !serviceIDs(t, s.a.store.Client())["svc-b-"+s.e.prefix[7:15]] {
		t.Error("B's service was deregistered")
	}
	// B's own check sees what the cluster step removed (members/host-b
	// went first) and re-asserts it.
	var eps []LocalEndpoint
	for _, ln := range local {
		for _, ep := range ln.Endpoints {
			eps = append(eps, LocalEndpoint{ID: ep.ID, Network: ln.Network.Key, Addrs: []netip.Addr{netip.MustParsePrefix(ep.IPv4).Addr()}})
		}
	}
	self, err := CheckSelf(ctx, "host-b", s.b.node, s.b.cl, s.b.ip, eps, nil)
	if err != nil || !self.Evicted || len(self.Free) != 0 || len(self.Conflicts) != 0 {
		t.Fatalf("B's check after the stopped reap: %+v, %v; want evicted, every address still its own", self, err)
	}
	if _, err := Reassert(ctx, "host-b", s.b.node, s.b.cl, s.b.ip, nil, local, nil); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"members/host-b", "networks/name-bonly/config", "networks/name-app/endpoints/ep-b"} {
		if !exists(t, s.a.store, k) {
			t.Errorf("%s not back after B's re-assert", k)
		}
	}
	s.checkAUntouched(t)
}
