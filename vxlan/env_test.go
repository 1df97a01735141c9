package vxlan

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"consul-overlay/internal/testenv"
)

// testHost is a simulated host with a Manager programming its namespace.
type testHost struct {
	*testenv.Host
	m *Manager
	// dp is the host's data-plane namespace (Config.DataplaneNS) of the
	// Managers that manager makes; nil: none, every device in NS.
	dp *testenv.NetNS
}

// layouts are the two layouts the kernel tests run in: every device in
// the host's namespace, and new networks in a data-plane namespace.
var layouts = []struct {
	name string
	dp   bool
}{{"host", false}, {"dataplane", true}}

// inLayouts runs test once in each layout, as subtests named after it
// (in parallel with parallel).
func inLayouts(t *testing.T, parallel bool, test func(t *testing.T, dp bool)) {
	for _, lay := range layouts {
		t.Run(lay.name, func(t *testing.T) {
			if parallel {
				t.Parallel()
			}
			test(t, lay.dp)
		})
	}
}

// requireKernel stops the test unless it can build namespaces and run the
// commands the kernel tests use.
func requireKernel(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t)
	for _, c := range []string{"nsenter", "ping", "ip", "iptables", "ip6tables"} {
		if _, err := exec.LookPath(c); err != nil {
			testenv.Missing(t, c, "apt-get install -y util-linux iputils-ping iproute2 iptables")
		}
	}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// nsWrapper writes a script that runs cmd inside ns: the Manager runs
// iptables in its own namespace, so the test points it at the host's.
func nsWrapper(t *testing.T, ns *testenv.NetNS, cmd string) string {
	t.Helper()
	return writeNSWrappers(t, ns, cmd)
}

// nsWrapperWithRestore is nsWrapper with the command's -restore and -save
// beside it, as a host has them: the firewall then writes its rules in one
// transaction per command.
func nsWrapperWithRestore(t *testing.T, ns *testenv.NetNS, cmd string) string {
	t.Helper()
	return writeNSWrappers(t, ns, cmd, cmd+"-restore", cmd+"-save")
}

