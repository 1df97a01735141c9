package harness

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"

	"consul-overlay/internal/testenv"
)

// RandomID returns a 64-hex-digit ID like Docker's network and endpoint IDs.
func RandomID() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// NetSpec describes `docker network create -d consul-overlay --ipam-driver
// consul-overlay --subnet Subnet4 [--subnet Subnet6] -o k=v...`.
type NetSpec struct {
	Subnet4, Subnet6 string
	Options          map[string]string
}

// Network is one Docker network on one host, as dockerd holds it.
type Network struct {
	P                 *Plugin
	ID                string
	Space             string
	Pool4, Pool6      string // IPAM pool IDs
	Subnet4, Gateway4 string
	Subnet6, Gateway6 string

	requiresMAC bool
}

// CreateNetwork does what dockerd does at `docker network create`: IPAM
// pool and gateway address, then CreateNetwork. On failure it releases
// what it took.
func (p *Plugin) CreateNetwork(spec NetSpec) (_ *Network, retErr error) {
	var spaces struct{ LocalDefaultAddressSpace string }
	if err := p.Call("/IpamDriver.GetDefaultAddressSpaces", nil, &spaces); err != nil {
		return nil, err
	}
	n := &Network{P: p, ID: RandomID(), Space: spaces.LocalDefaultAddressSpace}
	var err error
	if n.requiresMAC, err = p.requiresMAC(); err != nil {
		return nil, err
	}
	var undo []func() error
	defer func() {
		if retErr == nil {
			return
		}
		for i := len(undo) - 1; i >= 0; i-- {
			if err := undo[i](); err != nil {
				retErr = errors.Join(retErr, err)
			}
		}
	}()
	reqPool := func(subnet string, v6 bool) (id, pool, gw string, err error) {
		var pr struct{ PoolID, Pool string }
		if err = p.Call("/IpamDriver.RequestPool", map[string]any{"AddressSpace": n.Space, "Pool": subnet, "V6": v6}, &pr); err != nil {
			return
		}
		undo = append(undo, func() error {
			return p.Call("/IpamDriver.ReleasePool", map[string]any{"PoolID": pr.PoolID}, nil)
		})
		var ar struct{ Address string }
		opts := map[string]string{"RequestAddressType": "com.docker.network.gateway"}
		if err = p.Call("/IpamDriver.RequestAddress", map[string]any{"PoolID": pr.PoolID, "Options": opts}, &ar); err != nil {
			return
		}
		gwip, _, _ := strings.Cut(ar.Address, "/")
		undo = append(undo, func() error {
			return p.Call("/IpamDriver.ReleaseAddress", map[string]any{"PoolID": pr.PoolID, "Address": gwip}, nil)
		})
		return pr.PoolID, pr.Pool, ar.Address, nil
	}
	if n.Pool4, n.Subnet4, n.Gateway4, err = reqPool(spec.Subnet4, false); err != nil {
		return nil, err
	}
	v4data := []map[string]any{{"AddressSpace": n.Space, "Pool": n.Subnet4, "Gateway": n.Gateway4}}
	var v6data []map[string]any
	if spec.Subnet6 != "" {
		if n.Pool6, n.Subnet6, n.Gateway6, err = reqPool(spec.Subnet6, true); err != nil {
			return nil, err
		}
		v6data = []map[string]any{{"AddressSpace": n.Space, "Pool": n.Subnet6, "Gateway": n.Gateway6}}
	}
	generic := map[string]string{}
	for k, v := range spec.Options {
		generic[k] = v
	}
	req := map[string]any{
		"NetworkID": n.ID,
		"Options": map[string]any{
			"com.docker.network.generic":     generic,
			"com.docker.network.enable_ipv6": spec.Subnet6 != "",
			"com.docker.network.enable_ipv4": true,
		},
		"IPv4Data": v4data,
		"IPv6Data": v6data,
	}
	if err := p.Call("/NetworkDriver.CreateNetwork", req, nil); err != nil {
		return nil, err
	}
	return n, nil
}

// Remove does what dockerd does at `docker network rm`.
func (n *Network) Remove() error {
	p := n.P
	if err := p.Call("/NetworkDriver.DeleteNetwork", map[string]any{"NetworkID": n.ID}, nil); err != nil {
		return err
	}
	for _, x := range [][2]string{{n.Pool4, n.Gateway4}, {n.Pool6, n.Gateway6}} {
		if x[0] == "" {
			continue
		}
		ip, _, _ := strings.Cut(x[1], "/")
		if err := p.Call("/IpamDriver.ReleaseAddress", map[string]any{"PoolID": x[0], "Address": ip}, nil); err != nil {
			return err
		}
		if err := p.Call("/IpamDriver.ReleasePool", map[string]any{"PoolID": x[0]}, nil); err != nil {
			return err
		}
	}
	return nil
}

// Endpoint is one container's endpoint on a network. The steps of `docker
// run` are separate methods so that each can be timed.
type Endpoint struct {
	Net   *Network
	ID    string
	MAC   string // the MAC Docker sent, or the one the driver answered
	Addr4 netip.Prefix
	Addr6 netip.Prefix
	// SrcName is the interface the driver returned at Join.
	SrcName string
	// NS is the container namespace the interface was moved into, nil
	// while it is in the host's namespace.
	NS *testenv.NetNS

	sentMAC bool
}

// NewEndpoint prepares an endpoint: an ID and, if the IPAM driver
// requires one, a random locally administered MAC, as Docker does.
func (n *Network) NewEndpoint() *Endpoint {
	e := &Endpoint{Net: n, ID: RandomID()}
	if n.requiresMAC {
		mac := make([]byte, 6)
		_, _ = rand.Read(mac)
		mac[0] = mac[0]&0xfe | 0x02
		e.MAC = net.HardwareAddr(mac).String()
		e.sentMAC = true
	}
	return e
}

