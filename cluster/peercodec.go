package cluster

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"consul-overlay/kvstore"
)

// The peer record's value (issue 16, scale: the bytes of one change).
//
// Every peer watch of a network receives every member's peer record on
// every change, so the record's size multiplies by hosts². The first
// layout was a JSON record in the schema envelope, a line of about 95
// bytes per endpoint (the 64-character endpoint ID alone took 64), 130
// in Consul's base64: about 2.9 KB for a host with 20 endpoints. The
// value is now binary, about 21 bytes per IPv4 endpoint:
//
//	magic   0x00 'c' 'o' 'p'   (never valid JSON: an older version reads
//	                            it as unreadable and watches the endpoint
//	                            records instead)
//	version 1
//	host, incarnation, vtep    uvarint length + bytes each
//	count                      uvarint
//	entries                    kind 0: 8-byte ID prefix, 6-byte MAC, the
//	                                   address count, then per address
//	                                   its length (4 or 16) and bytes
//	                           kind 1: uvarint length + the line as text
//
// Kind 1 carries any line kind 0 cannot give back byte for byte (an ID
// that is not lowercase hex, a MAC that is not 6 bytes). The JSON records
// an earlier version wrote are still read, their lines put in today's
// form, so a cluster in the middle of an upgrade keeps the compact watch.

var peerMagic = []byte{0, 'c', 'o', 'p', 1}

// shortIDLen is how much of a hexadecimal endpoint ID a peer entry keeps:
// 64 bits, unique among one host's endpoints of one network by far.
const shortIDLen = 16

// shortID is the endpoint ID as peer entries and peers give it: the first
// 16 characters of a lowercase hexadecimal ID (Docker's are 64), any
// other ID whole.
func shortID(id string) string {
	if len(id) >= shortIDLen && isLowerHex(id) {
		return id[:shortIDLen]
	}
	return id
}

func isLowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// canonicalMAC is mac as net.HardwareAddr prints it, or mac unchanged if
// it does not parse.
func canonicalMAC(mac string) string {
	if m, err := net.ParseMAC(mac); err == nil {
		return m.String()
	}
	return mac
}

// encodePeerRecord is r's stored value.
func encodePeerRecord(r PeerRecord) []byte {
	b := slices.Clone(peerMagic)
	for _, s := range []string{r.HostID, r.Incarnation, r.VTEP} {
		b = appendString(b, s)
	}
	b = binary.AppendUvarint(b, uint64(len(r.Endpoints)))
	for _, e := range r.Endpoints {
		if c, ok := compactEntry(e); ok {
			b = append(b, c...)
			continue
		}
		b = append(b, 1)
		b = appendString(b, e)
	}
	return b
}

func appendString(b []byte, s string) []byte {
	return append(binary.AppendUvarint(b, uint64(len(s))), s...)
}

// compactEntry is line e as kind 0, if that gives e back exactly.
func compactEntry(e string) ([]byte, bool) {
	f := strings.Fields(e)
	if len(f) < 2 || len(f) > 255+2 || len(f[0]) != shortIDLen || !isLowerHex(f[0]) {
		return nil, false
	}
	mac, err := net.ParseMAC(f[1])
	if err != nil || len(mac) != 6 {
		return nil, false
	}
	b := make([]byte, 1, 1+8+6+1+16*(len(f)-2))
	b, err = hex.AppendDecode(b, []byte(f[0]))
	if err != nil {
		return nil, false
	}
	b = append(b, mac...)
	b = append(b, byte(len(f)-2))
	for _, a := range f[2:] {
		ip, err := netip.ParseAddr(a)
		if err != nil || ip.Zone() != "" {
			return nil, false
		}
		s := ip.AsSlice()
		b = append(b, byte(len(s)))
		b = append(b, s...)
	}
	if back, _, err := readEntry(b); err != nil || back != e {
		return nil, false
	}
	return b, true
}

var errPeerRecord = errors.New("malformed peer record")

// decodePeerRecord reads a value encodePeerRecord wrote, or the JSON
// record an earlier version wrote (its lines put in today's form).
func decodePeerRecord(b []byte) (PeerRecord, error) {
	if !strings.HasPrefix(string(b), string(peerMagic[:4])) {
		var r PeerRecord
		if err := kvstore.Decode(b, &r); err != nil {
			return PeerRecord{}, err
		}
		for i, e := range r.Endpoints {
			r.Endpoints[i] = canonicalEntry(e)
		}
		slices.Sort(r.Endpoints)
		return r, nil
	}
	if len(b) < len(peerMagic) {
		return PeerRecord{}, errPeerRecord
	}
	if v, want := b[len(peerMagic)-1], peerMagic[len(peerMagic)-1]; v != want {
		return PeerRecord{}, fmt.Errorf("peer record of version %d, this build reads version %d: %w", v, want, kvstore.ErrSchema)
	}
	b = b[len(peerMagic):]
	var fields [3]string
	for i := range fields {
		s, rest, err := readString(b)
		if err != nil {
			return PeerRecord{}, err
		}
		fields[i], b = s, rest
	}
	r := PeerRecord{HostID: fields[0], Incarnation: fields[1], VTEP: fields[2]}
	n, k := binary.Uvarint(b)
	if k <= 0 || n > uint64(len(b)) {
		return PeerRecord{}, errPeerRecord
	}
	b = b[k:]
	r.Endpoints = make([]string, 0, n)
	for range n {
		e, rest, err := readEntry(b)
		if err != nil {
			return PeerRecord{}, err
		}
		r.Endpoints, b = append(r.Endpoints, e), rest
	}
	if len(b) != 0 {
		return PeerRecord{}, errPeerRecord
	}
	return r, nil
}

func readString(b []byte) (string, []byte, error) {
	n, k := binary.Uvarint(b)
	if k <= 0 || n > uint64(len(b)-k) {
		return "", nil, errPeerRecord
	}
	return string(b[k : k+int(n)]), b[k+int(n):], nil
}

// readEntry reads one entry of either kind from the front of b.
func readEntry(b []byte) (string, []byte, error) {
	if len(b) == 0 {
		return "", nil, errPeerRecord
	}
	switch b[0] {
	case 1:
		return readString(b[1:])
	case 0:
	default:
		return "", nil, errPeerRecord
	}
	if len(b) < 1+8+6+1 {
		return "", nil, errPeerRecord
	}
	var s strings.Builder
	s.WriteString(hex.EncodeToString(b[1:9]))
	s.WriteByte(' ')
	s.WriteString(net.HardwareAddr(b[9:15]).String())
	n := int(b[15])
	b = b[16:]
	for range n {
		if len(b) == 0 || (b[0] != 4 && b[0] != 16) || len(b) < 1+int(b[0]) {
			return "", nil, errPeerRecord
		}
		ip, _ := netip.AddrFromSlice(b[1 : 1+int(b[0])])
		s.WriteByte(' ')
		s.WriteString(ip.String())
		b = b[1+int(b[0]):]
	}
	return s.String(), b, nil
}

// canonicalEntry is line e in the form peerEntry gives today: the ID
// shortened, the MAC as net.HardwareAddr prints it.
func canonicalEntry(e string) string {
	f := strings.Fields(e)
	if len(f) < 2 {
		return e
	}
	f[0], f[1] = shortID(f[0]), canonicalMAC(f[1])
	return strings.Join(f, " ")
}
