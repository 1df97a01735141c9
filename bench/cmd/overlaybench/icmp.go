package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"consul-overlay/internal/testenv"
)

// pinger sends ICMP echo requests from inside a namespace: its raw socket
// is made in the namespace and stays there, so it is used from any
// goroutine without spawning a ping process per probe.
type pinger struct {
	fd  int
	id  uint16
	seq uint16
}

func newPinger(ns *testenv.NetNS) (*pinger, error) {
	p := &pinger{fd: -1}
	var b [2]byte
	_, _ = rand.Read(b[:])
	p.id = binary.BigEndian.Uint16(b[:])
	err := ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
		p.fd = fd
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("icmp socket in %s: %w", ns.Name, err)
	}
	return p, nil
}

func (p *pinger) Close() { _ = unix.Close(p.fd) }

// firstReply sends an echo request to dst every interval until a reply
// comes and returns when it came.
func (p *pinger) firstReply(ctx context.Context, dst netip.Addr, interval, timeout time.Duration) (time.Time, error) {
	tv := unix.NsecToTimeval(int64(interval))
	if err := unix.SetsockoptTimeval(p.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return time.Time{}, err
	}
	to := &unix.SockaddrInet4{Addr: dst.As4()}
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 1500)
	for time.Now().Before(deadline) {
		if err := ctx.Err(); err != nil {
			return time.Time{}, err
		}
		p.seq++
		msg := make([]byte, 16)
		msg[0] = 8 // echo request
		binary.BigEndian.PutUint16(msg[4:], p.id)
		binary.BigEndian.PutUint16(msg[6:], p.seq)
		binary.BigEndian.PutUint16(msg[2:], icmpChecksum(msg))
		if err := unix.Sendto(p.fd, msg, 0, to); err != nil && !errors.Is(err, unix.EHOSTUNREACH) && !errors.Is(err, unix.ENETUNREACH) {
			return time.Time{}, fmt.Errorf("send echo to %s: %w", dst, err)
		}
		next := time.Now().Add(interval)
		for time.Now().Before(next) {
			n, from, err := unix.Recvfrom(p.fd, buf, 0)
			if err != nil {
				if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
					break
				}
				return time.Time{}, fmt.Errorf("receive from %s: %w", dst, err)
			}
			now := time.Now()
			sa, ok := from.(*unix.SockaddrInet4)
			if !ok || netip.AddrFrom4(sa.Addr) != dst || n < 20 {
				continue
			}
			ihl := int(buf[0]&0x0f) * 4
			if n < ihl+8 || buf[ihl] != 0 || binary.BigEndian.Uint16(buf[ihl+4:]) != p.id {
				continue
			}
			return now, nil
		}
	}
	return time.Time{}, fmt.Errorf("no echo reply from %s within %s", dst, timeout)
}

func icmpChecksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// peerState reports whether the VXLAN device vxIdx holds the neighbour
// entry ip→mac and the FDB entry for mac.
func peerState(h *netlink.Handle, vxIdx int, ip netip.Addr, mac net.HardwareAddr) (neigh, fdb bool, err error) {
	ns, err := h.NeighList(vxIdx, netlink.FAMILY_V4)
	if err != nil {
		return false, false, err
	}
	for _, n := range ns {
		if a, ok := netip.AddrFromSlice(n.IP); ok && a.Unmap() == ip && n.HardwareAddr.String() == mac.String() {
			neigh = true
			break
		}
	}
	fs, err := h.NeighList(vxIdx, unix.AF_BRIDGE)
	if err != nil {
		return neigh, false, err
	}
	for _, n := range fs {
		// Only the VXLAN device's own entries carry a destination; the
		// bridge also learns the MAC on its VXLAN port from traffic.
		if n.IP != nil && n.HardwareAddr.String() == mac.String() {
			fdb = true
			break
		}
	}
	return neigh, fdb, nil
}

// waitPeer polls every interval until the peer's neighbour and FDB
// entries are both present (present) or both gone, and returns when that
// was first seen.
func waitPeer(ctx context.Context, h *netlink.Handle, vxIdx int, ip netip.Addr, mac net.HardwareAddr, present bool, interval, timeout time.Duration) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	for {
		n, f, err := peerState(h, vxIdx, ip, mac)
		now := time.Now()
		if err == nil && n == present && f == present {
			return now, nil
		}
		if now.After(deadline) {
			return time.Time{}, fmt.Errorf("peer %s (%s): neighbour %v, fdb %v after %s, want %v (last error: %v)", ip, mac, n, f, timeout, present, err)
		}
		select {
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-time.After(interval):
		}
	}
}

// countPeers counts the permanent IPv4 neighbour entries and the unicast
// FDB entries (not the all-zeros flood entries) of a VXLAN device.
func countPeers(h *netlink.Handle, vxIdx int) (neigh, fdb int, err error) {
	ns, err := h.NeighList(vxIdx, netlink.FAMILY_V4)
	if err != nil {
		return 0, 0, err
	}
	for _, n := range ns {
		if n.State&netlink.NUD_PERMANENT != 0 {
			neigh++
		}
	}
	fs, err := h.NeighList(vxIdx, unix.AF_BRIDGE)
	if err != nil {
		return neigh, 0, err
	}
	zero := net.HardwareAddr{0, 0, 0, 0, 0, 0}.String()
	for _, n := range fs {
		if n.IP != nil && n.HardwareAddr.String() != zero {
			fdb++
		}
	}
	return neigh, fdb, nil
}

// flushNeighbours deletes the dynamic neighbour entries of a link, so a
// reused address is resolved afresh.
func flushNeighbours(ns *testenv.NetNS, link string) error {
	h := ns.Handle()
	l, err := h.LinkByName(link)
	if err != nil {
		return err
	}
	ents, err := h.NeighList(l.Attrs().Index, netlink.FAMILY_V4)
	if err != nil {
		return err
	}
	for _, n := range ents {
		if n.State&netlink.NUD_PERMANENT == 0 {
			_ = h.NeighDel(&n)
		}
	}
	return nil
}
