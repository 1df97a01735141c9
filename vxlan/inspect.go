package vxlan

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// KernelNetwork is what the kernel holds of one overlay of one owner: its
// devices and the VXLAN device's static entries. It is read, never
// written: see Inspect.
type KernelNetwork struct {
	VNI    uint32 `json:"vni"`
	VXLAN  string `json:"vxlan,omitempty"`  // vx-<vni>, "" when missing
	Bridge string `json:"bridge,omitempty"` // vxbr-<vni>, "" when missing
	MTU    int    `json:"mtu,omitempty"`    // the VXLAN device's MTU
	// Dataplane: the bridge and the VXLAN device are in the data-plane
	// namespace (InspectDataplane), Gateway the link in the host's
	// namespace that carries the network's gateway addresses.
	Dataplane bool   `json:"dataplane,omitempty"`
	Gateway   string `json:"gateway,omitempty"` // vxg-<vni>, "" when missing or not in that layout
	Up        bool   `json:"up"`                // the VXLAN device is up
	// Ports are the host ends of local endpoints (vxh-<id10>) on the
	// bridge: this host's endpoints of the network.
	Ports []string `json:"ports,omitempty"`
	// Neighbours are the permanent neighbour entries IP→MAC of the VXLAN
	// device (one per remote endpoint address).
	Neighbours []NeighEntry `json:"neighbours,omitempty"`
	// FDB are the VXLAN device's own forwarding entries MAC→VTEP; the
	// all-zeros MAC is the flood list (one entry per remote VTEP).
	FDB []FDBEntry `json:"fdb,omitempty"`
}

// NeighEntry is one permanent neighbour entry.
type NeighEntry struct {
	IP  netip.Addr `json:"ip"`
	MAC string     `json:"mac"`
}

// FDBEntry is one forwarding entry of a VXLAN device.
type FDBEntry struct {
	MAC  string     `json:"mac"`
	VTEP netip.Addr `json:"vtep"`
}

// FloodMAC is the all-zeros MAC of the flood entries, as Inspect prints it.
const FloodMAC = "00:00:00:00:00:00"

// Inspect reads the overlays of owner (see OwnerMark) from the kernel of
// the network namespace h is bound to (nil: the caller's): every
// vx-/vxbr- device carrying the owner's mark, the endpoint ports on the
// bridges and the VXLAN devices' neighbour and FDB entries. It changes
// nothing and needs no Manager (so no VTEP, no firewall, no sysctl), which
// is what a read-only status command wants. Sorted by VNI.
//
// Equivalent to: `ip -d link show`, `ip neigh show dev vx-0a1b nud
// permanent` and `bridge fdb show dev vx-0a1b self`.
func Inspect(h *netlink.Handle, owner string) ([]KernelNetwork, error) {
	return InspectDataplane(h, nil, owner)
}

// InspectDataplane is Inspect of a Manager with a data-plane namespace
// (Config.DataplaneNS): h is bound to the host's namespace (nil: the
// caller's), dp to the data-plane namespace (nil: none, which is Inspect).
// A network is reported once, wherever its devices are; Dataplane says
// they are in dp, Gateway names its gateway link in h's namespace.
//
// Equivalent to: Inspect in each namespace (`ip -n DP ...` for the second).
func InspectDataplane(h, dp *netlink.Handle, owner string) ([]KernelNetwork, error) {
	if h == nil {
		var err error
		if h, err = netlink.NewHandle(); err != nil {
			return nil, fmt.Errorf("open netlink handle: %w", err)
		}
		defer h.Close()
	}
	nets := map[uint32]*KernelNetwork{}
	if err := inspectNS(h, owner, false, nets); err != nil {
		return nil, err
	}
	if dp != nil {
		if err := inspectNS(dp, owner, true, nets); err != nil {
			return nil, fmt.Errorf("data-plane namespace: %w", err)
		}
	}
	out := make([]KernelNetwork, 0, len(nets))
	for _, n := range nets {
		sort.Strings(n.Ports)
		out = append(out, *n)
	}
	slices.SortFunc(out, func(a, b KernelNetwork) int { return int(a.VNI) - int(b.VNI) })
	return out, nil
}

