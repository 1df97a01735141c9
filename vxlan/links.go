package vxlan

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// retryDump retries a netlink dump that the kernel interrupted because the
// table changed under it ("dump interrupted").
func retryDump[T any](f func() (T, error)) (T, error) {
	for i := 0; ; i++ {
		v, err := f()
		if errors.Is(err, netlink.ErrDumpInterrupted) && i < 5 {
			continue
		}
		return v, err
	}
}

// isNotFound reports whether a netlink error means the object is gone.
func isNotFound(err error) bool {
	var lnf netlink.LinkNotFoundError
	return errors.As(err, &lnf) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV)
}

// linkByName returns the named link, or nil if there is none.
func (m *Manager) linkByName(name string) (netlink.Link, error) {
	l, err := retryDump(func() (netlink.Link, error) { return m.nl.LinkByName(name) })
	if isNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("get link %q: %w", name, err)
	}
	return l, nil
}

// linkList lists the namespace's links.
func (m *Manager) linkList() ([]netlink.Link, error) {
	ls, err := retryDump(m.nl.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	return ls, nil
}

// deleteLink deletes a link; a link that is already gone is success.
// Deleting one end of a veth pair deletes both, wherever the other end is.
//
// Equivalent to: `ip link del <name>`.
func (m *Manager) deleteLink(l netlink.Link) error {
	err := m.nl.LinkDel(l)
	if err != nil && !isNotFound(err) {
		return fmt.Errorf("delete link %q: %w", l.Attrs().Name, err)
	}
	m.log.Debug("link deleted", "link", l.Attrs().Name)
	return nil
}

// deleteLinkByName deletes a link by name; not-found is success. It
// reports whether a link was deleted.
func (m *Manager) deleteLinkByName(name string) (bool, error) {
	l, err := m.linkByName(name)
	if err != nil || l == nil {
		return false, err
	}
	return true, m.deleteLink(l)
}

// setAlias marks a link as ours.
//
// Equivalent to: `ip link set <name> alias consul-overlay`.
func (m *Manager) setAlias(l netlink.Link) error {
	if err := m.nl.LinkSetAlias(l, OwnerAlias); err != nil {
		return fmt.Errorf("set alias of %q: %w", l.Attrs().Name, err)
	}
	m.log.Debug("link alias set", "link", l.Attrs().Name)
	return nil
}

// setMTU sets a link's MTU.
//
// Equivalent to: `ip link set <name> mtu <mtu>`.
func (m *Manager) setMTU(l netlink.Link, mtu int) error {
	if err := m.nl.LinkSetMTU(l, mtu); err != nil {
		return fmt.Errorf("set mtu of %q to %d: %w", l.Attrs().Name, mtu, err)
	}
	m.log.Debug("link mtu set", "link", l.Attrs().Name, "mtu", mtu)
	return nil
}

// setMaster enslaves a link to a bridge.
//
// Equivalent to: `ip link set <name> master <bridge>`.
func (m *Manager) setMaster(l, br netlink.Link) error {
	if err := m.nl.LinkSetMasterByIndex(l, br.Attrs().Index); err != nil {
		return fmt.Errorf("attach %q to bridge %q: %w", l.Attrs().Name, br.Attrs().Name, err)
	}
	m.log.Debug("link attached", "link", l.Attrs().Name, "bridge", br.Attrs().Name)
	return nil
}

// setUp brings a link up.
//
// Equivalent to: `ip link set <name> up`.
func (m *Manager) setUp(l netlink.Link) error {
	if err := m.nl.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %q up: %w", l.Attrs().Name, err)
	}
	m.log.Debug("link up", "link", l.Attrs().Name)
	return nil
}

func isUp(l netlink.Link) bool { return l.Attrs().Flags&net.FlagUp != 0 }

// randomMAC returns a random locally administered unicast MAC address.
func randomMAC() net.HardwareAddr {
	b := make(net.HardwareAddr, 6)
	_, _ = rand.Read(b)
	b[0] = b[0]&0xfc | 0x02
	return b
}

func validUnicastMAC(mac net.HardwareAddr) error {
	if len(mac) != 6 {
		return fmt.Errorf("mac %q is not a 6-byte Ethernet address", mac)
	}
	if mac[0]&1 != 0 {
		return fmt.Errorf("mac %s is a multicast address", mac)
	}
	var zero [6]byte
	if [6]byte(mac) == zero {
		return fmt.Errorf("mac %s is all zeros", mac)
	}
	return nil
}
