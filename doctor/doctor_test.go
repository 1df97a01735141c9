package doctor

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"consul-overlay/consulacl"
	"consul-overlay/status"
)

// twoHosts is host0's status of a network doc with one endpoint on each
// of host0 and host1, and a network solo only host0 is in.
func twoHosts() *status.Report {
	return &status.Report{
		Host:  status.HostInfo{ID: "id0", Node: "host0", VTEP: "192.0.2.1"},
		Store: status.StoreInfo{Kind: "consul", Address: "127.0.0.1:8500", Prefix: "p/", Reachable: true},
		Hosts: []status.Host{{ID: "id0", Node: "host0", VTEP: "192.0.2.1", Self: true}, {ID: "id1", Node: "host1", VTEP: "192.0.2.2"}},
		Networks: []status.Network{
			{Key: "name-doc", Name: "doc", VNI: 4096, MTU: 0, KernelMTU: 1450, Member: true, Hosts: []string{"host0", "host1"},
				Endpoints: []status.Endpoint{
					{ID: "e0", Node: "host0", IPv4: "10.31.0.2/24", MAC: "02:00:00:00:00:02", Local: true},
					{ID: "e1", Node: "host1", IPv4: "10.31.0.3/24", MAC: "02:00:00:00:00:03"},
				}},
			{Key: "name-solo", Name: "solo", VNI: 4097, Member: true, Hosts: []string{"host0"}},
			{Key: "name-other", Name: "other", VNI: 4098, Hosts: []string{"host1", "host2"}},
		},
	}
}

// pathMTU is a fake overlay: hosts answer probes up to their size limit
// (0: no answer at all).
type pathMTU map[string]int

func (p pathMTU) probe(_ context.Context, t Target, size int, _ time.Duration) (bool, error) {
	return size <= p[t.Node], nil
}

