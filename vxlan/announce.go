package vxlan

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// announcer sends gratuitous ARPs for remote endpoints into a network's
// bridge. A container that comes back with its old IPv4 address but a new
// MAC announces itself with gratuitous ARPs, but the VXLAN device's ARP
// proxy answers ARP locally and never forwards it, so without this the
// containers on other hosts keep the old MAC until their entry expires.
//
// The packet socket is opened once, in the namespace the Manager programs
// (New runs in it), so sends always go to that namespace's links.
type announcer struct {
	fd int
}

func newAnnouncer() (*announcer, error) {
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ARP)))
	if err != nil {
		return nil, fmt.Errorf("open packet socket for gratuitous ARP: %w", err)
	}
	return &announcer{fd: fd}, nil
}

// newAnnouncerIn opens the packet socket in namespace ns, on a locked
// thread that returns to its own namespace (or, if it cannot, ends with its
// goroutine, which makes the runtime throw the thread away).
func newAnnouncerIn(ns netns.NsHandle) (*announcer, error) {
	type result struct {
		a   *announcer
		err error
	}
	c := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			c <- result{nil, fmt.Errorf("open packet socket for gratuitous ARP: %w", err)}
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			c <- result{nil, fmt.Errorf("open packet socket for gratuitous ARP: enter namespace: %w", err)}
			return
		}
		a, err := newAnnouncer()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		c <- result{a, err}
	}()
	r := <-c
	return r.a, r.err
}

func (a *announcer) close() {
	if a != nil {
		unix.Close(a.fd)
	}
}

// garp sends one gratuitous ARP request (sender and target both ip, sender
// MAC mac) out of the link with index ifindex; a bridge floods it to its
// ports. Equivalent to: `arping -U -c 1 -I <bridge> -s <ip> <ip>` with the
// source MAC of the remote endpoint.
func (a *announcer) garp(ifindex int, ip netip.Addr, mac net.HardwareAddr) error {
	if a == nil || !ip.Is4() || len(mac) != 6 {
		return nil
	}
	bcast := []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	frame := make([]byte, 42)
	copy(frame[0:6], bcast)
	copy(frame[6:12], mac)
	binary.BigEndian.PutUint16(frame[12:14], unix.ETH_P_ARP)
	arp := frame[14:]
	binary.BigEndian.PutUint16(arp[0:2], 1) // hardware type: Ethernet
	binary.BigEndian.PutUint16(arp[2:4], unix.ETH_P_IP)
	arp[4], arp[5] = 6, 4
	binary.BigEndian.PutUint16(arp[6:8], 1) // request
	ip4 := ip.As4()
	copy(arp[8:14], mac)
	copy(arp[14:18], ip4[:])
	copy(arp[24:28], ip4[:]) // target MAC stays zero
	sa := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: ifindex, Halen: 6}
	copy(sa.Addr[:], bcast)
	if err := unix.Sendto(a.fd, frame, 0, sa); err != nil {
		return fmt.Errorf("send gratuitous ARP for %s: %w", ip, err)
	}
	return nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
