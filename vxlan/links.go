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
	if l, ok := m.snap.link(name); ok {
		return l, nil
	}
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
	m.snap.forget(l)
	err := m.nl.LinkDel(l)
	if err != nil && !isNotFound(err) {
		return fmt.Errorf("delete link %q: %w", l.Attrs().Name, err)
	}
	m.log.Debug("link deleted", "link", l.Attrs().Name)
	return nil
}

// deleteLinkByName deletes a link by name; not-found is success, and so is
// a link of another owner, which is left alone. It reports whether a link
// was deleted.
func (m *Manager) deleteLinkByName(name string) (bool, error) {
	l, err := m.linkByName(name)
	if err != nil || l == nil || !m.deletable(l) {
		return false, err
	}
	return true, m.deleteLink(l)
}

// setAlias marks a link as ours, by name: the request needs no index.
//
// Equivalent to: `ip link set <name> alias consul-overlay-<owner>` (alias
// consul-overlay for the default owner).
func (m *Manager) setAlias(l netlink.Link) error {
	m.snap.forget(l)
	name := l.Attrs().Name
	if err := m.rt.setAlias(name, m.mark); err != nil {
		return fmt.Errorf("set alias of %q: %w", name, err)
	}
	m.log.Debug("link alias set", "link", name)
	return nil
}

// owns reports whether a link carries this Manager's owner mark.
func (m *Manager) owns(l netlink.Link) bool { return l.Attrs().Alias == m.mark }

// foreign returns a *ForeignLinkError if l carries another owner's mark,
// nil if it is ours or carries no consul-overlay mark at all (a link we
// may adopt: for example one whose creator crashed before marking it).
func (m *Manager) foreign(l netlink.Link) error {
	a := l.Attrs().Alias
	if a == m.mark {
		return nil
	}
	if owner, ok := ownerOfMark(a); ok {
		return &ForeignLinkError{Link: l.Attrs().Name, Owner: owner}
	}
	return nil
}

// deletable is deleteLink's guard for the delete paths: a link of another
// owner is skipped with a warning (from this owner's view it is already
// gone, and failing would block Docker's idempotent cleanup forever).
func (m *Manager) deletable(l netlink.Link) bool {
	if err := m.foreign(l); err != nil {
		m.log.Warn("not deleting a link of another instance", "link", l.Attrs().Name, "error", err)
		return false
	}
	return true
}

// setMTU sets a link's MTU.
//
// Equivalent to: `ip link set <name> mtu <mtu>`.
func (m *Manager) setMTU(l netlink.Link, mtu int) error {
	m.snap.forget(l)
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
	m.snap.forget(l)
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
	m.snap.forget(l)
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
