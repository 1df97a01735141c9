package vxlan

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Encrypted overlays (Network.Encrypted, docker network create -o
// encrypted=true). The VXLAN packets between this host's VTEP and the VTEP
// of every peer of an encrypted network are carried in IPsec ESP, transport
// mode, with the AEAD rfc4106(gcm(aes)) (128-bit key, 32-bit salt, 128-bit
// ICV). Several networks share UDP port 4789, so the packets of the
// encrypted VNIs are told apart by their VNI, as Docker's overlay does:
//
//   - mangle OUTPUT jumps to CONSUL-OVERLAY-ESP-OUT, which marks every VXLAN
//     packet this VTEP sends with an encrypted VNI (-m u32 on the VXLAN
//     header) with the owner's fwmark (ipsecMark);
//   - xfrm "out" policies with that mark, one per peer VTEP, send the
//     marked packets through the ESP state of the current send key (the
//     template names its SPI); a catch-all "block" policy of lower
//     precedence drops a marked packet to a VTEP that has no policy yet
//     (keys not known yet, a peer not programmed yet), so an encrypted
//     VNI never leaves in plain text;
//   - mangle PREROUTING jumps to CONSUL-OVERLAY-ESP-IN, which drops every
//     VXLAN packet to this VTEP with an encrypted VNI that did not arrive
//     through IPsec (-m policy --dir in --pol none). The kernel checks no
//     xfrm "in" policy for a UDP encapsulation socket such as VXLAN's, so
//     this rule is the "require" on input: a host without the keys can
//     neither read nor inject an encrypted network's frames. Unencrypted
//     VNIs between the same hosts stay plain VXLAN.
//
// Keys come from the caller (SetIPsecKeys; the plugin generates and
// rotates them in the store). Each key is a secret and a key ID; the ESP
// key and SPI of one direction (source VTEP to destination VTEP) are
// derived from them with HMAC-SHA256, so no two directions or hosts share
// an AES-GCM key and nonce space, and every host computes the same states
// for a direction. Every key the caller lists is installed in both
// directions; the out policies name the SPI of the primary key. Rotation
// is then: list the new key (all hosts install it for receive), later make
// it primary (the policies switch), later drop the old key: no packet
// meets a host without the key it was sent with.
//
// Ownership: every state and policy carries the owner's reqid (ipsecReqid)
// and every policy the owner's mark, derived from OwnerMark; the iptables
// rules carry the mark as a comment. Another instance's xfrm entries and
// rules are never touched.

// ESPOverhead is what ESP in transport mode with rfc4106(gcm(aes)) adds to
// a VXLAN packet at most: SPI and sequence number 8, IV 8, padding up to 3,
// pad length and next header 2, ICV 16 (37), rounded up to 40.
const ESPOverhead = 40

// IPsec chains: shared by all owners and never removed, like FirewallChain.
const (
	ESPOutChain = "CONSUL-OVERLAY-ESP-OUT" // mangle, jumped to from OUTPUT
	ESPInChain  = "CONSUL-OVERLAY-ESP-IN"  // mangle, jumped to from PREROUTING
)

const (
	ipsecAEAD    = "rfc4106(gcm(aes))"
	ipsecKeyLen  = 20 // AES-128 key and 4-byte salt
	ipsecICVBits = 128
	// Policy priorities: lower is preferred.
	ipsecPeerPriority  = 100
	ipsecBlockPriority = 200
	// ipsecBase is the top of every reqid and fwmark of ours; the low 16
	// bits come from the owner mark.
	ipsecBase = 0xC0E00000
)

// ErrNoIPsec reports that encryption cannot work here: the kernel has no
// ESP or no AES-GCM, or no iptables command of the underlay's family is
// enabled.
var ErrNoIPsec = errors.New("encrypted networks are not supported here")

// IPsecKey is one key of the cluster's key ring.
type IPsecKey struct {
	// ID tells the key apart (non-zero); it enters the SPIs.
	ID uint32
	// Secret is the key material (at least 16 bytes) the ESP keys of
	// each direction are derived from. Never logged.
	Secret []byte
}

// IPsecKeys is the key ring a host installs.
type IPsecKeys struct {
	// Keys are installed for both directions with every peer of an
	// encrypted network.
	Keys []IPsecKey
	// Primary is the ID of the key that sends (one of Keys; 0: none,
	// and encrypted VNIs are blocked on output).
	Primary uint32
}

// ipsecState is the Manager's encryption state; guarded by Manager.mu.
type ipsecState struct {
	encrypted map[uint32]bool // VNIs of the ensured encrypted networks
	keys      IPsecKeys
	// haveKeys: SetIPsecKeys was called. Until then (a restart) the
	// states and out policies in the kernel are kept, so traffic keeps
	// flowing while the plugin reads the key ring.
	haveKeys bool
	probed   error // the kernel support probe's result once done
	didProbe bool
}

// ipsecReqid is the reqid of an owner's states and policies, and ipsecMark
// its fwmark: ipsecBase plus 16 bits of a hash of the owner mark.
func ipsecReqid(mark string) uint32 {
	h := fnv.New32a()
	h.Write([]byte(mark))
	s := h.Sum32()
	return ipsecBase | (s^s>>16)&0xffff
}

func ipsecMark(mark string) uint32 { return ipsecReqid(mark) }

// derive returns the SPI and ESP key material of key k for packets from
// src to dst.
func deriveSA(k IPsecKey, src, dst netip.Addr) (spi uint32, key []byte) {
	mac := hmac.New(sha256.New, k.Secret)
	var id [4]byte
	binary.BigEndian.PutUint32(id[:], k.ID)
	mac.Write([]byte("consul-overlay esp v1"))
	mac.Write(id[:])
	mac.Write(src.AsSlice())
	mac.Write(dst.AsSlice())
	sum := mac.Sum(nil)
	spi = binary.BigEndian.Uint32(sum[:4])
	if spi < 256 { // 1..255 are reserved by IANA
		spi += 256
	}
	return spi, slices.Clone(sum[4 : 4+ipsecKeyLen])
}

// SetIPsecKeys replaces the key ring and programs it: states for every
// key and peer of the encrypted networks, the out policies on the primary
// key. Keys that left the ring are removed. Key material is never logged.
func (m *Manager) SetIPsecKeys(ctx context.Context, keys IPsecKeys) (Changes, error) {
	var ch Changes
	for _, k := range keys.Keys {
		if k.ID == 0 || len(k.Secret) < 16 {
			return ch, fmt.Errorf("set ipsec keys: key %d: want a non-zero ID and at least 16 bytes of secret", k.ID)
		}
	}
	if keys.Primary != 0 && !slices.ContainsFunc(keys.Keys, func(k IPsecKey) bool { return k.ID == keys.Primary }) {
		return ch, fmt.Errorf("set ipsec keys: primary key %d is not in the ring", keys.Primary)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.sec.keys = IPsecKeys{Keys: slices.Clone(keys.Keys), Primary: keys.Primary}
	m.sec.haveKeys = true
	err := m.syncXfrm(&ch)
	if ch.IPsec > 0 {
		m.log.Info("ipsec keys programmed", "keys", len(keys.Keys), "primary", keys.Primary, "changes", ch.IPsec)
	}
	return ch, err
}

// EncryptedNetworks is the number of encrypted networks ensured here.
func (m *Manager) EncryptedNetworks() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.sec.encrypted)
}