// RequestAddress takes the endpoint's addresses from IPAM.
func (e *Endpoint) RequestAddress() error {
	n := e.Net
	opts := map[string]string{}
	if e.sentMAC {
		opts["com.docker.network.endpoint.macaddress"] = e.MAC
	}
	var ar struct{ Address string }
	if err := n.P.Call("/IpamDriver.RequestAddress", map[string]any{"PoolID": n.Pool4, "Options": opts}, &ar); err != nil {
		return err
	}
	var err error
	if e.Addr4, err = netip.ParsePrefix(ar.Address); err != nil {
		return fmt.Errorf("RequestAddress answered %q: %w", ar.Address, err)
	}
	if n.Pool6 != "" {
		var ar6 struct{ Address string }
		if err := n.P.Call("/IpamDriver.RequestAddress", map[string]any{"PoolID": n.Pool6, "Options": opts}, &ar6); err != nil {
			return err
		}
		if e.Addr6, err = netip.ParsePrefix(ar6.Address); err != nil {
			return fmt.Errorf("RequestAddress answered %q: %w", ar6.Address, err)
		}
	}
	return nil
}

// Create sends CreateEndpoint.
func (e *Endpoint) Create() error {
	iface := map[string]string{"Address": e.Addr4.String()}
	if e.sentMAC {
		iface["MacAddress"] = e.MAC
	}
	if e.Addr6.IsValid() {
		iface["AddressIPv6"] = e.Addr6.String()
	}
	var cr struct{ Interface *struct{ MacAddress string } }
	req := map[string]any{"NetworkID": e.Net.ID, "EndpointID": e.ID, "Interface": iface, "Options": map[string]any{}}
	if err := e.Net.P.Call("/NetworkDriver.CreateEndpoint", req, &cr); err != nil {
		return err
	}
	if cr.Interface != nil && cr.Interface.MacAddress != "" {
		if e.sentMAC {
			return fmt.Errorf("CreateEndpoint answered MAC %s though Docker gave %s (Docker refuses that)", cr.Interface.MacAddress, e.MAC)
		}
		e.MAC = cr.Interface.MacAddress
	}
	return nil
}

// Join sends Join with the given sandbox key (a namespace path).
func (e *Endpoint) Join(sandboxKey string) error {
	var jr struct {
		InterfaceName struct{ SrcName, DstPrefix string }
	}
	req := map[string]any{"NetworkID": e.Net.ID, "EndpointID": e.ID, "SandboxKey": sandboxKey, "Options": map[string]any{}}
	if err := e.Net.P.Call("/NetworkDriver.Join", req, &jr); err != nil {
		return err
	}
	if jr.InterfaceName.SrcName == "" {
		return errors.New("Join answered no interface name")
	}
	e.SrcName = jr.InterfaceName.SrcName
	return nil
}

// MoveTo does libnetwork's part after Join: it moves the interface into
// the container namespace ns as eth0 with the endpoint's addresses, up.
func (e *Endpoint) MoveTo(ns *testenv.NetNS) error {
	addrs := []netip.Prefix{e.Addr4}
	if e.Addr6.IsValid() {
		addrs = append(addrs, e.Addr6)
	}
	if err := testenv.MoveAndConfigure(e.Net.P.Host.NS, ns, e.SrcName, "eth0", addrs); err != nil {
		return fmt.Errorf("configure container interface %s: %w", e.SrcName, err)
	}
	e.NS = ns
	return nil
}

// Attach runs RequestAddress, CreateEndpoint and Join; the interface stays
// in the host's namespace (the sandbox key is the host's namespace).
func (n *Network) Attach() (*Endpoint, error) {
	e := n.NewEndpoint()
	if err := e.RequestAddress(); err != nil {
		return nil, err
	}
	if err := e.Create(); err != nil {
		return nil, err
	}
	if err := e.Join(n.P.Host.NS.Path); err != nil {
		return nil, err
	}
	return e, nil
}

// Run starts a container: Attach, then a fresh namespace for it (removed
// when the test ends) and MoveTo.
func (n *Network) Run(t testing.TB) (*Endpoint, error) {
	t.Helper()
	e, err := n.Attach()
	if err != nil {
		return nil, err
	}
	if err := e.MoveTo(testenv.NewNetNS(t)); err != nil {
		return nil, err
	}
	return e, nil
}

// Remove stops the container: Leave, the interface back to the host under
// its source name, DeleteEndpoint, then the addresses back to IPAM.
func (e *Endpoint) Remove() error {
	p := e.Net.P
	if err := p.Call("/NetworkDriver.Leave", map[string]any{"NetworkID": e.Net.ID, "EndpointID": e.ID}, nil); err != nil {
		return err
	}
	if e.NS != nil {
		if err := testenv.MoveBack(e.NS, p.Host.NS, "eth0", e.SrcName); err != nil {
			return fmt.Errorf("move %s back: %w", e.SrcName, err)
		}
		e.NS = nil
	}
	if err := p.Call("/NetworkDriver.DeleteEndpoint", map[string]any{"NetworkID": e.Net.ID, "EndpointID": e.ID}, nil); err != nil {
		return err
	}
	if err := p.Call("/IpamDriver.ReleaseAddress", map[string]any{"PoolID": e.Net.Pool4, "Address": e.Addr4.Addr().String()}, nil); err != nil {
		return err
	}
	if e.Addr6.IsValid() {
		return p.Call("/IpamDriver.ReleaseAddress", map[string]any{"PoolID": e.Net.Pool6, "Address": e.Addr6.Addr().String()}, nil)
	}
	return nil
}
