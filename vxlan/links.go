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