// IPsecSupported probes whether this kernel can hold the ESP states of
// encrypted networks (esp4/esp6 and rfc4106(gcm(aes))), and this Manager
// has the iptables command of the underlay's family. The probe adds and
// removes one state between two documentation addresses.
func (m *Manager) IPsecSupported() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.probeIPsec()
}

// probeIPsec is IPsecSupported with m.mu held; the kernel's answer is
// kept.
func (m *Manager) probeIPsec() error {
	if m.fw.underlayBin(m.cfg.VTEP.Is6()) == "" {
		return fmt.Errorf("%w: no iptables command of the underlay's family to mark and filter the encrypted VNIs", ErrNoIPsec)
	}
	if m.sec.didProbe {
		return m.sec.probed
	}
	src, dst := netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("198.51.100.2")
	if m.cfg.VTEP.Is6() {
		src, dst = netip.MustParseAddr("2001:db8:ffff::1"), netip.MustParseAddr("2001:db8:ffff::2")
	}
	st := m.espState(IPsecKey{ID: 1, Secret: make([]byte, 32)}, src, dst)
	st.Spi = 0xfffffffe
	err := m.nl.XfrmStateAdd(st)
	if err == nil || errors.Is(err, unix.EEXIST) {
		_ = m.nl.XfrmStateDel(st)
		m.sec.probed = nil
	} else {
		m.sec.probed = fmt.Errorf("%w: the kernel cannot hold an ESP state with %s (it needs esp4/esp6 and AES-GCM): %v", ErrNoIPsec, ipsecAEAD, err)
	}
	m.sec.didProbe = true
	return m.sec.probed
}

