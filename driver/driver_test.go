package driver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/cluster"
	"consul-overlay/kvstore"
	"consul-overlay/vxlan"
)

// fakeDataplane records what the driver asks of the kernel. Fakes are for
// unit tests; the kernel itself is exercised by the vxlan and plugin tests.
type fakeDataplane struct {
	mu        sync.Mutex
	networks  map[uint32]vxlan.Network
	endpoints map[string]vxlan.Endpoint
	peers     map[string]vxlan.Peer
	reconcile []vxlan.State
	failNet   error
	maxMTU    int
	vtep      netip.Addr
	inUse     map[string]bool
	allowed   []netip.Addr
	// failDeletes makes that many DeleteEndpoint calls fail.
	failDeletes int
	// peerChanges counts the ChangePeers calls.
	peerChanges int
	// egressBlocked is EgressBlocked's answer: nil, the host can be a
	// network's way out (new networks default to egress=auto).
	egressBlocked error
}

// peerID identifies one programmed neighbour in the fake.
func peerID(p vxlan.Peer) string {
	return fmt.Sprintf("%d/%s/%s/%s", p.VNI, p.IP, p.MAC, p.VTEP)
}

func newFake() *fakeDataplane {
	return &fakeDataplane{networks: map[uint32]vxlan.Network{}, endpoints: map[string]vxlan.Endpoint{}, peers: map[string]vxlan.Peer{}, maxMTU: 1450}
}

func (f *fakeDataplane) EnsureNetwork(_ context.Context, n vxlan.Network) (vxlan.NetworkInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failNet != nil {
		return vxlan.NetworkInfo{}, f.failNet
	}
	if n.Egress && f.egressBlocked != nil {
		// As vxlan.Manager refuses it.
		return vxlan.NetworkInfo{}, fmt.Errorf("ensure network (vni %d): %w", n.VNI, f.egressBlocked)
	}
	f.networks[n.VNI] = n
	return vxlan.NetworkInfo{Bridge: vxlan.BridgeName(n.VNI), VXLAN: vxlan.VXLANName(n.VNI), MTU: f.maxMTU}, nil
}
func (f *fakeDataplane) DeleteNetwork(_ context.Context, vni uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.networks, vni)
	for id, ep := range f.endpoints {
		if ep.VNI == vni {
			delete(f.endpoints, id)
		}
	}
	for id, p := range f.peers {
		if p.VNI == vni {
			delete(f.peers, id)
		}
	}
	return nil
}
func (f *fakeDataplane) EnsureEndpoint(_ context.Context, ep vxlan.Endpoint) (vxlan.EndpointInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.networks[ep.VNI]; !ok {
		return vxlan.EndpointInfo{}, fmt.Errorf("network %d not built", ep.VNI)
	}
	f.endpoints[ep.ID] = ep
	return vxlan.EndpointInfo{HostIf: vxlan.HostIfName(ep.ID), ContainerIf: vxlan.ContainerIfName(ep.ID), MTU: f.maxMTU}, nil
}
func (f *fakeDataplane) DeleteEndpoint(_ context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failDeletes > 0 {
		f.failDeletes--
		return fmt.Errorf("delete endpoint %s: device or resource busy (fake)", id)
	}
	delete(f.endpoints, id)
	return nil
}
func (f *fakeDataplane) UpdatePeers(ctx context.Context, vni uint32, peers []vxlan.Peer) (vxlan.Changes, error) {
	return f.SetPeers(ctx, vni, peers)
}
func (f *fakeDataplane) ChangePeers(_ context.Context, vni uint32, removed, added []vxlan.Peer) (vxlan.Changes, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.peerChanges++
	for _, p := range removed {
		delete(f.peers, peerID(p))
	}
	for _, p := range added {
		f.peers[peerID(p)] = p
	}
	return vxlan.Changes{}, true, nil
}
func (f *fakeDataplane) SetPeers(_ context.Context, vni uint32, peers []vxlan.Peer) (vxlan.Changes, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for id, p := range f.peers {
		if p.VNI == vni {
			delete(f.peers, id)
		}
	}
	for _, p := range peers {
		f.peers[peerID(p)] = p
	}
	return vxlan.Changes{}, nil
}
func (f *fakeDataplane) Reconcile(_ context.Context, s vxlan.State) (vxlan.Changes, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reconcile = append(f.reconcile, s)
	want := map[uint32]bool{}
	for _, n := range s.Networks {
		f.networks[n.VNI] = n
		want[n.VNI] = true
	}
	// KeepStrays: what is listed is ensured, nothing is removed.
	for vni := range f.networks {
		if !want[vni] && !s.KeepStrays {
			delete(f.networks, vni)
		}
	}
	if !s.KeepStrays {
		f.endpoints = map[string]vxlan.Endpoint{}
		f.peers = map[string]vxlan.Peer{}
	}
	for _, ep := range s.Endpoints {
		f.endpoints[ep.ID] = ep
	}
	for _, p := range s.Peers {
		f.peers[peerID(p)] = p
	}
	return vxlan.Changes{}, nil
}
func (f *fakeDataplane) Networks(context.Context) ([]uint32, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []uint32
	for vni := range f.networks {
		out = append(out, vni)
	}
	return out, nil
}
func (f *fakeDataplane) SetVTEP(_ context.Context, vtep netip.Addr, nets []vxlan.Network) (vxlan.Changes, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.vtep = vtep
	return vxlan.Changes{}, nil
}
func (f *fakeDataplane) MaxMTU() int { return f.maxMTU }