func run(t *testing.T, cfg Config) *Report {
	t.Helper()
	r, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func only(t *testing.T, r *Report, name string) Check {
	t.Helper()
	var out []Check
	for _, c := range r.Checks {
		if c.Name == name {
			out = append(out, c)
		}
	}
	if len(out) != 1 {
		t.Fatalf("%d %s checks, want 1: %+v", len(out), name, out)
	}
	return out[0]
}

func statusOf(st *status.Report) func(context.Context) (*status.Report, error) {
	return func(context.Context) (*status.Report, error) { return st, nil }
}

func TestTargets(t *testing.T) {
	targets, skipped := Targets(twoHosts())
	if len(skipped) != 0 {
		t.Errorf("skipped %+v", skipped)
	}
	if len(targets) != 1 {
		t.Fatalf("targets %+v, want 1", targets)
	}
	g := targets[0]
	if g.Network != "doc" || g.Device != "vx-001000" || g.Node != "host1" || g.VTEP != "192.0.2.2" || g.MTU != 1450 ||
		g.SrcIP != netip.MustParseAddr("10.31.0.2") || g.DstIP != netip.MustParseAddr("10.31.0.3") ||
		g.SrcMAC.String() != "02:00:00:00:00:02" || g.DstMAC.String() != "02:00:00:00:00:03" || g.HostName() != "host1 (192.0.2.2)" {
		t.Errorf("target %+v", g)
	}
}

func TestTargetsCannotProbe(t *testing.T) {
	st := twoHosts()
	st.Networks[0].Endpoints = st.Networks[0].Endpoints[:1] // host1 has none
	targets, skipped := Targets(st)
	if len(targets) != 0 || len(skipped) != 1 || skipped[0].Result != Warn || skipped[0].Host != "host1 (192.0.2.2)" || !strings.Contains(skipped[0].Message, "cannot be probed") {
		t.Errorf("no remote endpoint: targets %+v, skipped %+v", targets, skipped)
	}
	st = twoHosts()
	st.Networks[0].Endpoints = st.Networks[0].Endpoints[1:] // this host has none
	targets, skipped = Targets(st)
	if len(targets) != 0 || len(skipped) != 1 || skipped[0].Result != Warn || !strings.Contains(skipped[0].Message, "no endpoint") {
		t.Errorf("no local endpoint: targets %+v, skipped %+v", targets, skipped)
	}
}

func TestRunHealthy(t *testing.T) {
	r := run(t, Config{Status: statusOf(twoHosts()), Probe: pathMTU{"host1": 1450}.probe})
	if r.Failed {
		t.Errorf("failed: %+v", r.Checks)
	}
	for _, name := range []string{"store", "vxlan", "mtu"} {
		if c := only(t, r, name); c.Result != Pass {
			t.Errorf("%s: %+v", name, c)
		}
	}
}

func TestRunUnreachable(t *testing.T) {
	calls := 0
	probe := func(ctx context.Context, tg Target, size int, d time.Duration) (bool, error) {
		calls++
		return false, nil
	}
	r := run(t, Config{Status: statusOf(twoHosts()), Probe: probe, ProbeTries: 2})
	c := only(t, r, "vxlan")
	if !r.Failed || c.Result != Fail || c.Host != "host1 (192.0.2.2)" || c.Network != "doc" || !strings.Contains(c.Message, "host1 (192.0.2.2)") || !strings.Contains(c.Fix, "UDP 4789") {
		t.Errorf("report %+v", r.Checks)
	}
	if calls != 2 {
		t.Errorf("%d probes, want 2 (the tries)", calls)
	}
	for _, ch := range r.Checks {
		if ch.Name == "mtu" {
			t.Errorf("mtu checked on an unreachable host: %+v", ch)
		}
	}
}

func TestRunPathMTU(t *testing.T) {
	for _, limit := range []int{1354, 1351, 85, 1449} {
		r := run(t, Config{Status: statusOf(twoHosts()), Probe: pathMTU{"host1": limit}.probe})
		c := only(t, r, "mtu")
		if !r.Failed || c.Result != Fail || c.Host != "host1 (192.0.2.2)" ||
			!strings.Contains(c.Message, fmt.Sprintf("passes is %d bytes", limit)) || !strings.Contains(c.Fix, fmt.Sprintf("mtu=%d", limit)) {
			t.Errorf("limit %d: %+v", limit, c)
		}
		if v := only(t, r, "vxlan"); v.Result != Pass {
			t.Errorf("limit %d: vxlan %+v", limit, v)
		}
	}
}

func TestRunProbeError(t *testing.T) {
	probe := func(context.Context, Target, int, time.Duration) (bool, error) {
		return false, errors.New("operation not permitted")
	}
	r := run(t, Config{Status: statusOf(twoHosts()), Probe: probe})
	if c := only(t, r, "vxlan"); r.Failed || c.Result != Warn || !strings.Contains(c.Message, "not permitted") {
		t.Errorf("report %+v", r.Checks)
	}
}

func TestRunStoreUnreachable(t *testing.T) {
	st := twoHosts()
	st.Store.Reachable, st.Store.Error = false, "Permission denied"
	probed := false
	r := run(t, Config{Status: statusOf(st), Probe: func(context.Context, Target, int, time.Duration) (bool, error) { probed = true; return true, nil }})
	c := only(t, r, "store")
	if !r.Failed || c.Result != Fail || !strings.Contains(c.Message, "Permission denied") || !strings.Contains(c.Fix, "token") {
		t.Errorf("store check %+v", c)
	}
	if probed {
		t.Error("probed without a store")
	}
}

func TestBisect(t *testing.T) {
	for _, limit := range []int{84, 85, 500, 1353, 1449} {
		n := 0
		got, err := bisect(context.Background(), 84, 1450, func(s int) (bool, error) { n++; return s <= limit, nil })
		if err != nil || got != limit || n > 11 {
			t.Errorf("limit %d: got %d, %v after %d probes", limit, got, err, n)
		}
	}
}

func TestClock(t *testing.T) {
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		skew time.Duration
		want Result
	}{{0, Pass}, {900 * time.Millisecond, Pass}, {-3 * time.Second, Warn}, {5 * time.Second, Warn}, {31 * time.Second, Fail}, {-time.Minute, Fail}} {
		// Consul's Date header truncates to the second.
		consul := func(context.Context) (time.Time, error) { return base.Add(-tc.skew).Truncate(time.Second), nil }
		c := checkClock(context.Background(), consul, func() time.Time { return base.Add(300 * time.Millisecond) })
		if c.Result != tc.want {
			t.Errorf("skew %s: %s (%s), want %s", tc.skew, c.Result, c.Message, tc.want)
		}
	}
	c := checkClock(context.Background(), func(context.Context) (time.Time, error) { return time.Time{}, errors.New("refused") }, time.Now)
	if c.Result != Warn {
		t.Errorf("unreadable: %+v", c)
	}
}