// espState is the ESP state of key k for packets from src to dst.
func (m *Manager) espState(k IPsecKey, src, dst netip.Addr) *netlink.XfrmState {
	spi, key := deriveSA(k, src, dst)
	return &netlink.XfrmState{
		Src: src.AsSlice(), Dst: dst.AsSlice(),
		Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TRANSPORT,
		Spi: int(spi), Reqid: int(ipsecReqid(m.mark)), ReplayWindow: 64,
		Aead: &netlink.XfrmStateAlgo{Name: ipsecAEAD, Key: key, ICVLen: ipsecICVBits},
	}
}

// ownIPsecDevices checks that the network's bridge and VXLAN device, where
// they exist (in either namespace), carry no other owner's mark: the VNI's
// packets are then that owner's, and a state, policy or ESP rule of ours
// for it would mark and block or drop them. It reads the kernel, not Reconcile's dump: it
// runs beside the dump. Caller holds m.mu.
//
// Equivalent to: `ip -d link show vxbr-0a1b; ip -d link show vx-0a1b`
// and comparing their alias with ours.
func (m *Manager) ownIPsecDevices(vni uint32) error {
	for _, ns := range m.namespaces() {
		for _, name := range []string{BridgeName(vni), VXLANName(vni)} {
			l, err := retryDump(func() (netlink.Link, error) { return ns.nl.LinkByName(name) })
			if isNotFound(err) {
				continue
			}
			if err != nil {
				return fmt.Errorf("ipsec of network (vni %d): get link %q: %w", vni, name, err)
			}
			if err := m.foreign(l); err != nil {
				return fmt.Errorf("ipsec of network (vni %d): device %q is not ours, no xfrm state, policy or esp rule for it: %w", vni, name, err)
			}
		}
	}
	return nil
}

// ensureIPsecNetwork records vni as encrypted and installs what keeps it
// from leaving or entering in plain text: the ESP chains' rules of the
// VNI and the block policy. ensureNetwork calls it before it creates the
// VXLAN device. A network whose devices are another owner's is refused
// before anything is written. Caller holds m.mu.
func (m *Manager) ensureIPsecNetwork(ctx context.Context, vni uint32, ch *Changes) error {
	if err := m.ownIPsecDevices(vni); err != nil {
		return fmt.Errorf("ensure network (vni %d): %w", vni, err)
	}
	if err := m.probeIPsec(); err != nil {
		return fmt.Errorf("ensure network (vni %d): %w", vni, err)
	}
	if m.sec.encrypted == nil {
		m.sec.encrypted = map[uint32]bool{}
	}
	had := m.sec.encrypted[vni]
	m.sec.encrypted[vni] = true
	if err := m.syncESPRules(ctx, ch); err != nil {
		if !had {
			delete(m.sec.encrypted, vni)
		}
		return fmt.Errorf("ensure network (vni %d): %w", vni, err)
	}
	return nil
}

// dropIPsecNetwork forgets vni as encrypted and removes its rules and any
// state or policy only it needed. Caller holds m.mu.
func (m *Manager) dropIPsecNetwork(ctx context.Context, vni uint32, ch *Changes) error {
	if !m.sec.encrypted[vni] {
		return nil // not encrypted here (what a restart left, Reconcile removes)
	}
	delete(m.sec.encrypted, vni)
	return errors.Join(m.syncXfrm(ch), m.syncESPRules(ctx, ch))
}

// encryptedPeers is the set of remote VTEPs that share an encrypted
// network with this host. Caller holds m.mu.
func (m *Manager) encryptedPeers() []netip.Addr {
	set := map[netip.Addr]bool{}
	for vni := range m.sec.encrypted {
		if ps := m.peers[vni]; ps != nil {
			for v := range ps.vteps {
				if v != m.cfg.VTEP {
					set[v] = true
				}
			}
		}
	}
	return sortedAddrs(set)
}

func hostNet(a netip.Addr) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}
}

