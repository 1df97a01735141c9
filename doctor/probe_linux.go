package doctor

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// SendProbe sends one ICMP echo of size bytes (the IPv4 packet; DF set)
// as t's local endpoint onto t.Device with a packet socket, and waits up
// to timeout for the reply on that device (see the package doc). It runs
// in the caller's network namespace and needs CAP_NET_RAW.
//
// Equivalent to: `ping -M do -s <size-28> -I <local endpoint IP> <remote
// endpoint IP>` from inside the local container.
func SendProbe(ctx context.Context, t Target, size int, timeout time.Duration) (bool, error) {
	if size < 28 {
		return false, fmt.Errorf("probe size %d below 28", size)
	}
	ifi, err := net.InterfaceByName(t.Device)
	if err != nil {
		return false, fmt.Errorf("probe %s: %w", t.Device, err)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		return false, fmt.Errorf("open packet socket: %w", err)
	}
	defer unix.Close(fd)
	// ETH_P_ALL: a bridge port's frames reach only the taps that take
	// every protocol before the bridge takes them.
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
		return false, fmt.Errorf("bind packet socket to %s: %w", t.Device, err)
	}
	tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return false, fmt.Errorf("set receive timeout: %w", err)
	}
	id, seq := uint16(rand.Uint32()), uint16(rand.Uint32())
	frame := echoFrame(t, size, id, seq)
	to := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IP), Ifindex: ifi.Index, Halen: 6}
	copy(to.Addr[:], t.DstMAC)
	if err := unix.Sendto(fd, frame, 0, to); err != nil {
		if err == unix.EMSGSIZE {
			return false, nil
		}
		return false, fmt.Errorf("send probe on %s: %w", t.Device, err)
	}
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 65536)
	for time.Now().Before(deadline) {
		if err := ctx.Err(); err != nil {
			return false, err
		}
		n, from, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			if err == unix.EAGAIN || err == unix.EINTR {
				continue
			}
			return false, fmt.Errorf("read %s: %w", t.Device, err)
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		if isEchoReply(buf[:n], t, id, seq) {
			return true, nil
		}
	}
	return false, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// echoFrame builds the Ethernet frame of an ICMP echo request of size
// bytes (IPv4 header included) with DF set.
func echoFrame(t Target, size int, id, seq uint16) []byte {
	f := make([]byte, 14+size)
	copy(f[0:6], t.DstMAC)
	copy(f[6:12], t.SrcMAC)
	binary.BigEndian.PutUint16(f[12:14], unix.ETH_P_IP)
	ip := f[14:]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:4], uint16(size))
	binary.BigEndian.PutUint16(ip[4:6], uint16(rand.Uint32()))
	binary.BigEndian.PutUint16(ip[6:8], 0x4000) // DF
	ip[8] = 64
	ip[9] = unix.IPPROTO_ICMP
	src, dst := t.SrcIP.As4(), t.DstIP.As4()
	copy(ip[12:16], src[:])
	copy(ip[16:20], dst[:])
	binary.BigEndian.PutUint16(ip[10:12], checksum(ip[:20]))
	icmp := ip[20:]
	icmp[0] = 8 // echo request
	binary.BigEndian.PutUint16(icmp[4:6], id)
	binary.BigEndian.PutUint16(icmp[6:8], seq)
	for i := 8; i < len(icmp); i++ {
		icmp[i] = byte(i)
	}
	binary.BigEndian.PutUint16(icmp[2:4], checksum(icmp))
	return f
}

// isEchoReply reports whether frame is the reply to the echo (id, seq)
// from t's remote endpoint to its local one.
func isEchoReply(frame []byte, t Target, id, seq uint16) bool {
	if len(frame) < 14+20+8 || binary.BigEndian.Uint16(frame[12:14]) != unix.ETH_P_IP {
		return false
	}
	ip := frame[14:]
	ihl := int(ip[0]&0x0f) * 4
	if ip[0]>>4 != 4 || ihl < 20 || len(ip) < ihl+8 || ip[9] != unix.IPPROTO_ICMP {
		return false
	}
	src, dst := t.DstIP.As4(), t.SrcIP.As4()
	if [4]byte(ip[12:16]) != src || [4]byte(ip[16:20]) != dst {
		return false
	}
	icmp := ip[ihl:]
	return icmp[0] == 0 && binary.BigEndian.Uint16(icmp[4:6]) == id && binary.BigEndian.Uint16(icmp[6:8]) == seq
}

// checksum is the Internet checksum (RFC 1071).
func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}