func (f *fakeDataplane) EgressBlocked() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.egressBlocked
}

// SetAllowedVTEPs records the underlay allowlist.
func (f *fakeDataplane) SetAllowedVTEPs(_ context.Context, vteps []netip.Addr) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.allowed = append([]netip.Addr(nil), vteps...)
	return nil
}

// EndpointInUse: the fake has no containers; inUse marks endpoints that one
// holds.
func (f *fakeDataplane) EndpointInUse(id string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.inUse[id], nil
}

// EndpointsInUse lists the endpoints inUse marks, as the kernel names them.
func (f *fakeDataplane) EndpointsInUse() ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var keys []string
	for id, in := range f.inUse {
		if in {
			keys = append(keys, id[:min(len(id), 10)])
		}
	}
	slices.Sort(keys)
	return keys, nil
}

// NetworksInUse lists the endpoints inUse marks by their network's VNI.
func (f *fakeDataplane) NetworksInUse() (map[uint32][]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	byVNI := map[uint32][]string{}
	for id, in := range f.inUse {
		if ep, ok := f.endpoints[id]; ok && in {
			byVNI[ep.VNI] = append(byVNI[ep.VNI], id[:min(len(id), 10)])
		}
	}
	return byVNI, nil
}

func (f *fakeDataplane) peerIPs() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, p := range f.peers {
		out = append(out, p.IP.String())
	}
	return out
}