func TestForeign(t *testing.T) {
	if c := checkForeign(func() (map[string][]string, error) { return nil, nil }); c.Result != Pass {
		t.Errorf("none: %+v", c)
	}
	c := checkForeign(func() (map[string][]string, error) { return map[string][]string{"": {"vx-000001", "vxbr-000001"}}, nil })
	if c.Result != Warn || !strings.Contains(c.Message, "(default): vx-000001, vxbr-000001") {
		t.Errorf("foreign: %+v", c)
	}
}

// fakeSystem is a System with fixed answers.
type fakeSystem struct {
	modules  map[string]ModuleState
	sysctls  map[string]string
	commands map[string]string // "name args" -> output; missing: not found
}

func (f fakeSystem) Module(name string) ModuleState { return f.modules[name] }

func (f fakeSystem) Sysctl(name string) (string, error) {
	v, ok := f.sysctls[name]
	if !ok {
		return "", os.ErrNotExist
	}
	return v, nil
}

func (f fakeSystem) Command(_ context.Context, name string, args ...string) (string, error) {
	out, ok := f.commands[strings.Join(append([]string{name}, args...), " ")]
	if !ok {
		return "", exec.ErrNotFound
	}
	return out, nil
}

func healthySystem() fakeSystem {
	return fakeSystem{
		modules: map[string]ModuleState{"vxlan": ModuleLoaded, "bridge": ModuleLoaded, "veth": ModuleLoadable},
		sysctls: map[string]string{"net.ipv4.ip_forward": "1", "net.bridge.bridge-nf-call-iptables": "1"},
		commands: map[string]string{
			"iptables -V":            "iptables v1.8.9 (nf_tables)\n",
			"iptables -w -S":         "-P FORWARD DROP\n-N DOCKER\n-A FORWARD -j DOCKER-USER\n-A FORWARD -j CONSUL-OVERLAY\n",
			"iptables -w -S FORWARD": "-P FORWARD DROP\n-A FORWARD -j DOCKER-USER\n-A FORWARD -j CONSUL-OVERLAY\n",
			"iptables-legacy -w -S":  "-P INPUT ACCEPT\n",
		},
	}
}

func bySystem(t *testing.T, s System) map[string][]Check {
	t.Helper()
	out := map[string][]Check{}
	for _, c := range CheckSystem(context.Background(), s) {
		out[c.Name] = append(out[c.Name], c)
	}
	return out
}

func TestSystemHealthy(t *testing.T) {
	for name, cs := range bySystem(t, healthySystem()) {
		for _, c := range cs {
			if c.Result != Pass {
				t.Errorf("%s: %+v", name, c)
			}
		}
	}
}

func TestSystemFirewallBackendMismatch(t *testing.T) {
	s := healthySystem()
	s.commands["iptables -w -S"] = "-P FORWARD ACCEPT\n"
	s.commands["iptables-legacy -w -S"] = "-P FORWARD DROP\n-N DOCKER\n-A FORWARD -j DOCKER-USER\n"
	c := bySystem(t, s)["firewall"][0]
	if c.Result != Fail || !strings.Contains(c.Message, "nf_tables") || !strings.Contains(c.Message, "legacy") || !strings.Contains(c.Fix, "iptables-legacy") {
		t.Errorf("mismatch: %+v", c)
	}
	delete(s.commands, "iptables -V")
	if c := bySystem(t, s)["firewall"][0]; c.Result != Warn {
		t.Errorf("no iptables: %+v", c)
	}
}

func TestSystemModules(t *testing.T) {
	s := healthySystem()
	s.modules["vxlan"] = ModuleMissing
	if c := bySystem(t, s)["modules"][0]; c.Result != Fail || !strings.Contains(c.Message, "vxlan") {
		t.Errorf("missing: %+v", c)
	}
	s.modules["vxlan"] = ModuleUnknown
	if c := bySystem(t, s)["modules"][0]; c.Result != Warn {
		t.Errorf("unknown: %+v", c)
	}
}

func TestSystemForwardPolicy(t *testing.T) {
	s := healthySystem()
	s.commands["iptables -w -S FORWARD"] = "-P FORWARD DROP\n-A FORWARD -j DOCKER-USER\n"
	s.sysctls["net.ipv4.ip_forward"] = "0"
	got := bySystem(t, s)["sysctl"]
	if len(got) != 2 || got[0].Result != Warn || got[1].Result != Warn || !strings.Contains(got[1].Message, "CONSUL-OVERLAY") {
		t.Errorf("DROP without our jump, no forwarding: %+v", got)
	}
	delete(s.sysctls, "net.bridge.bridge-nf-call-iptables")
	if got := bySystem(t, s)["sysctl"]; got[1].Result != Pass {
		t.Errorf("no br_netfilter: %+v", got[1])
	}
}