func anyNet(v6 bool) *net.IPNet {
	if v6 {
		return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
}

// syncXfrm makes this owner's xfrm states and policies exactly those the
// encrypted networks, their peers and the key ring call for. Caller holds
// m.mu.
//
// Equivalent to: `ip xfrm state add src 192.0.2.11 dst 192.0.2.12 proto
// esp spi 0x… reqid 0xc0e0…  mode transport replay-window 64 aead
// 'rfc4106(gcm(aes))' 0x… 128` (both directions, every key), `ip xfrm
// policy update src 192.0.2.11/32 dst 192.0.2.12/32 proto udp dport 4789
// dir out mark 0xc0e0… priority 100 tmpl src 192.0.2.11 dst 192.0.2.12
// proto esp spi 0x… reqid 0xc0e0… mode transport` per peer, and `ip xfrm
// policy update src 192.0.2.11/32 dst 0.0.0.0/0 proto udp dport 4789 dir
// out mark 0xc0e0… priority 200 action block`.
func (m *Manager) syncXfrm(ch *Changes) error {
	reqid := int(ipsecReqid(m.mark))
	mark := &netlink.XfrmMark{Value: ipsecMark(m.mark), Mask: 0xffffffff}
	local := m.cfg.VTEP
	var peers []netip.Addr
	if len(m.sec.encrypted) > 0 {
		peers = m.encryptedPeers()
	}
	// Desired states by (dst, spi).
	type said struct {
		dst netip.Addr
		spi uint32
	}
	want := map[said]*netlink.XfrmState{}
	var errs []error
	for _, p := range peers {
		for _, k := range m.sec.keys.Keys {
			for _, dir := range [][2]netip.Addr{{local, p}, {p, local}} {
				st := m.espState(k, dir[0], dir[1])
				id := said{dir[1], uint32(st.Spi)}
				if _, dup := want[id]; dup {
					errs = append(errs, fmt.Errorf("ipsec: spi 0x%x to %s derived twice: rotate the keys", st.Spi, dir[1]))
					continue
				}
				want[id] = st
			}
		}
	}
	family := netlink.FAMILY_V4
	if local.Is6() {
		family = netlink.FAMILY_V6
	}
	// Keys not known yet and something encrypted: keep what the kernel
	// holds (a restart), only make sure nothing leaves in plain text.
	keepKernel := !m.sec.haveKeys && len(m.sec.encrypted) > 0
	have, err := retryDump(func() ([]netlink.XfrmState, error) { return m.nl.XfrmStateList(family) })
	if err != nil {
		return fmt.Errorf("ipsec: list xfrm states: %w", err)
	}
	present := map[said]bool{}
	for i := range have {
		st := &have[i]
		if st.Reqid != reqid || st.Proto != netlink.XFRM_PROTO_ESP {
			continue // another owner's, or not ours at all
		}
		dst, _ := netip.AddrFromSlice(st.Dst)
		id := said{dst.Unmap(), uint32(st.Spi)}
		if w := want[id]; (w != nil && sameESPState(st, w)) || keepKernel {
			present[id] = true
			continue
		}
		if err := m.nl.XfrmStateDel(st); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("ipsec: remove state spi 0x%x to %s: %w", st.Spi, id.dst, err))
			continue
		}
		ch.IPsec++
		m.log.Debug("xfrm state removed", "peer", id.dst, "spi", fmt.Sprintf("0x%x", st.Spi))
	}
	// States first, so a policy never names an SPI that is not there yet.
	for id, st := range want {
		if present[id] {
			continue
		}
		if err := m.nl.XfrmStateUpdate(st); err != nil {
			if err2 := m.nl.XfrmStateAdd(st); err2 != nil {
				errs = append(errs, fmt.Errorf("ipsec: add state spi 0x%x to %s: %w", st.Spi, id.dst, err2))
				continue
			}
		}
		ch.IPsec++
		m.log.Debug("xfrm state written", "peer", id.dst, "spi", fmt.Sprintf("0x%x", st.Spi))
	}

	// Policies: the block catch-all while any network is encrypted, one
	// out policy per peer while a primary key exists.
	wantPol := map[netip.Addr]*netlink.XfrmPolicy{}
	var primary *IPsecKey
	for i := range m.sec.keys.Keys {
		if m.sec.keys.Keys[i].ID == m.sec.keys.Primary {
			primary = &m.sec.keys.Keys[i]
		}
	}
	if primary != nil {
		for _, p := range peers {
			spi, _ := deriveSA(*primary, local, p)
			wantPol[p] = &netlink.XfrmPolicy{
				Src: hostNet(local), Dst: hostNet(p), Proto: netlink.Proto(17), DstPort: m.cfg.Port,
				Dir: netlink.XFRM_DIR_OUT, Priority: ipsecPeerPriority, Mark: mark,
				Tmpls: []netlink.XfrmPolicyTmpl{{
					Src: local.AsSlice(), Dst: p.AsSlice(), Proto: netlink.XFRM_PROTO_ESP,
					Mode: netlink.XFRM_MODE_TRANSPORT, Spi: int(spi), Reqid: reqid,
				}},
			}
		}
	}
	var block *netlink.XfrmPolicy
	if len(m.sec.encrypted) > 0 {
		block = &netlink.XfrmPolicy{
			Src: hostNet(local), Dst: anyNet(local.Is6()), Proto: netlink.Proto(17), DstPort: m.cfg.Port,
			Dir: netlink.XFRM_DIR_OUT, Priority: ipsecBlockPriority, Mark: mark, Action: netlink.XFRM_POLICY_BLOCK,
		}
	}
	pols, err := retryDump(func() ([]netlink.XfrmPolicy, error) { return m.nl.XfrmPolicyList(family) })
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("ipsec: list xfrm policies: %w", err))...)
	}
	havePol := map[netip.Addr]bool{}
	haveBlock := false
	// ownBlock: p is the block policy this sync wants, of the local VTEP.
	self := netip.PrefixFrom(local, local.BitLen())
	ownBlock := func(p *netlink.XfrmPolicy) bool {
		src, _ := prefixOf(p.Src)
		dst, _ := prefixOf(p.Dst)
		return block != nil && p.Mark != nil && p.Mark.Value == mark.Value && p.Dir == netlink.XFRM_DIR_OUT &&
			p.Action == netlink.XFRM_POLICY_BLOCK && dst.Bits() == 0 && src == self
	}
	// The block policy of the local VTEP goes in before any other is
	// removed: one that selects an earlier VTEP (SetVTEP) does not cover
	// the packets sent from the new one, which would leave in plain text
	// while no peer policy exists.
	for i := range pols {
		if ownBlock(&pols[i]) {
			haveBlock = true
		}
	}
	if block != nil && !haveBlock {
		if err := m.nl.XfrmPolicyUpdate(block); err != nil {
			errs = append(errs, fmt.Errorf("ipsec: add block policy: %w", err))
		} else {
			ch.IPsec++
		}
	}
	for i := range pols {
		p := &pols[i]
		if p.Mark == nil || p.Mark.Value != mark.Value || p.Dir != netlink.XFRM_DIR_OUT {
			continue
		}
		dst, _ := prefixOf(p.Dst)
		switch {
		case ownBlock(p):
			continue
		case dst.IsSingleIP() && wantPol[dst.Addr()] != nil && samePolicy(p, wantPol[dst.Addr()]):
			havePol[dst.Addr()] = true
			continue
		case dst.IsSingleIP() && wantPol[dst.Addr()] != nil:
			continue // updated below in place: no window without a policy
		case keepKernel && p.Action != netlink.XFRM_POLICY_BLOCK:
			continue
		}
		if err := m.nl.XfrmPolicyDel(p); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("ipsec: remove policy to %s: %w", dst, err))
			continue
		}
		ch.IPsec++
		m.log.Debug("xfrm policy removed", "peer", dst)
	}
	for p, pol := range wantPol {
		if havePol[p] {
			continue
		}
		if err := m.nl.XfrmPolicyUpdate(pol); err != nil {
			errs = append(errs, fmt.Errorf("ipsec: write policy to %s: %w", p, err))
			continue
		}
		ch.IPsec++
		m.log.Debug("xfrm policy written", "peer", p, "spi", fmt.Sprintf("0x%x", pol.Tmpls[0].Spi))
	}
	return errors.Join(errs...)
}