// writeNSWrappers writes, in a directory of their own, a script for each
// command that runs it in ns, and returns the first one's path.
func writeNSWrappers(t *testing.T, ns *testenv.NetNS, cmds ...string) string {
	t.Helper()
	dir := t.TempDir()
	for _, c := range cmds {
		bin, err := exec.LookPath(c)
		if err != nil {
			t.Fatal(err)
		}
		script := fmt.Sprintf("#!/bin/sh\nexec nsenter --net=%s %s \"$@\"\n", ns.Path, bin)
		if err := os.WriteFile(filepath.Join(dir, c), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dir, cmds[0])
}

// newHosts builds an underlay of n hosts, each with a Manager whose
// iptables commands run in the host's namespace.
func newHosts(t *testing.T, n int, opts testenv.UnderlayOptions) []*testHost {
	t.Helper()
	return newHostsIn(t, n, opts, false)
}

// newHostsIn is newHosts; with dp each host gets a data-plane namespace,
// which its Managers put new networks in.
func newHostsIn(t *testing.T, n int, opts testenv.UnderlayOptions, dp bool) []*testHost {
	t.Helper()
	requireKernel(t)
	var hosts []*testHost
	for _, h := range testenv.NewUnderlay(t, n, opts) {
		th := &testHost{Host: h}
		if dp {
			th.dp = testenv.NewNetNS(t)
		}
		th.m = th.manager(t, "")
		hosts = append(hosts, th)
	}
	return hosts
}

// manager returns a new Manager with the given owner that programs h's
// namespace, as another plugin instance (or a restarted one) would.
func (h *testHost) manager(t *testing.T, owner string) *Manager {
	t.Helper()
	return h.managerLog(t, owner, testLogger(t).With("host", h.Addr, "owner", owner))
}

// managerLog is manager with the given logger.
func (h *testHost) managerLog(t *testing.T, owner string, log *slog.Logger) *Manager {
	t.Helper()
	return h.managerWith(t, func(cfg *Config) { cfg.Owner, cfg.Logger = owner, log })
}

// managerWith is a new Manager of h's namespace (and its data-plane
// namespace, if it has one) with the tests' settings, changed by set.
func (h *testHost) managerWith(t *testing.T, set func(*Config)) *Manager {
	t.Helper()
	cfg := Config{
		VTEP:           h.Addr,
		IPTables:       nsWrapper(t, h.NS, "iptables"),
		IP6Tables:      nsWrapper(t, h.NS, "ip6tables"),
		Sysctl:         "-",
		NoTrackBridged: true, // the NOTRACK rule is exercised and counted too
		Logger:         testLogger(t).With("host", h.Addr),
	}
	if h.dp != nil {
		cfg.DataplaneNS = h.dp.Path
	}
	set(&cfg)
	m, err := NewAt(cfg, h.NS.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// container is an endpoint moved into its own namespace, as Docker does.
type container struct {
	ns    *testenv.NetNS
	id    string
	vni   uint32
	mac   net.HardwareAddr
	addrs []netip.Prefix
	host  *testHost
}

var epSeq atomic.Uint32

// run creates an endpoint on h and moves its container end into a fresh
// namespace with addrs (and default routes via gws).
func (h *testHost) run(t *testing.T, vni uint32, addrs []netip.Prefix, gws ...netip.Addr) *container {
	t.Helper()
	return h.runWith(t, h.m, vni, addrs, gws...)
}

// runWith is run with the endpoint created by m (an instance of another
// owner on h).
func (h *testHost) runWith(t *testing.T, m *Manager, vni uint32, addrs []netip.Prefix, gws ...netip.Addr) *container {
	t.Helper()
	id := fmt.Sprintf("%04x%06x%054x", epSeq.Add(1), vni, 0)
	c := &container{id: id, vni: vni, mac: MACFromIP(addrs[0].Addr()), addrs: addrs, host: h}
	info, err := m.EnsureEndpoint(t.Context(), Endpoint{ID: id, VNI: vni, MAC: c.mac})
	if err != nil {
		t.Fatal(err)
	}
	c.ns = testenv.NewNetNS(t)
	if err := testenv.MoveAndConfigure(h.NS, c.ns, info.ContainerIf, "eth0", addrs, gws...); err != nil {
		t.Fatal(err)
	}
	return c
}

// peers are the Peers other hosts program for c.
func (c *container) peers() []Peer {
	var ps []Peer
	for _, a := range c.addrs {
		ps = append(ps, Peer{VNI: c.vni, IP: a.Addr(), MAC: c.mac, VTEP: c.host.Addr})
	}
	return ps
}

// announce programs c's addresses as peers on the given hosts.
func (c *container) announce(t *testing.T, hosts ...*testHost) {
	t.Helper()
	for _, h := range hosts {
		c.announceTo(t, h.m)
	}
}

// announceTo programs c's addresses as peers through m.
func (c *container) announceTo(t *testing.T, m *Manager) {
	t.Helper()
	for _, p := range c.peers() {
		if err := m.AddPeer(t.Context(), p); err != nil {
			t.Fatal(err)
		}
	}
}

// ping sends count pings from ns to dst with extra arguments.
func ping(t *testing.T, ns *testenv.NetNS, dst netip.Addr, count int, extra ...string) (string, error) {
	t.Helper()
	args := append([]string{"ping", "-n", "-q", "-c", fmt.Sprint(count), "-i", "0.2", "-W", "1"}, extra...)
	return ns.Run(t, append(args, dst.String())...)
}

func mustPing(t *testing.T, ns *testenv.NetNS, dst netip.Addr) {
	t.Helper()
	if out, err := ping(t, ns, dst, 2); err != nil {
		t.Fatalf("ping %s from %s: %v\n%s", dst, ns.Name, err, out)
	}
}

func mustNotPing(t *testing.T, ns *testenv.NetNS, dst netip.Addr) {
	t.Helper()
	if out, err := ping(t, ns, dst, 2); err == nil {
		t.Fatalf("ping %s from %s succeeded, want it blocked\n%s", dst, ns.Name, out)
	}
}

// linkNames lists the links of h's namespace other than lo and the
// underlay, and those of its data-plane namespace (prefixed "dp/").
func linkNames(t *testing.T, h *testHost) []string {
	t.Helper()
	var names []string
	for _, ns := range h.namespaces() {
		ls, err := ns.Handle().LinkList()
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range ls {
			if n := l.Attrs().Name; n != "lo" && n != h.Link {
				if ns != h.NS {
					n = "dp/" + n
				}
				names = append(names, n)
			}
		}
	}
	slices.Sort(names)
	return names
}

// namespaces are h's namespace and its data-plane namespace if it has one.
func (h *testHost) namespaces() []*testenv.NetNS {
	if h.dp == nil {
		return []*testenv.NetNS{h.NS}
	}
	return []*testenv.NetNS{h.NS, h.dp}
}

// link is the named link of h's namespace or, if it has none, of its
// data-plane namespace.
func link(t *testing.T, h *testHost, name string) netlink.Link {
	t.Helper()
	l, _ := linkIn(t, h, name)
	return l
}

// linkIn is link with the namespace that holds it.
func linkIn(t *testing.T, h *testHost, name string) (netlink.Link, *testenv.NetNS) {
	t.Helper()
	var err error
	for _, ns := range h.namespaces() {
		var l netlink.Link
		if l, err = ns.Handle().LinkByName(name); err == nil {
			return l, ns
		}
	}
	t.Fatalf("link %s: %v", name, err)
	return nil, nil
}

// kernelEntries is what a VXLAN device holds: neighbour entries "ip mac"
// and FDB entries "mac dst".
type kernelEntries struct {
	neigh []string
	fdb   []string
}

func entries(t *testing.T, h *testHost, vni uint32) kernelEntries {
	t.Helper()
	vx, ns := linkIn(t, h, VXLANName(vni))
	hh := ns.Handle()
	var k kernelEntries
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		ns, err := hh.NeighList(vx.Attrs().Index, fam)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range ns {
			if n.State == netlink.NUD_PERMANENT {
				k.neigh = append(k.neigh, n.IP.String()+" "+n.HardwareAddr.String())
			}
		}
	}
	fdb, err := hh.NeighList(vx.Attrs().Index, unix.AF_BRIDGE)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range fdb {
		if n.Flags&netlink.NTF_SELF != 0 {
			k.fdb = append(k.fdb, n.HardwareAddr.String()+" "+n.IP.String())
		}
	}
	slices.Sort(k.neigh)
	slices.Sort(k.fdb)
	return k
}

// fwRules lists the rules of our chain in h's namespace, for cmd
// (iptables or ip6tables); nil if the chain does not exist.
func fwRules(t *testing.T, h *testHost, cmd string) []string {
	t.Helper()
	out, err := h.NS.Run(t, cmd, "-w", "-S", FirewallChain)
	if err != nil {
		return nil
	}
	var rules []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "-A ") {
			rules = append(rules, l)
		}
	}
	return rules
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }
func addr(s string) netip.Addr  { return netip.MustParseAddr(s) }