func TestWriteText(t *testing.T) {
	r := &Report{}
	r.add(Check{Name: "store", Result: Pass, Message: "ok"})
	r.add(Check{Name: "vxlan", Result: Fail, Message: "host1 unreachable", Fix: "allow UDP 4789"})
	var b strings.Builder
	if err := WriteText(&b, r); err != nil {
		t.Fatal(err)
	}
	want := "PASS store       ok\nFAIL vxlan       host1 unreachable\n                 -> allow UDP 4789\n\ndoctor: 1 PASS, 0 WARN, 1 FAIL\n"
	if b.String() != want || !r.Failed {
		t.Errorf("text:\n%s\nwant:\n%s", b.String(), want)
	}
}

func TestEchoFrame(t *testing.T) {
	targets, _ := Targets(twoHosts())
	tg := targets[0]
	f := echoFrame(tg, 1450, 7, 9)
	if len(f) != 14+1450 || f[14+6]&0x40 == 0 {
		t.Fatalf("frame of %d bytes, flags %x", len(f), f[14+6])
	}
	if checksum(f[14:34]) != 0 || checksum(f[34:]) != 0 {
		t.Error("bad checksums")
	}
	// The reply: addresses swapped, type 0.
	reply := append([]byte(nil), f...)
	copy(reply[14+12:14+16], f[14+16:14+20])
	copy(reply[14+16:14+20], f[14+12:14+16])
	reply[34] = 0
	if !isEchoReply(reply, tg, 7, 9) || isEchoReply(reply, tg, 7, 10) || isEchoReply(f, tg, 7, 9) {
		t.Error("reply matching is wrong")
	}
}

func TestRunAlternatives(t *testing.T) {
	st := twoHosts()
	n := &st.Networks[0]
	n.Endpoints = append(n.Endpoints,
		status.Endpoint{ID: "e2", Node: "host1", IPv4: "10.31.0.4/24", MAC: "02:00:00:00:00:04", Joined: true},
		status.Endpoint{ID: "e3", Node: "host1", IPv6: "fd00::5", MAC: "02:00:00:00:00:05", Joined: true})
	targets, _ := Targets(st)
	if len(targets) != 2 || targets[0].DstIP.String() != "10.31.0.4" || targets[1].DstIP.String() != "10.31.0.3" {
		t.Fatalf("targets %+v, want the joined endpoint first and no IPv6-only one", targets)
	}
	// Only the unjoined endpoint answers: the host is reachable through it.
	answers := func(ip string) ProbeFunc {
		return func(_ context.Context, tg Target, size int, _ time.Duration) (bool, error) {
			return tg.DstIP.String() == ip, nil
		}
	}
	r := run(t, Config{Status: statusOf(st), Probe: answers("10.31.0.3"), ProbeTries: 1})
	if c := only(t, r, "vxlan"); c.Result != Pass || !strings.Contains(c.Message, "10.31.0.3") {
		t.Errorf("one of two answers: %+v", c)
	}
	if c := only(t, r, "mtu"); c.Result != Pass {
		t.Errorf("mtu: %+v", c)
	}
	r = run(t, Config{Status: statusOf(st), Probe: answers("none"), ProbeTries: 1})
	if c := only(t, r, "vxlan"); c.Result != Fail || !strings.Contains(c.Message, "10.31.0.4, 10.31.0.3") {
		t.Errorf("none answers: %+v", c)
	}
}