func openStore(t *testing.T, path string) kvstore.Store {
	t.Helper()
	s, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: path, Prefix: "test/"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func newTestDriver(t *testing.T, store kvstore.Store, node, vtep string, dp Dataplane) *Driver {
	t.Helper()
	return newHostDriver(t, store, node, node, vtep, dp)
}

// newHostDriver is newTestDriver with a host ID distinct from the node name.
func newHostDriver(t *testing.T, store kvstore.Store, hostID, node, vtep string, dp Dataplane, opts ...func(*Config)) *Driver {
	t.Helper()
	cfg := Config{HostID: hostID, Node: node, VTEP: netip.MustParseAddr(vtep), Shared: true, OwnsAddressSpace: func(s string) bool { return s == "ours" }}
	for _, o := range opts {
		o(&cfg)
	}
	d, err := New(cfg, store, dp)
	if err != nil {
		t.Fatal(err)
	}
	d.Start()
	t.Cleanup(func() { d.Close() })
	select {
	case <-d.Ready():
	case <-time.After(5 * time.Second):
		t.Fatal("driver did not restore")
	}
	return d
}

func createReq(id string, generic map[string]interface{}, subnet string) *network.CreateNetworkRequest {
	gw := strings.TrimSuffix(subnet, "0/24") + "1/24"
	return &network.CreateNetworkRequest{
		NetworkID: id,
		Options:   map[string]interface{}{optGeneric: generic},
		IPv4Data:  []*network.IPAMData{{AddressSpace: "ours", Pool: subnet, Gateway: gw}},
	}
}

// allKeys lists the store's keys but the host records (hosts/<id>), which
// stay by design: they prove at restart that the store is this host's.
func allKeys(t *testing.T, s kvstore.Store) []string {
	t.Helper()
	pairs, err := s.List(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	// Every write stamps, every deletion takes the stamps with it.
	for _, e := range cluster.StampErrors(pairs) {
		t.Error(e)
	}
	var keys []string
	for _, p := range pairs {
		if strings.HasPrefix(p.Key, "hosts/") || strings.HasPrefix(p.Key, "members/") || cluster.IsStamp(p.Key) {
			continue
		}
		keys = append(keys, p.Key)
	}
	return keys
}

func TestParseNetworkOptions(t *testing.T) {
	cases := []struct {
		name    string
		generic map[string]interface{}
		extra   map[string]interface{}
		wantErr string
		check   func(*networkOptions) error
	}{
		{name: "empty"},
		{name: "name vni mtu", generic: map[string]interface{}{"name": "app", "vni": "42", "mtu": "1400"}, check: func(o *networkOptions) error {
			if o.name != "app" || o.vni != 42 || o.mtu != 1400 {
				return fmt.Errorf("got %+v", o)
			}
			return nil
		}},
		{name: "docker mtu key", generic: map[string]interface{}{optDockerMTU: "1300"}, check: func(o *networkOptions) error {
			if o.mtu != 1300 {
				return fmt.Errorf("mtu %d", o.mtu)
			}
			return nil
		}},
		{name: "mtu keys disagree", generic: map[string]interface{}{optDockerMTU: "1300", "mtu": "1400"}, wantErr: "disagree"},
		{name: "unknown option", generic: map[string]interface{}{"vxlan_id": "1"}, wantErr: "unknown option vxlan_id"},
		{name: "vni zero", generic: map[string]interface{}{"vni": "0"}, wantErr: "vni"},
		{name: "vni too big", generic: map[string]interface{}{"vni": "16777216"}, wantErr: "vni"},
		{name: "vni not a number", generic: map[string]interface{}{"vni": "x"}, wantErr: "vni"},
		{name: "mtu too small", generic: map[string]interface{}{"mtu": "500"}, wantErr: "minimum of 576"},
		{name: "mtu not a number", generic: map[string]interface{}{"mtu": "big"}, wantErr: "mtu"},
		{name: "non-string option", generic: map[string]interface{}{"vni": 5.0}, wantErr: "want a string"},
		{name: "internal as string", extra: map[string]interface{}{optInternal: "true"}, check: func(o *networkOptions) error {
			if !o.internal {
				return errors.New("internal not set")
			}
			return nil
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			req := createReq("n1", tc.generic, "10.1.0.0/24")
			for k, v := range tc.extra {
				req.Options[k] = v
			}
			o, err := parseNetworkOptions(req)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tc.check != nil {
				if err := tc.check(o); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// FuzzCreateNetworkRequest decodes arbitrary request bodies as Docker would
// send them: parsing must never panic, and what it accepts is in range.
func FuzzCreateNetworkRequest(f *testing.F) {
	f.Add(`{"NetworkID":"x","Options":{"com.docker.network.generic":{"name":"app","vni":"7"}},"IPv4Data":[{"AddressSpace":"ours","Pool":"10.0.0.0/24","Gateway":"10.0.0.1/24"}]}`)
	f.Add(`{"Options":{"com.docker.network.generic":"oops","com.docker.network.internal":"true"}}`)
	f.Add(`{"IPv6Data":[{"Pool":"fd00::/64","Gateway":"fd00::1/64"},null]}`)
	f.Add(`{"Options":{"com.docker.network.generic":{"egress":"host"},"com.docker.network.internal":true},"IPv4Data":[{"Pool":"10.0.0.0/24","Gateway":"10.0.0.1/24"}]}`)
	f.Fuzz(func(t *testing.T, body string) {
		var req network.CreateNetworkRequest
		if json.Unmarshal([]byte(body), &req) != nil {
			return
		}
		o, err := parseNetworkOptions(&req)
		if err != nil {
			return
		}
		if o.vni > maxVNI || (o.mtu != 0 && o.mtu < minMTUv4) {
			t.Fatalf("accepted out-of-range options %+v", o)
		}
		if hostEgress(o.egressMode) && (o.internal || !hasIPv4Gateway(o.gateways)) {
			t.Fatalf("accepted egress=host on an internal network or one without an IPv4 gateway: %+v", o)
		}
		if _, err := cluster.Key(o.name, o.subnets); err == nil && o.name != "" && !cluster.ValidName(o.name) {
			t.Fatalf("accepted bad name %q", o.name)
		}
	})
}

func TestCreateNetworkRollsBack(t *testing.T) {
	store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
	dp := newFake()
	d := newTestDriver(t, store, "a", "192.0.2.1", dp)
	dp.failNet = errors.New("injected")
	err := d.CreateNetwork(createReq("n1", map[string]interface{}{"name": "app"}, "10.1.0.0/24"))
	if err == nil || !strings.Contains(err.Error(), "injected") {
		t.Fatalf("CreateNetwork error %v, want the injected failure", err)
	}
	if keys := allKeys(t, store); len(keys) != 0 {
		t.Fatalf("failed CreateNetwork left keys: %v", keys)
	}
	dp.failNet = nil
	if err := d.CreateNetwork(createReq("n1", map[string]interface{}{"name": "app"}, "10.1.0.0/24")); err != nil {
		t.Fatal(err)
	}
	// Replayed: success, nothing new.
	if err := d.CreateNetwork(createReq("n1", map[string]interface{}{"name": "app"}, "10.1.0.0/24")); err != nil {
		t.Fatalf("replayed CreateNetwork: %v", err)
	}
}

func TestEndpointLifecycleAndPeers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db")
	dpA, dpB := newFake(), newFake()
	a := newTestDriver(t, openStore(t, path), "a", "192.0.2.1", dpA)
	b := newTestDriver(t, openStore(t, path), "b", "192.0.2.2", dpB)
	for _, d := range []*Driver{a, b} {
		if err := d.CreateNetwork(createReq("net-"+d.cfg.Node, map[string]interface{}{"name": "app"}, "10.1.0.0/24")); err != nil {
			t.Fatal(err)
		}
	}

	// No MAC given: the driver answers one, derived from the address.
	resp, err := a.CreateEndpoint(&network.CreateEndpointRequest{NetworkID: "net-a", EndpointID: "ep1", Interface: &network.EndpointInterface{Address: "10.1.0.2/24"}})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Interface == nil || resp.Interface.MacAddress != "02:42:0a:01:00:02" {
		t.Fatalf("CreateEndpoint response %+v, want MAC 02:42:0a:01:00:02", resp.Interface)
	}
	// A MAC given by Docker is not echoed (Docker refuses that).
	resp, err = a.CreateEndpoint(&network.CreateEndpointRequest{NetworkID: "net-a", EndpointID: "ep2", Interface: &network.EndpointInterface{Address: "10.1.0.3/24", MacAddress: "02:00:00:00:00:03"}})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Interface != nil {
		t.Fatalf("CreateEndpoint echoed %+v", resp.Interface)
	}
	// Replay is success.
	if _, err := a.CreateEndpoint(&network.CreateEndpointRequest{NetworkID: "net-a", EndpointID: "ep1", Interface: &network.EndpointInterface{Address: "10.1.0.2/24"}}); err != nil {
		t.Fatalf("replayed CreateEndpoint: %v", err)
	}
	jr, err := a.Join(&network.JoinRequest{NetworkID: "net-a", EndpointID: "ep1", SandboxKey: "/var/run/docker/netns/abc"})
	if err != nil {
		t.Fatal(err)
	}
	// The network's egress is the default, auto: a container without
	// published ports goes out through its host's gateway.
	if jr.InterfaceName.SrcName != vxlan.ContainerIfName("ep1") || jr.InterfaceName.DstPrefix != "eth" || jr.Gateway != "10.1.0.1" {
		t.Fatalf("Join response %+v", jr)
	}

	// Host b programs a's endpoints as peers.
	waitFor(t, func() bool { return len(dpB.peerIPs()) == 2 })
	if len(dpA.peerIPs()) != 0 {
		t.Fatalf("host a programmed its own endpoints as peers: %v", dpA.peerIPs())
	}

	if err := a.Leave(&network.LeaveRequest{NetworkID: "net-a", EndpointID: "ep1"}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"ep1", "ep2", "ep1", "unknown"} {
		if err := a.DeleteEndpoint(&network.DeleteEndpointRequest{NetworkID: "net-a", EndpointID: id}); err != nil {
			t.Fatalf("DeleteEndpoint %s: %v", id, err)
		}
	}
	waitFor(t, func() bool { return len(dpB.peerIPs()) == 0 })
	// After the first list, changes go to the data plane as differences.
	dpB.mu.Lock()
	changes := dpB.peerChanges
	dpB.mu.Unlock()
	if changes == 0 {
		t.Fatal("host b wrote no change of its peers as a difference (ChangePeers)")
	}

	// Join of an unknown endpoint and calls on unknown networks are clear errors.
	if _, err := a.Join(&network.JoinRequest{NetworkID: "net-a", EndpointID: "nope"}); err == nil || !strings.Contains(err.Error(), "unknown endpoint") {
		t.Fatalf("Join unknown endpoint: %v", err)
	}
	if _, err := a.CreateEndpoint(&network.CreateEndpointRequest{NetworkID: "nope", EndpointID: "x", Interface: &network.EndpointInterface{Address: "10.1.0.9/24"}}); err == nil || !strings.Contains(err.Error(), "not a consul-overlay network") {
		t.Fatalf("CreateEndpoint on unknown network: %v", err)
	}
	for _, d := range []*Driver{a, b} {
		if err := d.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "net-" + d.cfg.Node}); err != nil {
			t.Fatal(err)
		}
	}
	if keys := allKeys(t, openStore(t, path)); len(keys) != 0 {
		t.Fatalf("keys left after the last host left: %v", keys)
	}
}

func TestRestoreAfterRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db")
	store := openStore(t, path)
	d1 := newTestDriver(t, store, "a", "192.0.2.1", newFake())
	if err := d1.CreateNetwork(createReq("n1", map[string]interface{}{"name": "app"}, "10.1.0.0/24")); err != nil {
		t.Fatal(err)
	}
	if _, err := d1.CreateEndpoint(&network.CreateEndpointRequest{NetworkID: "n1", EndpointID: "ep1", Interface: &network.EndpointInterface{Address: "10.1.0.2/24"}}); err != nil {
		t.Fatal(err)
	}
	d1.Close()

	dp := newFake()
	d2 := newTestDriver(t, store, "a", "192.0.2.1", dp)
	if len(dp.reconcile) != 1 || len(dp.reconcile[0].Networks) != 1 || len(dp.reconcile[0].Endpoints) != 1 {
		t.Fatalf("restore reconciled %+v, want one network and one endpoint", dp.reconcile)
	}
	if _, err := d2.Join(&network.JoinRequest{NetworkID: "n1", EndpointID: "ep1"}); err != nil {
		t.Fatalf("Join of an endpoint created before the restart: %v", err)
	}
	if err := d2.DeleteEndpoint(&network.DeleteEndpointRequest{NetworkID: "n1", EndpointID: "ep1"}); err != nil {
		t.Fatal(err)
	}
	if err := d2.DeleteNetwork(&network.DeleteNetworkRequest{NetworkID: "n1"}); err != nil {
		t.Fatal(err)
	}
	if keys := allKeys(t, store); len(keys) != 0 {
		t.Fatalf("keys left: %v", keys)
	}
}

func TestForeignIPAMRefusedWhenShared(t *testing.T) {
	store := openStore(t, filepath.Join(t.TempDir(), "s.db"))
	d := newTestDriver(t, store, "a", "192.0.2.1", newFake())
	req := createReq("n1", nil, "10.1.0.0/24")
	req.IPv4Data[0].AddressSpace = "LocalDefault"
	err := d.CreateNetwork(req)
	if err == nil || !strings.Contains(err.Error(), "--ipam-driver consul-overlay") {
		t.Fatalf("error %v, want advice to use --ipam-driver consul-overlay", err)
	}
	if keys := allKeys(t, store); len(keys) != 0 {
		t.Fatalf("refused request left keys: %v", keys)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