func sameESPState(a, b *netlink.XfrmState) bool {
	return a.Mode == b.Mode && a.Aead != nil && b.Aead != nil && a.Aead.Name == b.Aead.Name &&
		bytes.Equal(a.Aead.Key, b.Aead.Key) && a.Aead.ICVLen == b.Aead.ICVLen &&
		net.IP(a.Src).Equal(b.Src) && net.IP(a.Dst).Equal(b.Dst)
}

func samePolicy(a, b *netlink.XfrmPolicy) bool {
	if a.Action != b.Action || a.Priority != b.Priority || a.DstPort != b.DstPort || a.Proto != b.Proto || len(a.Tmpls) != 1 || len(b.Tmpls) != 1 {
		return false
	}
	s1, _ := prefixOf(a.Src)
	s2, _ := prefixOf(b.Src)
	t1, t2 := a.Tmpls[0], b.Tmpls[0]
	return s1 == s2 && t1.Spi == t2.Spi && t1.Reqid == t2.Reqid && t1.Mode == t2.Mode && t1.Proto == t2.Proto
}

// vniU32 is the -m u32 expression that matches a VXLAN packet's VNI, in the
// form iptables -S prints it: for IPv4 the UDP header starts at IHL*4, the
// VNI is the top 24 bits of the word 12 bytes into it; IPv6 without
// extension headers has it at 52.
func vniU32(vni uint32, v6 bool) string {
	if v6 {
		return fmt.Sprintf("0x34>>0x8=0x%x", vni)
	}
	return fmt.Sprintf("0x0>>0x16&0x3c@0xc>>0x8=0x%x", vni)
}