// ownerState is everything of one owner in a host's namespace: its links
// with their identity and attributes, the entries of its VXLAN devices,
// and its firewall rules. Two snapshots are equal only if nothing of the
// owner was touched (a replaced link gets a new index).
type ownerState struct {
	Links   []string
	Entries map[string]kernelEntries
	Rules   []string
}

func snapshot(t *testing.T, h *testHost, owner string) ownerState {
	t.Helper()
	mark := OwnerMark(owner)
	var ls []netlink.Link
	for _, ns := range h.namespaces() {
		nls, err := ns.Handle().LinkList()
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, nls...)
	}
	s := ownerState{Entries: map[string]kernelEntries{}}
	for _, l := range ls {
		a := l.Attrs()
		if a.Alias != mark {
			continue
		}
		// Flags without "running": a bridge's carrier follows its ports
		// on its own time.
		flags := strings.ReplaceAll(strings.ReplaceAll(a.Flags.String(), "|running", ""), "running", "")
		s.Links = append(s.Links, fmt.Sprintf("%s idx=%d master=%d mtu=%d mac=%s flags=%s", a.Name, a.Index, a.MasterIndex, a.MTU, a.HardwareAddr, flags))
		if vni, ok := vniFromName(vxlanNameRE, a.Name); ok {
			s.Entries[a.Name] = entries(t, h, vni)
		}
	}
	slices.Sort(s.Links)
	for _, cmd := range []string{"iptables", "ip6tables"} {
		for _, r := range fwRules(t, h, cmd) {
			if strings.Contains(r, " --comment "+mark+" ") {
				s.Rules = append(s.Rules, cmd+" "+r)
			}
		}
	}
	return s
}
