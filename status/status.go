package status

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	"consul-overlay/cluster"
	"consul-overlay/kvstore"
	"consul-overlay/vxlan"
)

// Config says what to look at. Zero values are documented per field.
type Config struct {
	// Store is the cluster state (nil: the store could not be opened;
	// StoreError says why and only the kernel is reported).
	Store      kvstore.Store
	StoreError error
	// StoreKind is "consul" or "embedded", StoreAddress the Consul
	// address or the embedded file, Prefix the KV prefix.
	StoreKind, StoreAddress, Prefix string
	// HostID is this host's identity (DATA_DIR/host-id; "": none yet, the
	// plugin never ran with this DATA_DIR).
	HostID string
	// Node is the node name from the settings ("": taken from this host's
	// record in the store).
	Node string
	// VTEP is this host's underlay address as the settings resolve it
	// (invalid: unknown).
	VTEP netip.Addr
	// Kernel reads this instance's overlays from the kernel (nil: no
	// kernel part, no drift).
	Kernel func() ([]vxlan.KernelNetwork, error)
	// Timeout bounds the store reads (0: 10s).
	Timeout time.Duration
}

// Report is the status of one host's view of the cluster. The JSON field
// names are stable: scripts read them.
type Report struct {
	Host     HostInfo  `json:"host"`
	Store    StoreInfo `json:"store"`
	Networks []Network `json:"networks"`
	Hosts    []Host    `json:"hosts"`
	// Drift lists every difference between the store and this host's
	// kernel; empty when they match (or when either could not be read:
	// see Errors).
	Drift []Drift `json:"drift"`
	// Errors are what could not be read.
	Errors []string `json:"errors,omitempty"`

	// ClusterNetworks are the networks created once for every host, with
	// the conflicts recorded on them.
	ClusterNetworks []ClusterNetwork `json:"cluster_networks,omitempty"`
}

// HostInfo is this host.
type HostInfo struct {
	ID   string `json:"id"`
	Node string `json:"node"`
	VTEP string `json:"vtep"`
}

// StoreInfo is the state store.
type StoreInfo struct {
	Kind      string `json:"kind"`
	Address   string `json:"address"`
	Prefix    string `json:"prefix"`
	Reachable bool   `json:"reachable"`
	Error     string `json:"error,omitempty"`
}

// Network is one logical network.
type Network struct {
	Key      string   `json:"key"`
	Name     string   `json:"name,omitempty"`
	VNI      uint32   `json:"vni"`
	Subnets  []string `json:"subnets"`
	Gateways []string `json:"gateways,omitempty"`
	// MTU is the configured MTU (0: derived from each host's underlay);
	// KernelMTU the MTU of this host's VXLAN device (0: none here).
	MTU       int  `json:"mtu"`
	KernelMTU int  `json:"kernel_mtu,omitempty"`
	Internal  bool `json:"internal,omitempty"`
	// Options are the network's -o options (egress, consul_api,
	// encrypted, register, ...) as its first host gave them.
	Options map[string]string `json:"options,omitempty"`
	// Egress is the network's egress: its -o egress, or the default its
	// first host chose (options' egress_default); "" for neither (docker).
	Egress string `json:"egress,omitempty"`
	// Member says this host is a member.
	Member bool `json:"member"`
	// Hosts are the member hosts' node names (or IDs where a name is
	// shared or missing), sorted.
	Hosts           []string   `json:"hosts"`
	LocalEndpoints  int        `json:"local_endpoints"`
	RemoteEndpoints int        `json:"remote_endpoints"`
	Endpoints       []Endpoint `json:"endpoints"`
}

// Endpoint is one endpoint record of a network's current incarnation.
type Endpoint struct {
	ID     string `json:"id"`
	HostID string `json:"host_id"`
	Node   string `json:"node"`
	IPv4   string `json:"ipv4,omitempty"`
	IPv6   string `json:"ipv6,omitempty"`
	MAC    string `json:"mac"`
	Local  bool   `json:"local"`
	Joined bool   `json:"joined"`
}

// Host is one host of the cluster: its host record (hosts/<id>, held by
// the plugin's Consul session while it runs) and its members/<id> record.
type Host struct {
	ID   string `json:"id"`
	Node string `json:"node"`
	VTEP string `json:"vtep"`
	Self bool   `json:"self"`
	// Alive: the host record is held by a Consul session, so the host's
	// plugin is running and passing its liveness check. Always false on the embedded
	// store (there is no session).
	Alive   bool      `json:"alive"`
	Started time.Time `json:"started,omitzero"`
	PID     int       `json:"pid,omitempty"`
	Version string    `json:"version,omitempty"`
	// Networks is how many logical networks the host is a member of.
	Networks int `json:"networks"`
}

