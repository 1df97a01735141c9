package vxlan

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Neighbour table attributes (linux/neighbour.h, enum NDTA_*); x/sys/unix
// does not define them.
const (
	ndtaName    = 1
	ndtaThresh1 = 2
	ndtaThresh2 = 3
	ndtaThresh3 = 4
)

// neighTables are the kernel's neighbour tables whose limits Docker's
// overlay raises: ARP (net.ipv4.neigh.default) and NDP
// (net.ipv6.neigh.default).
var neighTables = []struct {
	family uint8
	name   string
	sysctl string // the sysctl directory that shows the same limits
}{
	{unix.AF_INET, "arp_cache", "net.ipv4.neigh.default"},
	{unix.AF_INET6, "ndisc_cache", "net.ipv6.neigh.default"},
}

// ndtMsg is struct ndtmsg: the family and padding.
type ndtMsg struct{ family uint8 }

func (m ndtMsg) Len() int          { return 4 }
func (m ndtMsg) Serialize() []byte { return []byte{m.family, 0, 0, 0} }

// gcThreshWant is gcThresh as thresh1, thresh2, thresh3 (the IPv4 and
// IPv6 tables get the same limits).
func gcThreshWant() [3]uint32 {
	var w [3]uint32
	for _, s := range gcThresh {
		if i := int(s.key[len(s.key)-1] - '1'); i >= 0 && i < 3 {
			w[i] = max(w[i], uint32(s.want))
		}
	}
	return w
}

// readNeighTable returns a neighbour table's gc_thresh1/2/3.
//
// Equivalent to: `ip ntable show name arp_cache`.
func readNeighTable(family uint8, name string) ([3]uint32, error) {
	var th [3]uint32
	req := nl.NewNetlinkRequest(unix.RTM_GETNEIGHTBL, unix.NLM_F_DUMP)
	req.AddData(ndtMsg{family: family})
	msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWNEIGHTBL)
	if err != nil {
		return th, fmt.Errorf("dump neighbour tables: %w", err)
	}
	for _, msg := range msgs {
		if len(msg) < 4 {
			continue
		}
		attrs, err := nl.ParseRouteAttr(msg[4:])
		if err != nil {
			return th, fmt.Errorf("parse neighbour table: %w", err)
		}
		var found, full bool
		for _, a := range attrs {
			switch a.Attr.Type {
			case ndtaName:
				found = string(trimNUL(a.Value)) == name
			case ndtaThresh1, ndtaThresh2, ndtaThresh3:
				if len(a.Value) == 4 {
					th[a.Attr.Type-ndtaThresh1] = binary.NativeEndian.Uint32(a.Value)
					full = true
				}
			}
		}
		if found && full { // per-device parameter messages carry no limits
			return th, nil
		}
		th = [3]uint32{}
	}
	return th, fmt.Errorf("neighbour table %s: %w", name, ErrNotFound)
}

func trimNUL(b []byte) []byte {
	for len(b) > 0 && b[len(b)-1] == 0 {
		b = b[:len(b)-1]
	}
	return b
}

// setNeighTable writes a neighbour table's gc_thresh1/2/3. The kernel
// accepts it only in the initial network namespace (ENOENT elsewhere) and
// from a holder of CAP_NET_ADMIN there.
//
// Equivalent to: `ip ntable change name arp_cache thresh1 8192 thresh2
// 49152 thresh3 65536`.
func setNeighTable(family uint8, name string, th [3]uint32) error {
	req := nl.NewNetlinkRequest(unix.RTM_SETNEIGHTBL, unix.NLM_F_ACK)
	req.AddData(ndtMsg{family: family})
	req.AddData(nl.NewRtAttr(ndtaName, append([]byte(name), 0)))
	for i, v := range th {
		req.AddData(nl.NewRtAttr(ndtaThresh1+i, nl.Uint32Attr(v)))
	}
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
		return fmt.Errorf("set neighbour table %s: %w", name, err)
	}
	return nil
}

// raiseNeighTables raises the neighbour table limits to gcThresh through
// rtnetlink, never lowering one, so the plugin needs no writable
// /proc/sys: CAP_NET_ADMIN in the host's network namespace suffices.
// Failures are logged: a small table is a capacity limit, not a reason to
// refuse to start. The limits exist only in the initial network namespace.
//
// Equivalent to: `ip ntable change name arp_cache thresh3 65536` (and the
// others), when the current value is lower.
func raiseNeighTables(log *slog.Logger) {
	want := gcThreshWant()
	for _, t := range neighTables {
		cur, err := readNeighTable(t.family, t.name)
		if err != nil {
			log.Warn("read neighbour table limits", "table", t.name, "error", err)
			continue
		}
		next, raise := cur, false
		for i := range next {
			if next[i] < want[i] {
				next[i], raise = want[i], true
			}
		}
		if !raise {
			continue
		}
		err = setNeighTable(t.family, t.name, next)
		switch {
		case errors.Is(err, unix.ENOENT):
			log.Info("neighbour table limits not settable here (not the initial network namespace?)", "table", t.name)
		case err != nil:
			log.Warn("raise neighbour table limits", "table", t.name, "sysctl", t.sysctl, "error", err)
		default:
			log.Info("neighbour table limits raised", "table", t.name, "sysctl", t.sysctl, "from", cur, "to", next)
		}
	}
}