// espRule is the rule of chain for one encrypted VNI, as iptables
// arguments after "-A <chain>".
func (m *Manager) espRule(chain string, vni uint32) []string {
	v6 := m.cfg.VTEP.Is6()
	host := netip.PrefixFrom(m.cfg.VTEP, m.cfg.VTEP.BitLen()).String()
	u32 := []string{"-p", "udp", "-m", "udp", "--dport", strconv.Itoa(m.cfg.Port), "-m", "u32", "--u32", vniU32(vni, v6)}
	if chain == ESPOutChain {
		return slices.Concat([]string{"-s", host}, u32, []string{"-m", "comment", "--comment", m.mark,
			"-j", "MARK", "--set-xmark", fmt.Sprintf("0x%x/0xffffffff", ipsecMark(m.mark))})
	}
	return slices.Concat([]string{"-d", host}, u32, []string{"-m", "policy", "--dir", "in", "--pol", "none",
		"-m", "comment", "--comment", m.mark, "-j", "DROP"})
}

// mangle runs `<bin> -w -t mangle <args>`.
func (m *Manager) mangle(ctx context.Context, bin string, args ...string) (string, error) {
	full := append([]string{"-w", "-t", "mangle"}, args...)
	out, err := exec.CommandContext(ctx, bin, full...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", filepath.Base(bin), strings.Join(full, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// syncESPRules makes this owner's rules in the ESP chains exactly one per
// encrypted VNI (none left when no network is encrypted), and the chains exist and are jumped to
// first from OUTPUT and PREROUTING. Caller holds m.mu.
//
// Equivalent to: `iptables -t mangle -N CONSUL-OVERLAY-ESP-OUT; iptables -t
// mangle -I OUTPUT 1 -j CONSUL-OVERLAY-ESP-OUT; iptables -t mangle -A
// CONSUL-OVERLAY-ESP-OUT -s 192.0.2.11/32 -p udp -m udp --dport 4789 -m u32
// --u32 0x0>>0x16&0x3c@0xc>>0x8=0x1000 -m comment --comment <mark> -j MARK
// --set-xmark 0xc0e0…/0xffffffff`, and the same for PREROUTING and
// CONSUL-OVERLAY-ESP-IN with `-d 192.0.2.11/32 … -m policy --dir in --pol
// none … -j DROP`.
func (m *Manager) syncESPRules(ctx context.Context, ch *Changes) error {
	return m.syncESP(ctx, ch, false)
}

// syncESP is syncESPRules; with addOnly (Reconcile with KeepStrays) it
// adds the missing rules and removes none: a rule of an encrypted network
// the caller did not list is kept with the network's overlay, whose
// packets would otherwise leave in plain text. Caller holds m.mu.
func (m *Manager) syncESP(ctx context.Context, ch *Changes, addOnly bool) error {
	bin := m.fw.underlayBin(m.cfg.VTEP.Is6())
	if bin == "" {
		if len(m.sec.encrypted) > 0 {
			return fmt.Errorf("%w: no iptables command of the underlay's family", ErrNoIPsec)
		}
		return nil
	}
	var errs []error
	for _, c := range []struct{ chain, from string }{{ESPOutChain, "OUTPUT"}, {ESPInChain, "PREROUTING"}} {
		out, err := m.mangle(ctx, bin, "-S", c.chain)
		exists := err == nil
		if err != nil && !exitCode1(err) {
			errs = append(errs, err)
			continue
		}
		if !exists && len(m.sec.encrypted) == 0 {
			continue // nothing of ours can be there
		}
		if !exists {
			if _, err := m.mangle(ctx, bin, "-N", c.chain); err != nil {
				errs = append(errs, err)
				continue
			}
			ch.Rules++
		}
		if !exists || len(m.sec.encrypted) > 0 {
			if _, err := m.mangle(ctx, bin, "-C", c.from, "-j", c.chain); err != nil {
				if !exitCode1(err) {
					errs = append(errs, err)
					continue
				}
				if _, err := m.mangle(ctx, bin, "-I", c.from, "1", "-j", c.chain); err != nil {
					errs = append(errs, err)
					continue
				}
				ch.Rules++
			}
		}
		want := map[string]uint32{}
		for vni := range m.sec.encrypted {
			want[strings.Join(m.espRule(c.chain, vni), " ")] = vni
		}
		for _, l := range strings.Split(out, "\n") {
			if !strings.HasPrefix(l, "-A "+c.chain+" ") {
				continue
			}
			r := parseRule(l)
			if !r.marked || r.comment != m.mark {
				continue // another owner's
			}
			// -S quotes the u32 expression; no field has a space.
			fields := make([]string, len(r.fields))
			for i, f := range r.fields {
				fields[i] = strings.Trim(f, `"`)
			}
			text := strings.Join(fields, " ")
			if _, ok := want[text]; ok {
				delete(want, text)
				continue
			}
			if addOnly {
				continue
			}
			if _, err := m.mangle(ctx, bin, slices.Concat([]string{"-D", c.chain}, fields)...); err != nil && !exitCode1(err) {
				errs = append(errs, err)
				continue
			}
			ch.Rules++
		}
		for _, vni := range want {
			if _, err := m.mangle(ctx, bin, slices.Concat([]string{"-A", c.chain}, m.espRule(c.chain, vni))...); err != nil {
				errs = append(errs, err)
				continue
			}
			ch.Rules++
			m.log.Debug("esp rule written", "chain", c.chain, "vni", vni)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("ipsec rules: %w", err)
	}
	return nil
}

// reconcileIPsec is Reconcile's part: the encrypted networks become those
// of nets (with keep, the listed ones are added), and states, policies and
// rules follow. A network whose devices are another owner's is left out:
// ensureNetworkFW reports it. Caller holds m.mu.
func (m *Manager) reconcileIPsec(ctx context.Context, nets map[uint32]Network, keep bool, ch *Changes) error {
	if !keep || m.sec.encrypted == nil {
		m.sec.encrypted = map[uint32]bool{}
	}
	var errs []error
	for vni, n := range nets {
		if !n.Encrypted {
			continue
		}
		// A failed lookup is no proof of another owner: the network
		// stays encrypted, so its packets never leave in plain text.
		if err := m.ownIPsecDevices(vni); errors.Is(err, ErrForeign) {
			continue
		} else if err != nil {
			errs = append(errs, err)
		}
		m.sec.encrypted[vni] = true
	}
	if len(m.sec.encrypted) > 0 {
		if err := m.probeIPsec(); err != nil {
			return errors.Join(append(errs, err)...)
		}
	}
	if keep {
		return errors.Join(append(errs, m.syncESP(ctx, ch, true), m.syncXfrmKeep(ch))...)
	}
	return errors.Join(append(errs, m.syncESPRules(ctx, ch), m.syncXfrm(ch))...)
}

// syncXfrmKeep is syncXfrm for Reconcile with KeepStrays: it only runs when
// something is encrypted, so an unproven view removes nothing it does not
// also put back.
func (m *Manager) syncXfrmKeep(ch *Changes) error {
	if len(m.sec.encrypted) == 0 {
		return nil
	}
	return m.syncXfrm(ch)
}

// RemoveIPsec removes every xfrm state and policy and every ESP chain rule
// of this owner, whatever the networks: the plugin's clean-up at removal.
func (m *Manager) RemoveIPsec(ctx context.Context) (Changes, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var ch Changes
	saved := m.sec.encrypted
	m.sec.encrypted = map[uint32]bool{}
	err := errors.Join(m.syncXfrm(&ch), m.syncESPRules(ctx, &ch))
	if err != nil {
		m.sec.encrypted = saved
	}
	return ch, err
}