// Drift is one difference between the store and the kernel.
type Drift struct {
	Network string `json:"network"` // logical network key ("" for a device no network lists)
	VNI     uint32 `json:"vni"`
	Device  string `json:"device"` // the kernel device the entry belongs to
	// Kind is "device", "state" (the VXLAN device is down), "mtu",
	// "neighbour", "fdb", "flood" or "port".
	Kind string `json:"kind"`
	// Entry names the object: an IP (neighbour), a MAC (fdb), a VTEP
	// (flood), an endpoint ID (port) or the device name.
	Entry string `json:"entry"`
	// Problem is "missing" (in the store, not in the kernel),
	// "unexpected" (in the kernel, not in the store) or "wrong".
	Problem string `json:"problem"`
	Want    string `json:"want,omitempty"`
	Have    string `json:"have,omitempty"`
}

func (d Drift) String() string {
	s := fmt.Sprintf("%s %s %s on %s", d.Problem, d.Kind, d.Entry, d.Device)
	if d.Want != "" || d.Have != "" {
		s += fmt.Sprintf(" (want %q, have %q)", d.Want, d.Have)
	}
	return s
}

// hostRecord is the part of the plugin's hosts/<id> record status reads.
type hostRecord struct {
	ID      string    `json:"id"`
	Node    string    `json:"node"`
	VTEP    string    `json:"vtep"`
	PID     int       `json:"pid"`
	Started time.Time `json:"started"`
	Version string    `json:"version"`
}

// Collect reads the store and the kernel and builds the report. Whatever
// cannot be read goes to Report.Errors; Collect itself fails only when
// ctx ends.
func Collect(ctx context.Context, cfg Config) (*Report, error) {
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	r := &Report{
		Host:     HostInfo{ID: cfg.HostID, Node: cfg.Node},
		Store:    StoreInfo{Kind: cfg.StoreKind, Address: cfg.StoreAddress, Prefix: cfg.Prefix},
		Networks: []Network{},
		Hosts:    []Host{},
		Drift:    []Drift{},
	}
	if cfg.VTEP.IsValid() {
		r.Host.VTEP = cfg.VTEP.String()
	}
	var kernel []vxlan.KernelNetwork
	kernelOK := false
	if cfg.Kernel != nil {
		k, err := cfg.Kernel()
		if err != nil {
			r.Errors = append(r.Errors, fmt.Sprintf("read the kernel: %v", err))
		} else {
			kernel, kernelOK = k, true
		}
	}
	if cfg.Store == nil {
		if cfg.StoreError != nil {
			r.Store.Error = cfg.StoreError.Error()
		}
		return r, ctx.Err()
	}
	sctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	st, err := cluster.ReadState(sctx, cfg.Store)
	if err != nil {
		r.Store.Error = err.Error()
		return r, ctx.Err()
	}
	hostPairs, err := cfg.Store.List(sctx, "hosts/")
	if err != nil {
		r.Store.Error = err.Error()
		return r, ctx.Err()
	}
	r.Store.Reachable = true
	for _, k := range st.Unreadable {
		r.Errors = append(r.Errors, fmt.Sprintf("unreadable record %s", k))
	}
	r.Hosts = hosts(cfg.HostID, st, hostPairs)
	// Join records (joins/<host>/<endpoint>) say which endpoints a
	// container joined; older endpoint records carry it themselves.
	joined := map[string]bool{}
	if jp, err := cfg.Store.List(sctx, "joins/"); err != nil {
		r.Errors = append(r.Errors, fmt.Sprintf("read join records: %v", err))
	} else {
		for _, p := range jp {
			joined[strings.TrimPrefix(p.Key, "joins/")] = true
		}
	}
	cn, err := clusterNetworks(sctx, cfg.Store)
	if err != nil {
		r.Errors = append(r.Errors, err.Error())
	}
	r.ClusterNetworks = cn
	for _, h := range r.Hosts {
		if h.Self {
			if r.Host.Node == "" {
				r.Host.Node = h.Node
			}
			if r.Host.VTEP == "" {
				r.Host.VTEP = h.VTEP
			}
		}
	}
	byVNI := map[uint32]vxlan.KernelNetwork{}
	for _, k := range kernel {
		byVNI[k.VNI] = k
	}
	memberVNIs := map[uint32]bool{}
	for _, n := range st.Networks {
		out, eps := network(cfg.HostID, n, st.Endpoints[n.Key], joined)
		k, here := byVNI[n.VNI]
		if here {
			out.KernelMTU = k.MTU
		}
		r.Networks = append(r.Networks, out)
		if !out.Member || cfg.HostID == "" {
			continue
		}
		memberVNIs[n.VNI] = true
		if kernelOK {
			r.Drift = append(r.Drift, drift(cfg.HostID, n, eps, k, here)...)
		}
	}
	if kernelOK {
		for _, k := range kernel {
			if memberVNIs[k.VNI] {
				continue
			}
			for _, dev := range []string{k.VXLAN, k.Bridge} {
				if dev != "" {
					r.Drift = append(r.Drift, Drift{VNI: k.VNI, Device: dev, Kind: "device", Entry: dev, Problem: "unexpected"})
				}
			}
		}
	}
	return r, ctx.Err()
}

