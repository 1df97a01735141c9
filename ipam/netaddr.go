package ipam

import (
	"encoding/binary"
	"fmt"
	"math"
	"net/netip"
	"strings"
)

// lastAddr returns the highest address of p (the IPv4 broadcast address).
func lastAddr(p netip.Prefix) netip.Addr {
	p = p.Masked()
	b := p.Addr().AsSlice()
	bits := p.Bits()
	for i := range b {
		// Set every bit at position >= bits.
		lo := i * 8
		switch {
		case lo >= bits:
			b[i] = 0xff
		case lo+8 > bits:
			b[i] |= 0xff >> (bits - lo)
		}
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// usable reports whether a may be handed out from pool: inside it, not the
// network address (the IPv6 subnet-router anycast address), and for IPv4
// not the broadcast address.
func usable(pool netip.Prefix, a netip.Addr) bool {
	if !pool.Contains(a) || a == pool.Addr() {
		return false
	}
	return a.Is6() || a != lastAddr(pool)
}

// span is an inclusive range of usable addresses lo..hi.
type span struct{ lo, hi netip.Addr }

// allocSpan returns the usable addresses dynamic allocation may hand out:
// the sub-range if set, else the pool, without the pool's network and
// broadcast addresses. ok is false when nothing is usable.
func allocSpan(pool, sub netip.Prefix) (s span, ok bool) {
	r := pool
	if sub.IsValid() {
		r = sub
	}
	s = span{lo: r.Addr(), hi: lastAddr(r)}
	if s.lo == pool.Addr() {
		if s.lo == s.hi {
			return s, false
		}
		s.lo = s.lo.Next()
	}
	if pool.Addr().Is4() && s.hi == lastAddr(pool) {
		if s.lo == s.hi {
			return s, false
		}
		s.hi = s.hi.Prev()
	}
	return s, s.lo.Compare(s.hi) <= 0
}

func (s span) contains(a netip.Addr) bool {
	return a.Compare(s.lo) >= 0 && a.Compare(s.hi) <= 0
}

// next returns the address after a, wrapping from hi to lo.
func (s span) next(a netip.Addr) netip.Addr {
	if a == s.hi || !s.contains(a) {
		return s.lo
	}
	return a.Next()
}

// size returns the number of addresses in s, saturated at 2^64-1.
func (s span) size() uint64 {
	lo, hi := s.lo.As16(), s.hi.As16()
	if binary.BigEndian.Uint64(lo[:8]) != binary.BigEndian.Uint64(hi[:8]) {
		return math.MaxUint64
	}
	d := binary.BigEndian.Uint64(hi[8:]) - binary.BigEndian.Uint64(lo[8:])
	if d == math.MaxUint64 {
		return d
	}
	return d + 1
}

// advance returns the address n steps after a, wrapping.
func (s span) advance(a netip.Addr, n int) netip.Addr {
	for range n {
		a = s.next(a)
	}
	return a
}

// parsePrefix parses a pool or sub-range CIDR and returns it masked. It
// refuses zones and IPv4-mapped IPv6 addresses, whose family is ambiguous.
func parsePrefix(what, s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(strings.TrimSpace(s))
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%s %q is not a CIDR: %w", what, s, ErrInvalidRequest)
	}
	if p.Addr().Is4In6() {
		return netip.Prefix{}, fmt.Errorf("%s %q is an IPv4-mapped IPv6 prefix: %w", what, s, ErrInvalidRequest)
	}
	return p.Masked(), nil
}

// parseAddr parses an address as Docker sends it: a plain IP, or (leniently)
// an IP with a prefix length, which is ignored.
func parseAddr(s string) (netip.Addr, error) {
	t := strings.TrimSpace(s)
	if i := strings.IndexByte(t, '/'); i >= 0 {
		p, err := netip.ParsePrefix(t)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("address %q is not an IP address: %w", s, ErrInvalidRequest)
		}
		t = p.Addr().String()
	}
	a, err := netip.ParseAddr(t)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("address %q is not an IP address: %w", s, ErrInvalidRequest)
	}
	if a.Zone() != "" || a.Is4In6() {
		return netip.Addr{}, fmt.Errorf("address %q: zones and IPv4-mapped addresses are not accepted: %w", s, ErrInvalidRequest)
	}
	return a, nil
}