// TestRunPermissions: the permission probes' results become checks: one
// PASS when every permission is granted; a FAIL per missing required rule
// (WARN for optional node read) naming the rule in message and fix; WARN
// for a probe that got no answer; not run when the store did not answer.
func TestRunPermissions(t *testing.T) {
	granted := func(p string) consulacl.Result { return consulacl.Result{Perm: p, Rule: "rule of " + p} }
	refused := func(p, rule string, optional bool) consulacl.Result {
		return consulacl.Result{Perm: p, Rule: rule, Optional: optional,
			Err: &consulacl.PermissionError{Op: "do " + p, Rule: rule, Err: errors.New("403 (Permission denied)")}}
	}
	perms := func(rs ...consulacl.Result) func(context.Context) []consulacl.Result {
		return func(context.Context) []consulacl.Result { return rs }
	}
	hosts := pathMTU{"host1": 1450}.probe

	r := run(t, Config{Status: statusOf(twoHosts()), Probe: hosts, Permissions: perms(
		granted(consulacl.PermKeyWrite), granted(consulacl.PermSessionWrite), granted(consulacl.PermServiceWrite), granted(consulacl.PermNodeRead))})
	if c := only(t, r, "permissions"); r.Failed || c.Result != Pass || !strings.Contains(c.Message, "session write") {
		t.Errorf("all granted: %+v", r.Checks)
	}

	r = run(t, Config{Status: statusOf(twoHosts()), Probe: hosts, Permissions: perms(
		granted(consulacl.PermKeyWrite),
		refused(consulacl.PermSessionWrite, consulacl.RuleSessionWrite, false),
		granted(consulacl.PermServiceWrite),
		refused(consulacl.PermNodeRead, consulacl.RuleNodeRead, true))})
	var got []string
	for _, c := range r.Checks {
		if c.Name == "permissions" {
			got = append(got, string(c.Result))
			rule := consulacl.RuleSessionWrite
			if c.Result == Warn {
				rule = consulacl.RuleNodeRead
			}
			if !strings.Contains(c.Message, rule) || !strings.Contains(c.Fix, rule) {
				t.Errorf("check %+v does not name %s in message and fix", c, rule)
			}
		}
	}
	if !r.Failed || strings.Join(got, ",") != "FAIL,WARN" {
		t.Errorf("one required and one optional refused: failed %v, permission checks %v, want FAIL,WARN", r.Failed, got)
	}

	r = run(t, Config{Status: statusOf(twoHosts()), Probe: hosts, Permissions: perms(
		consulacl.Result{Perm: consulacl.PermKeyWrite, Rule: "r", Err: errors.New("connection refused")})})
	if c := only(t, r, "permissions"); r.Failed || c.Result != Warn || !strings.Contains(c.Message, "connection refused") {
		t.Errorf("no answer: %+v", r.Checks)
	}

	st := twoHosts()
	st.Store.Reachable = false
	called := false
	r = run(t, Config{Status: statusOf(st), Permissions: func(context.Context) []consulacl.Result { called = true; return nil }})
	if called {
		t.Errorf("permissions probed with the store unreachable: %+v", r.Checks)
	}
}

// A network with egress=host (or auto): PASS with forwarding on and its
// subnet masqueraded; FAIL, with the fix, without either; nothing for a
// network without it or of which this host is no member.
func TestEgress(t *testing.T) {
	st := twoHosts()
	st.Networks[0].Subnets = []string{"10.31.0.0/24", "fd31::/64"}
	st.Networks[0].Egress = "host"
	st.Networks[2].Egress = "host" // not a member
	s := healthySystem()
	s.commands["iptables -w -t nat -S POSTROUTING"] = "-P POSTROUTING ACCEPT\n-A POSTROUTING -s 10.31.0.0/24 ! -o vxbr-001000 -m comment --comment consul-overlay -j MASQUERADE\n"
	got := CheckEgress(context.Background(), st, s)
	if len(got) != 1 || got[0].Result != Pass || got[0].Network != "doc" {
		t.Fatalf("healthy: %+v", got)
	}
	s.sysctls["net.ipv4.ip_forward"] = "0"
	if c := CheckEgress(context.Background(), st, s)[0]; c.Result != Fail || !strings.Contains(c.Message, "ip_forward") || c.Fix == "" {
		t.Errorf("forwarding off: %+v", c)
	}
	s.sysctls["net.ipv4.ip_forward"] = "1"
	s.commands["iptables -w -t nat -S POSTROUTING"] = "-P POSTROUTING ACCEPT\n"
	if c := CheckEgress(context.Background(), st, s)[0]; c.Result != Fail || !strings.Contains(c.Message, "10.31.0.0/24") || !strings.Contains(c.Fix, "restart the plugin") {
		t.Errorf("no masquerade: %+v", c)
	}
	st.Networks[0].Egress = "auto" // given, or the default (status reads both)
	if c := CheckEgress(context.Background(), st, s); len(c) != 1 || c[0].Result != Fail || !strings.Contains(c[0].Message, "egress=auto") {
		t.Errorf("egress=auto without its masquerade: %+v", c)
	}
	st.Networks[0].Egress = ""
	if got := CheckEgress(context.Background(), st, s); len(got) != 0 {
		t.Errorf("no egress network: %+v", got)
	}
}