// hosts merges the hosts/ records (with their sessions) and the members/
// records, sorted by node name then ID.
func hosts(self string, st cluster.State, pairs []*kvstore.Pair) []Host {
	by := map[string]*Host{}
	get := func(id string) *Host {
		h := by[id]
		if h == nil {
			h = &Host{ID: id, Self: id == self && id != ""}
			by[id] = h
		}
		return h
	}
	for _, p := range pairs {
		var rec hostRecord
		if kvstore.Decode(p.Value, &rec) != nil {
			continue
		}
		id := rec.ID
		if id == "" {
			id = strings.TrimPrefix(p.Key, "hosts/")
		}
		h := get(id)
		h.Node, h.VTEP, h.PID, h.Started, h.Version = rec.Node, rec.VTEP, rec.PID, rec.Started, rec.Version
		h.Alive = p.Session != ""
	}
	for _, m := range st.Members {
		h := get(m.HostID)
		if h.Node == "" {
			h.Node = m.Node
		}
		if h.VTEP == "" {
			h.VTEP = m.VTEP
		}
	}
	for _, n := range st.Networks {
		for id, m := range n.Hosts {
			h := get(id)
			h.Networks++
			if h.Node == "" {
				h.Node = m.Node
			}
			if h.VTEP == "" {
				h.VTEP = m.VTEP
			}
		}
	}
	out := make([]Host, 0, len(by))
	for _, h := range by {
		out = append(out, *h)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Node != out[j].Node {
			return out[i].Node < out[j].Node
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// network summarises one logical network; eps are the records of its
// current incarnation of member hosts.
func network(self string, n cluster.Network, all []cluster.Endpoint, joined map[string]bool) (Network, []cluster.Endpoint) {
	out := Network{
		Key: n.Key, Name: n.Name, VNI: n.VNI, MTU: n.MTU, Internal: n.Internal, Options: maps.Clone(n.Options), Egress: n.Egress(),
		Subnets: slices.Clone(n.Subnets), Gateways: slices.Clone(n.Gateways),
		Endpoints: []Endpoint{},
	}
	if out.Subnets == nil {
		out.Subnets = []string{}
	}
	_, out.Member = n.Hosts[self]
	count := map[string]int{}
	for _, m := range n.Hosts {
		count[m.Node]++
	}
	out.Hosts = []string{}
	for id, m := range n.Hosts {
		name := m.Node
		if name == "" || count[name] > 1 {
			name = fmt.Sprintf("%s (%s)", m.Node, id)
		}
		out.Hosts = append(out.Hosts, name)
	}
	sort.Strings(out.Hosts)
	var eps []cluster.Endpoint
	for _, ep := range all {
		if ep.Incarnation != n.Incarnation {
			continue
		}
		if _, member := n.Hosts[ep.HostID]; !member {
			continue
		}
		eps = append(eps, ep)
		local := ep.HostID == self && self != ""
		if local {
			out.LocalEndpoints++
		} else {
			out.RemoteEndpoints++
		}
		out.Endpoints = append(out.Endpoints, Endpoint{
			ID: ep.ID, HostID: ep.HostID, Node: ep.Node, IPv4: ep.IPv4, IPv6: ep.IPv6,
			MAC: ep.MAC, Local: local, Joined: ep.Sandbox != "" || joined[ep.HostID+"/"+ep.ID],
		})
	}
	sort.Slice(out.Endpoints, func(i, j int) bool {
		a, b := out.Endpoints[i], out.Endpoints[j]
		if a.Node != b.Node {
			return a.Node < b.Node
		}
		return a.ID < b.ID
	})
	return out, eps
}

// drift compares one network this host is a member of with the kernel
// (k, here: what the kernel holds of its VNI).
func drift(self string, n cluster.Network, eps []cluster.Endpoint, k vxlan.KernelNetwork, here bool) []Drift {
	vxName, brName := vxlan.VXLANName(n.VNI), vxlan.BridgeName(n.VNI)
	d := func(dev, kind, entry, problem, want, have string) Drift {
		return Drift{Network: n.Key, VNI: n.VNI, Device: dev, Kind: kind, Entry: entry, Problem: problem, Want: want, Have: have}
	}
	var out []Drift
	if !here || k.Bridge == "" {
		out = append(out, d(brName, "device", brName, "missing", "", ""))
	}
	if !here || k.VXLAN == "" {
		// Without the device there are no entries to compare.
		return append(out, d(vxName, "device", vxName, "missing", "", ""))
	}
	if !k.Up {
		out = append(out, d(vxName, "state", vxName, "wrong", "up", "down"))
	}
	if n.MTU > 0 && k.MTU != n.MTU {
		out = append(out, d(vxName, "mtu", vxName, "wrong", fmt.Sprint(n.MTU), fmt.Sprint(k.MTU)))
	}

	// Local endpoints: one bridge port each.
	wantPorts := map[string]string{}
	for _, ep := range eps {
		if ep.HostID == self {
			wantPorts[vxlan.HostIfName(ep.ID)] = ep.ID
		}
	}
	for _, name := range sortedKeys(wantPorts) {
		if !slices.Contains(k.Ports, name) {
			out = append(out, d(brName, "port", wantPorts[name], "missing", name, ""))
		}
	}
	for _, p := range k.Ports {
		if _, ok := wantPorts[p]; !ok {
			out = append(out, d(brName, "port", p, "unexpected", "", p))
		}
	}

	// Remote peers: neighbour, FDB and flood entries of the VXLAN device.
	// With duplicates (two records claiming one IP or MAC) any of the
	// claimed values is accepted, as the data plane picks the latest.
	peers := cluster.DesiredPeers(self, n, eps)
	wantNeigh := map[netip.Addr][]string{}
	wantFDB := map[string][]netip.Addr{}
	wantFlood := map[netip.Addr]bool{}
	for _, p := range peers {
		mac := p.MAC.String()
		wantNeigh[p.IP] = append(wantNeigh[p.IP], mac)
		wantFDB[mac] = append(wantFDB[mac], p.VTEP)
		wantFlood[p.VTEP] = true
	}
	haveNeigh := map[netip.Addr]string{}
	for _, e := range k.Neighbours {
		haveNeigh[e.IP] = e.MAC
	}
	haveFDB := map[string][]netip.Addr{}
	haveFlood := map[netip.Addr]bool{}
	for _, e := range k.FDB {
		if e.MAC == vxlan.FloodMAC {
			haveFlood[e.VTEP] = true
			continue
		}
		haveFDB[e.MAC] = append(haveFDB[e.MAC], e.VTEP)
	}
	for _, ip := range sortedAddrKeys(wantNeigh) {
		macs := wantNeigh[ip]
		have, ok := haveNeigh[ip]
		switch {
		case !ok:
			out = append(out, d(vxName, "neighbour", ip.String(), "missing", macs[len(macs)-1], ""))
		case !slices.Contains(macs, have):
			out = append(out, d(vxName, "neighbour", ip.String(), "wrong", macs[len(macs)-1], have))
		}
	}
	for _, ip := range sortedAddrKeys(haveNeigh) {
		if _, ok := wantNeigh[ip]; !ok {
			out = append(out, d(vxName, "neighbour", ip.String(), "unexpected", "", haveNeigh[ip]))
		}
	}
	for _, mac := range sortedKeys(wantFDB) {
		vteps := wantFDB[mac]
		have := haveFDB[mac]
		switch {
		case len(have) == 0:
			out = append(out, d(vxName, "fdb", mac, "missing", vteps[len(vteps)-1].String(), ""))
		case len(have) > 1 || !slices.Contains(vteps, have[0]):
			out = append(out, d(vxName, "fdb", mac, "wrong", vteps[len(vteps)-1].String(), joinAddrs(have)))
		}
	}
	for _, mac := range sortedKeys(haveFDB) {
		if _, ok := wantFDB[mac]; !ok {
			out = append(out, d(vxName, "fdb", mac, "unexpected", "", joinAddrs(haveFDB[mac])))
		}
	}
	for _, v := range sortedAddrKeys(wantFlood) {
		if !haveFlood[v] {
			out = append(out, d(vxName, "flood", v.String(), "missing", v.String(), ""))
		}
	}
	for _, v := range sortedAddrKeys(haveFlood) {
		if !wantFlood[v] {
			out = append(out, d(vxName, "flood", v.String(), "unexpected", "", v.String()))
		}
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func sortedAddrKeys[V any](m map[netip.Addr]V) []netip.Addr {
	out := make([]netip.Addr, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

func joinAddrs(as []netip.Addr) string {
	s := make([]string, len(as))
	for i, a := range as {
		s[i] = a.String()
	}
	return strings.Join(s, ",")
}
