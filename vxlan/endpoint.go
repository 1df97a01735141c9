package vxlan

import (
	"context"
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Steps of the endpoint create path, in order, for fault injection. A new
// pair is created up and on its bridge; "veth-master" and "veth-up" are
// steps of the repair of an existing one.
var endpointSteps = []string{"veth", "veth-alias"}

func (m *Manager) checkEndpoint(ep Endpoint) error {
	if err := validEndpointID(ep.ID); err != nil {
		return err
	}
	if err := validVNI(ep.VNI); err != nil {
		return fmt.Errorf("endpoint %s: %w", endpointKey(ep.ID), err)
	}
	if err := validUnicastMAC(ep.MAC); err != nil {
		return fmt.Errorf("endpoint %s: %w", endpointKey(ep.ID), err)
	}
	return nil
}

// EnsureEndpoint makes the endpoint's veth pair exist: the host end on the
// network's bridge and up, the container end in this namespace with the
// endpoint's MAC, both with the network's MTU. Docker moves the container
// end into the container and renames it. An existing pair is kept and
// fixed in place, also when its container end is already in a container.
// The network must have been ensured (ErrNotFound otherwise). If a step
// fails, a pair this call created is removed again.
func (m *Manager) EnsureEndpoint(ctx context.Context, ep Endpoint) (EndpointInfo, error) {
	if err := m.checkEndpoint(ep); err != nil {
		return EndpointInfo{}, fmt.Errorf("ensure endpoint: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var ch Changes
	info, err := m.ensureEndpoint(ep, &ch)
	if err != nil {
		return EndpointInfo{}, err
	}
	if ch.Total() > 0 {
		m.log.Info("endpoint ensured", "endpoint", endpointKey(ep.ID), "vni", ep.VNI, "link", info.ContainerIf, "mtu", info.MTU, "changes", ch.Total())
	}
	return info, nil
}

// CreateEndpoint is EnsureEndpoint for an endpoint the caller expects to
// be new (Docker's CreateEndpoint, on the critical path of every container
// start): the pair is created at once, without looking its names up first
// (two netlink requests less). A name that exists (a replay, a restart, a
// stray) fails that creation before anything is made, and EnsureEndpoint's
// checks then keep or repair what is there. If a step fails, a pair this
// call created is removed again.
func (m *Manager) CreateEndpoint(ctx context.Context, ep Endpoint) (EndpointInfo, error) {
	if err := m.checkEndpoint(ep); err != nil {
		return EndpointInfo{}, fmt.Errorf("create endpoint: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var ch Changes
	info, err := m.createEndpoint(ep, &ch)
	if err != nil {
		return EndpointInfo{}, err
	}
	if ch.Total() > 0 {
		m.log.Info("endpoint veth pair created", "endpoint", endpointKey(ep.ID), "vni", ep.VNI, "link", info.ContainerIf, "mtu", info.MTU, "changes", ch.Total())
	}
	return info, nil
}

// createEndpoint is CreateEndpoint with m.mu held, counting into ch.
func (m *Manager) createEndpoint(ep Endpoint, ch *Changes) (info EndpointInfo, retErr error) {
	op := fmt.Sprintf("create endpoint %s (vni %d)", endpointKey(ep.ID), ep.VNI)
	ns, err := m.nsOf(ep.VNI)
	if err != nil {
		return info, fmt.Errorf("%s: %w", op, err)
	}
	br, err := ns.linkByName(BridgeName(ep.VNI))
	if err != nil {
		return info, fmt.Errorf("%s: %w", op, err)
	}
	if br == nil {
		return info, fmt.Errorf("%s: bridge %q: %w", op, BridgeName(ep.VNI), ErrNotFound)
	}
	info = EndpointInfo{HostIf: HostIfName(ep.ID), ContainerIf: ContainerIfName(ep.ID), MTU: br.Attrs().MTU}
	var undo []func() error
	created, err := m.createPair(ns, ep, br, ch, &undo)
	if err == nil {
		return info, nil
	}
	if !created && errors.Is(err, unix.EEXIST) {
		return m.ensureEndpoint(ep, ch)
	}
	for i := len(undo) - 1; i >= 0; i-- {
		if uerr := undo[i](); uerr != nil {
			err = errors.Join(err, fmt.Errorf("undo: %w", uerr))
		}
	}
	return info, fmt.Errorf("%s: %w", op, err)
}

// ensureEndpoint is EnsureEndpoint with m.mu held, counting into ch. The
// host end is in the namespace of the network's bridge, the container end
// in the host's (the data-plane layout: `ip -n DP link add vxh-… type veth
// peer name vxc-… netns HOST`).
//
// Equivalent to: `ip link add vxh-0123456789 mtu 1450 type veth peer name
// vxc-0123456789 mtu 1450 address 02:42:0a:0a:00:02 && ip link set
// vxh-0123456789 alias consul-overlay-<owner> master vxbr-0a1b up && ip link
// set vxc-0123456789 alias consul-overlay-<owner>`. Either end carrying
// another owner's mark fails with *ForeignLinkError and is left alone.
func (m *Manager) ensureEndpoint(ep Endpoint, ch *Changes) (info EndpointInfo, retErr error) {
	hostName, contName := HostIfName(ep.ID), ContainerIfName(ep.ID)
	op := fmt.Sprintf("ensure endpoint %s (vni %d)", endpointKey(ep.ID), ep.VNI)
	ns, err := m.nsOf(ep.VNI)
	if err != nil {
		return info, fmt.Errorf("%s: %w", op, err)
	}
	br, err := ns.linkByName(BridgeName(ep.VNI))
	if err != nil {
		return info, fmt.Errorf("%s: %w", op, err)
	}
	if br == nil {
		return info, fmt.Errorf("%s: bridge %q: %w", op, BridgeName(ep.VNI), ErrNotFound)
	}
	mtu := br.Attrs().MTU
	info = EndpointInfo{HostIf: hostName, ContainerIf: contName, MTU: mtu}

	var undo []func() error
	defer func() {
		if retErr == nil {
			return
		}
		for i := len(undo) - 1; i >= 0; i-- {
			if err := undo[i](); err != nil {
				retErr = errors.Join(retErr, fmt.Errorf("undo: %w", err))
			}
		}
		retErr = fmt.Errorf("%s: %w", op, retErr)
	}()

	host, err := ns.linkByName(hostName)
	if err != nil {
		return info, err
	}
	if host != nil {
		if err := m.foreign(host); err != nil {
			return info, err
		}
	}
	if host != nil && host.Type() != "veth" {
		m.log.Warn("replacing link that is not a veth", "link", hostName, "type", host.Type(), "endpoint", endpointKey(ep.ID))
		if err := ns.deleteLink(host); err != nil {
			return info, err
		}
		ch.Links++
		host = nil
	}
	cont, err := m.host.linkByName(contName)
	if err != nil {
		return info, err
	}
	if cont != nil {
		if err := m.foreign(cont); err != nil {
			return info, err
		}
	}
	if host == nil {
		if cont != nil {
			// A container end without its host end is not a pair of ours.
			m.log.Warn("removing unpaired link", "link", contName, "type", cont.Type(), "endpoint", endpointKey(ep.ID))
			if err := m.host.deleteLink(cont); err != nil {
				return info, err
			}
			ch.Links++
		}
		if err := m.addVeth(ns, ep, mtu, br.Attrs().Index, ch); err != nil {
			return info, err
		}
		// By name: the pair may exist even if the lookup below fails.
		undo = append(undo, func() error { _, err := ns.deleteLinkByName(hostName); return err })
		if host, err = ns.linkByName(hostName); err == nil && host == nil {
			err = fmt.Errorf("veth %q gone after creation", hostName)
		}
		if err != nil {
			return info, err
		}
		if cont, err = m.host.linkByName(contName); err != nil {
			return info, err
		}
	}

	// Container end: only while it is still in the host's namespace.
	if cont != nil {
		if !m.owns(cont) {
			if err := m.step("veth-alias"); err != nil {
				return info, err
			}
			if err := m.host.setAlias(cont); err != nil {
				return info, err
			}
			ch.LinkAttrs++
		}
		if cont.Attrs().MTU != mtu {
			if err := m.host.setMTU(cont, mtu); err != nil {
				return info, err
			}
			ch.LinkAttrs++
		}
		if cont.Attrs().HardwareAddr.String() != ep.MAC.String() {
			m.host.snap.forget(cont)
			if err := m.host.nl.LinkSetHardwareAddr(cont, ep.MAC); err != nil {
				return info, fmt.Errorf("set mac of %q to %s: %w", contName, ep.MAC, err)
			}
			m.log.Debug("link mac set", "link", contName, "mac", ep.MAC)
			ch.LinkAttrs++
		}
	}

	if !m.owns(host) {
		if err := m.step("veth-alias"); err != nil {
			return info, err
		}
		if err := ns.setAlias(host); err != nil {
			return info, err
		}
		ch.LinkAttrs++
	}
	if host.Attrs().MTU != mtu {
		if err := ns.setMTU(host, mtu); err != nil {
			return info, err
		}
		ch.LinkAttrs++
	}
	if host.Attrs().MasterIndex != br.Attrs().Index {
		if err := m.step("veth-master"); err != nil {
			return info, err
		}
		if err := ns.setMaster(host, br); err != nil {
			return info, err
		}
		ch.LinkAttrs++
	}
	if !isUp(host) {
		if err := m.step("veth-up"); err != nil {
			return info, err
		}
		if err := ns.setUp(host); err != nil {
			return info, err
		}
		ch.LinkAttrs++
	}
	return info, nil
}

// createPair creates the endpoint's veth pair as ensureEndpoint would
// from nothing, without looking the names up before: the pair with its
// MTU, MAC, the host end up and on the bridge of namespace ns, the
// container end in the host's namespace, in one request; then both ends
// marked, by name. It reports whether it created the pair; an error
// wrapping unix.EEXIST means that a name exists and nothing was made. Undo
// steps for what it made go into undo. Caller holds m.mu.
//
// Equivalent to: `ip link add vxh-0123456789 mtu 1450 master vxbr-0a1b up
// type veth peer name vxc-0123456789 mtu 1450 address 02:42:0a:0a:00:02 &&
// ip link set vxc-0123456789 alias consul-overlay && ip link set
// vxh-0123456789 alias consul-overlay`.
func (m *Manager) createPair(ns *netNS, ep Endpoint, br netlink.Link, ch *Changes, undo *[]func() error) (bool, error) {
	hostName, contName := HostIfName(ep.ID), ContainerIfName(ep.ID)
	if err := m.addVeth(ns, ep, br.Attrs().MTU, br.Attrs().Index, ch); err != nil {
		return false, err
	}
	*undo = append(*undo, func() error { _, err := ns.deleteLinkByName(hostName); return err })
	if err := m.step("veth-alias"); err != nil {
		return true, err
	}
	if err := m.host.setAlias(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: contName}}); err != nil {
		return true, err
	}
	if err := ns.setAlias(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostName}}); err != nil {
		return true, err
	}
	ch.LinkAttrs += 2
	return true, nil
}

// addVeth creates endpoint ep's veth pair in one request on namespace
// ns's socket, the container end in the host's namespace: both ends at
// mtu, ep's MAC on the container end, the host end up and on the bridge
// with index master (the host end carries nothing until it is on the
// bridge, and the container end stays down until Docker configures it).
// An error wrapping unix.EEXIST means a name exists and nothing was made;
// the kernel makes all of it or nothing.
//
// Equivalent to: `ip link add vxh-0123456789 mtu 1450 master vxbr-0a1b up
// type veth peer name vxc-0123456789 mtu 1450 address 02:42:0a:0a:00:02`.
func (m *Manager) addVeth(ns *netNS, ep Endpoint, mtu, master int, ch *Changes) error {
	hostName, contName := HostIfName(ep.ID), ContainerIfName(ep.ID)
	if err := m.step("veth"); err != nil {
		return err
	}
	v := vethPair{name: hostName, peer: contName, mtu: mtu, master: master, mac: ep.MAC, peerNS: netns.None()}
	if ns.dp {
		v.peerNS = m.host.fd // where Docker looks for it
	}
	err := ns.rt.addVethPair(v)
	if err != nil {
		return fmt.Errorf("create veth %q/%q: %w", hostName, contName, err)
	}
	ch.Links++
	ch.LinkAttrs++ // on the bridge
	m.log.Debug("veth created", "link", hostName, "peer", contName, "endpoint", endpointKey(ep.ID), "mac", ep.MAC, "master", master)
	return nil
}

// DeleteEndpoint removes an endpoint's veth pair, also when Docker has
// already moved the container end into a container (deleting the host end
// deletes both), in both namespaces. It is idempotent: an endpoint without
// links is success. Links that carry another owner's mark are left alone
// (logged).
//
// Equivalent to: `ip link del vxh-0123456789`.
func (m *Manager) DeleteEndpoint(ctx context.Context, id string) error {
	if err := validEndpointID(id); err != nil {
		return fmt.Errorf("delete endpoint: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var errs []error
	deleted := 0
	del := func(ns *netNS, name string) {
		ok, err := ns.deleteLinkByName(name)
		if err != nil {
			errs = append(errs, err)
		}
		if ok {
			deleted++
		}
	}
	if m.dp != nil {
		del(m.dp, HostIfName(id))
	}
	del(m.host, HostIfName(id))
	del(m.host, ContainerIfName(id))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("delete endpoint %s: %w", endpointKey(id), err)
	}
	if deleted > 0 {
		m.log.Info("endpoint deleted", "endpoint", endpointKey(id))
	}
	return nil
}

// EndpointInUse reports whether the endpoint's veth pair is in use by a
// container: its host end exists (in the host's or the data-plane
// namespace) and the other end is no longer in the host's namespace
// (Docker moved it into a container's namespace). While it
// is, the endpoint must not be reclaimed, whatever the store says. A pair
// whose container end is still in this namespace (not joined yet, or left)
// or that does not exist is not in use. The owner of the links does not
// matter: a container uses them either way.
//
// Equivalent to: `ip -d link show vxh-0123456789` printing "link-netns" or
// "link-netnsid" (the peer is in another namespace), or `ip link show
// vxc-0123456789` failing while the host end exists.
func (m *Manager) EndpointInUse(id string) (bool, error) {
	if err := validEndpointID(id); err != nil {
		return false, fmt.Errorf("endpoint in use: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var host netlink.Link
	ns := m.host
	for _, ns = range m.namespaces() {
		var err error
		if host, err = ns.linkByName(HostIfName(id)); err != nil {
			return false, fmt.Errorf("endpoint in use %s: %w", endpointKey(id), err)
		}
		if host != nil {
			break
		}
	}
	if host == nil || host.Type() != "veth" {
		return false, nil
	}
	// The container end is looked for in the host's namespace, where
	// EnsureEndpoint leaves it.
	return peerAway(host, endpointKey(id), ns.dp, func(index int) (string, bool, error) {
		l, err := retryDump(func() (netlink.Link, error) { return m.host.nl.LinkByIndex(index) })
		if isNotFound(err) {
			return "", false, nil
		}
		if err != nil {
			return "", false, fmt.Errorf("endpoint in use %s: get peer link %d: %w", endpointKey(id), index, err)
		}
		return l.Attrs().Name, true, nil
	})
}

// peerAway reports whether the container end of veth host (endpoint key
// key) has left the host's namespace. lookup finds a link of the host's
// namespace by index: its name, whether it exists, and an error when the
// kernel did not say, which peerAway returns. With crossNS the host end is
// in the data-plane namespace, whose view of its peer is always of another
// namespace: only the lookup tells.
func peerAway(host netlink.Link, key string, crossNS bool, lookup func(index int) (string, bool, error)) (bool, error) {
	// IFLA_LINK_NETNSID: the kernel reports the peer's namespace only when
	// it is not ours.
	if host.Attrs().NetNsID >= 0 && !crossNS {
		return true, nil
	}
	// No namespace id (an older kernel, or no id assigned), or a host end
	// in the data-plane namespace: the peer is away if no link of the
	// host's namespace has its index and name.
	peer := host.Attrs().ParentIndex
	if peer == 0 {
		return false, nil
	}
	name, found, err := lookup(peer)
	if err != nil {
		return false, err
	}
	return !found || name != contPrefix+key, nil
}