// inspectNS adds what the namespace h is bound to holds of owner's
// overlays to nets; dp: it is the data-plane namespace.
func inspectNS(h *netlink.Handle, owner string, dp bool, nets map[uint32]*KernelNetwork) error {
	mark := OwnerMark(owner)
	links, err := retryDump(h.LinkList)
	if err != nil {
		return fmt.Errorf("list links: %w", err)
	}
	get := func(vni uint32) *KernelNetwork {
		n := nets[vni]
		if n == nil {
			n = &KernelNetwork{VNI: vni}
			nets[vni] = n
		}
		return n
	}
	byIndex := map[int]netlink.Link{}
	for _, l := range links {
		byIndex[l.Attrs().Index] = l
	}
	var vxs []netlink.Link
	for _, l := range links {
		a := l.Attrs()
		if a.Alias != mark {
			continue
		}
		if vni, ok := vniFromName(vxlanNameRE, a.Name); ok {
			n := get(vni)
			n.VXLAN, n.MTU, n.Up = a.Name, a.MTU, isUp(l)
			n.Dataplane = n.Dataplane || dp
			vxs = append(vxs, l)
		}
		if vni, ok := vniFromName(bridgeNameRE, a.Name); ok {
			n := get(vni)
			n.Bridge = a.Name
			n.Dataplane = n.Dataplane || dp
		}
		if vni, ok := vniFromName(gatewayNameRE, a.Name); ok && !dp {
			get(vni).Gateway = a.Name
		}
	}
	for _, l := range links {
		a := l.Attrs()
		if !hostNameRE.MatchString(a.Name) || a.MasterIndex == 0 {
			continue
		}
		if br, ok := byIndex[a.MasterIndex]; ok && br.Attrs().Alias == mark {
			if vni, ok := vniFromName(bridgeNameRE, br.Attrs().Name); ok {
				n := get(vni)
				n.Ports = append(n.Ports, a.Name)
			}
		}
	}
	for _, vx := range vxs {
		vni, _ := vniFromName(vxlanNameRE, vx.Attrs().Name)
		n := nets[vni]
		if err := inspectEntries(h, vx, n); err != nil {
			return err
		}
	}
	return nil
}

// inspectEntries reads the entries of one VXLAN device with the filters
// the Manager's own sync uses (syncPeerEntries), so what it reports is
// what SetPeers would compare.
func inspectEntries(h *netlink.Handle, vx netlink.Link, n *KernelNetwork) error {
	idx, name := vx.Attrs().Index, vx.Attrs().Name
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		ns, err := retryDump(func() ([]netlink.Neigh, error) { return h.NeighList(idx, fam) })
		if err != nil {
			return fmt.Errorf("list neighbours of %q: %w", name, err)
		}
		for _, e := range ns {
			ip, ok := netip.AddrFromSlice(e.IP)
			if !ok || e.State != netlink.NUD_PERMANENT || len(e.HardwareAddr) != 6 {
				continue
			}
			n.Neighbours = append(n.Neighbours, NeighEntry{IP: ip.Unmap(), MAC: e.HardwareAddr.String()})
		}
	}
	fdbs, err := retryDump(func() ([]netlink.Neigh, error) { return h.NeighList(idx, unix.AF_BRIDGE) })
	if err != nil {
		return fmt.Errorf("list fdb of %q: %w", name, err)
	}
	for _, e := range fdbs {
		if e.Flags&netlink.NTF_SELF == 0 || e.Flags&netlink.NTF_MASTER != 0 || len(e.HardwareAddr) != 6 {
			continue
		}
		vtep, ok := netip.AddrFromSlice(e.IP)
		if !ok {
			continue
		}
		n.FDB = append(n.FDB, FDBEntry{MAC: net.HardwareAddr(e.HardwareAddr).String(), VTEP: vtep.Unmap()})
	}
	slices.SortFunc(n.Neighbours, func(a, b NeighEntry) int { return a.IP.Compare(b.IP) })
	slices.SortFunc(n.FDB, func(a, b FDBEntry) int {
		if a.MAC != b.MAC {
			if a.MAC < b.MAC {
				return -1
			}
			return 1
		}
		return a.VTEP.Compare(b.VTEP)
	})
	return nil
}
