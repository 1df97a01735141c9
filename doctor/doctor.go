package doctor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sort"
	"strings"
	"time"

	"consul-overlay/consulacl"
	"consul-overlay/status"
)

// Result is the outcome of one check.
type Result string

// The outcomes, worst last.
const (
	Pass Result = "PASS"
	Warn Result = "WARN"
	Fail Result = "FAIL"
)

// Check is one check's outcome. The JSON field names are stable.
type Check struct {
	// Name is the check: "store", "permissions", "vxlan", "mtu",
	// "firewall", "modules", "sysctl", "owners" or "clock".
	Name    string `json:"name"`
	Result  Result `json:"result"`
	Message string `json:"message"`
	// Fix says what to do ("" on PASS).
	Fix string `json:"fix,omitempty"`
	// Host and Network name what the check is about, where it is about
	// one ("" otherwise): a node name (with its VTEP) and a network name.
	Host    string `json:"host,omitempty"`
	Network string `json:"network,omitempty"`
}

// Report is every check's outcome, in the order run.
type Report struct {
	Checks []Check `json:"checks"`
	// Failed says some check is FAIL.
	Failed bool `json:"failed"`
}

func (r *Report) add(c Check) {
	r.Checks = append(r.Checks, c)
	if c.Result == Fail {
		r.Failed = true
	}
}

// Target is one probe: a remote endpoint of a network, reached from a
// local endpoint's addresses over this host's VXLAN device.
type Target struct {
	Network string // the network's name (or key)
	VNI     uint32
	Device  string // this host's VXLAN device
	Node    string // the remote host
	VTEP    string
	SrcIP   netip.Addr
	SrcMAC  net.HardwareAddr
	DstIP   netip.Addr
	DstMAC  net.HardwareAddr
	// MTU is the overlay MTU: this host's VXLAN device's, else the
	// network's setting (0: unknown).
	MTU int
}

// HostName is how checks name the remote host: "node (vtep)".
func (t Target) HostName() string { return fmt.Sprintf("%s (%s)", t.Node, t.VTEP) }

// ProbeFunc sends one ICMP echo of size bytes (the whole IPv4 packet) with
// DF set to t and reports whether a reply came back within timeout. An
// error means the probe could not be sent at all (not a lost reply).
type ProbeFunc func(ctx context.Context, t Target, size int, timeout time.Duration) (bool, error)

// Config says what to check with. A nil func skips its check (reported
// as WARN "not checked" only where it matters).
type Config struct {
	// Status reads the store and the kernel, as `consul-overlay status`.
	Status func(ctx context.Context) (*status.Report, error)
	// Permissions runs the Consul token's permission probes (package
	// consulacl), as the plugin does at start (nil: not checked, as for
	// the embedded store). It runs only when the store answered.
	Permissions func(ctx context.Context) []consulacl.Result
	// Probe sends one overlay probe (nil: SendProbe).
	Probe ProbeFunc
	// ProbeTimeout bounds the wait for each reply (0: 500ms); a probe
	// that gets none is tried ProbeTries times (0: 3) before it counts
	// as lost.
	ProbeTimeout time.Duration
	ProbeTries   int
	// System reads the host's settings for the firewall, modules and
	// sysctl checks (nil: those checks are skipped).
	System System
	// Foreign lists the links that carry another instance's mark, by
	// owner (nil: skipped).
	Foreign func() (map[string][]string, error)
	// ConsulTime is the time in a Consul response's Date header (nil or
	// no Consul: skipped). Now is the local clock (nil: time.Now).
	ConsulTime func(ctx context.Context) (time.Time, error)
	Now        func() time.Time
}

// Run runs every check and returns the report; it fails only when ctx
// ends.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if cfg.Probe == nil {
		cfg.Probe = SendProbe
	}
	if cfg.ProbeTimeout <= 0 {
		cfg.ProbeTimeout = 500 * time.Millisecond
	}
	if cfg.ProbeTries <= 0 {
		cfg.ProbeTries = 3
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	r := &Report{Checks: []Check{}}
	var st *status.Report
	if cfg.Status != nil {
		var err error
		if st, err = cfg.Status(ctx); err != nil {
			return r, err
		}
	}
	r.add(checkStore(st))
	if st != nil && st.Store.Reachable && cfg.Permissions != nil {
		for _, c := range checkPermissions(cfg.Permissions(ctx)) {
			r.add(c)
		}
	}
	if st != nil && st.Store.Reachable {
		targets, skipped := Targets(st)
		for _, c := range skipped {
			r.add(c)
		}
		reached := checkReach(ctx, cfg, targets, r)
		checkMTU(ctx, cfg, reached, r)
		if len(targets) == 0 && len(skipped) == 0 {
			r.add(Check{Name: "vxlan", Result: Pass, Message: "no remote member host to probe on this host's networks"})
		}
	}
	if cfg.System != nil {
		for _, c := range CheckSystem(ctx, cfg.System) {
			r.add(c)
		}
		if st != nil {
			for _, c := range CheckEgress(ctx, st, cfg.System) {
				r.add(c)
			}
		}
	}
	if cfg.Foreign != nil {
		r.add(checkForeign(cfg.Foreign))
	}
	if cfg.ConsulTime != nil {
		r.add(checkClock(ctx, cfg.ConsulTime, cfg.Now))
	}
	return r, ctx.Err()
}

func checkStore(st *status.Report) Check {
	c := Check{Name: "store"}
	switch {
	case st == nil:
		c.Result, c.Message = Fail, "the store was not read"
		c.Fix = "check CONSUL_HTTP_ADDR and KV_PREFIX (the plugin's settings)"
	case !st.Store.Reachable:
		c.Result = Fail
		c.Message = fmt.Sprintf("%s store %s (prefix %q) cannot be read: %s", st.Store.Kind, st.Store.Address, st.Store.Prefix, st.Store.Error)
		c.Fix = "check that Consul runs and answers at that address, and that the token (CONSUL_HTTP_TOKEN) has read and write on the prefix (key_prefix policy) and session write"
		if st.Store.Kind == "embedded" {
			c.Fix = "the embedded store can be read only while the plugin is stopped; use Consul for a cluster"
		}
	default:
		c.Result = Pass
		c.Message = fmt.Sprintf("%s store %s answers and prefix %q is readable (%d networks, %d hosts)", st.Store.Kind, st.Store.Address, st.Store.Prefix, len(st.Networks), len(st.Hosts))
		if len(st.Errors) > 0 {
			c.Result = Warn
			c.Message += "; but: " + strings.Join(st.Errors, "; ")
			c.Fix = "run `consul-overlay status` for details"
		}
	}
	return c
}

// checkPermissions turns the permission probes' results into checks: one
// FAIL per required permission the token lacks (WARN for an optional one),
// naming the rule to add; WARN for one that could not be probed; one PASS
// listing them all when the token has every one.
func checkPermissions(results []consulacl.Result) []Check {
	var out, warn []Check
	var granted []string
	for _, res := range results {
		c := Check{Name: "permissions"}
		var pe *consulacl.PermissionError
		switch {
		case res.Err == nil:
			granted = append(granted, res.Perm)
			continue
		case errors.As(res.Err, &pe):
			c.Result = Fail
			c.Message = pe.Error()
			c.Fix = fmt.Sprintf("add %s to the policy of the token in CONSUL_HTTP_TOKEN: the plugin needs it (docs/security.md has the whole least-privilege policy)", res.Rule)
			if res.Optional {
				c.Result = Warn
				c.Fix = fmt.Sprintf("add %s to the token's policy; without it the services of a host that is reaped stay in Consul's catalog", res.Rule)
			}
			if res.Perm == consulacl.PermAgentRead {
				c.Fix = fmt.Sprintf("add %s to the token's policy, or set NODE_NAME (the node name is then not read from the agent)", res.Rule)
			}
			out = append(out, c)
		default:
			c.Result = Warn
			c.Message = fmt.Sprintf("could not check %s (%s): %v", res.Perm, res.Rule, res.Err)
			c.Fix = "check that the local Consul agent answers (CONSUL_HTTP_ADDR), then run doctor again"
			warn = append(warn, c)
		}
	}
	out = append(out, warn...)
	if len(out) == 0 && len(granted) > 0 {
		out = append(out, Check{Name: "permissions", Result: Pass,
			Message: "the Consul token has every permission the plugin needs: " + strings.Join(granted, ", ")})
	}
	return out
}

// MaxAlternatives bounds how many of a remote host's endpoints are tried
// on one network before the host counts as unreachable.
const MaxAlternatives = 3

// Targets picks, for every network this host is a member of and every
// other member host, the probes to try: from this host's first endpoint
// with an IPv4 address to up to MaxAlternatives of that host's (joined
// ones, those in a container, first). Consecutive targets of one network
// and host are alternatives: the host answers if one of them does. What
// cannot be probed comes back as WARN checks.
func Targets(st *status.Report) ([]Target, []Check) {
	var out []Target
	var skipped []Check
	vteps := map[string]string{}
	for _, h := range st.Hosts {
		vteps[h.Node] = h.VTEP
	}
	for _, n := range st.Networks {
		if !n.Member {
			continue
		}
		name := n.Name
		if name == "" {
			name = n.Key
		}
		var src *status.Endpoint
		remote := map[string][]status.Endpoint{}
		for i, e := range n.Endpoints {
			if e.Local {
				if src == nil && e.IPv4 != "" {
					src = &n.Endpoints[i]
				}
				continue
			}
			remote[e.Node] = append(remote[e.Node], e)
		}
		var others []string
		for _, h := range n.Hosts {
			if h != st.Host.Node {
				others = append(others, h)
			}
		}
		sort.Strings(others)
		if len(others) == 0 {
			continue
		}
		if src == nil {
			skipped = append(skipped, Check{Name: "vxlan", Result: Warn, Network: name,
				Message: fmt.Sprintf("network %s: this host has no endpoint with an IPv4 address to probe from, so %s cannot be probed from here", name, strings.Join(others, ", ")),
				Fix:     "run doctor on a host with a container on the network, or start one here"})
			continue
		}
		mtu := n.KernelMTU
		if mtu == 0 {
			mtu = n.MTU
		}
		sip, smac, err := parseEndpoint(*src)
		if err != nil {
			skipped = append(skipped, Check{Name: "vxlan", Result: Warn, Network: name, Message: fmt.Sprintf("network %s: local endpoint %s: %v", name, src.ID, err)})
			continue
		}
		for _, h := range others {
			hn := fmt.Sprintf("%s (%s)", h, vteps[h])
			eps := remote[h]
			sort.SliceStable(eps, func(i, j int) bool { return eps[i].Joined && !eps[j].Joined })
			found := 0
			for _, e := range eps {
				dip, dmac, err := parseEndpoint(e)
				if err != nil || found == MaxAlternatives {
					continue
				}
				out = append(out, Target{Network: name, VNI: n.VNI, Device: fmt.Sprintf("vx-%06x", n.VNI), Node: h, VTEP: vteps[h],
					SrcIP: sip, SrcMAC: smac, DstIP: dip, DstMAC: dmac, MTU: mtu})
				found++
			}
			if found == 0 {
				skipped = append(skipped, Check{Name: "vxlan", Result: Warn, Host: hn, Network: name,
					Message: fmt.Sprintf("host %s has no endpoint with an IPv4 address on network %s: it cannot be probed", hn, name),
					Fix:     "run a container on the network on that host, then run doctor again"})
			}
		}
	}
	return out, skipped
}

func parseEndpoint(e status.Endpoint) (netip.Addr, net.HardwareAddr, error) {
	s := e.IPv4
	if p, err := netip.ParsePrefix(s); err == nil {
		s = p.Addr().String()
	}
	ip, err := netip.ParseAddr(s)
	if err != nil || !ip.Is4() {
		return netip.Addr{}, nil, fmt.Errorf("endpoint %s: no IPv4 address (%q)", e.ID, e.IPv4)
	}
	mac, err := net.ParseMAC(e.MAC)
	if err != nil || len(mac) != 6 {
		return netip.Addr{}, nil, fmt.Errorf("endpoint %s: bad MAC %q", e.ID, e.MAC)
	}
	return ip, mac, nil
}

// smallProbe is the size of the reachability probe: an ordinary ping.
const smallProbe = 84

// probe tries a probe cfg.ProbeTries times.
func probe(ctx context.Context, cfg Config, t Target, size int) (bool, error) {
	for i := 0; i < cfg.ProbeTries && ctx.Err() == nil; i++ {
		ok, err := cfg.Probe(ctx, t, size, cfg.ProbeTimeout)
		if err != nil || ok {
			return ok, err
		}
	}
	return false, ctx.Err()
}

// checkReach probes every network's hosts with a small packet, trying a
// host's alternatives in turn, and returns for each host that answered
// the target that did.
func checkReach(ctx context.Context, cfg Config, targets []Target, r *Report) []Target {
	var reached []Target
	for i := 0; i < len(targets); {
		j := i + 1
		for j < len(targets) && targets[j].Network == targets[i].Network && targets[j].Node == targets[i].Node {
			j++
		}
		alts := targets[i:j]
		i = j
		t := alts[0]
		c := Check{Name: "vxlan", Host: t.HostName(), Network: t.Network}
		var errs []string
		var tried []string
		answered := -1
		for k, a := range alts {
			ok, err := probe(ctx, cfg, a, smallProbe)
			if err != nil {
				errs = append(errs, err.Error())
				continue
			}
			tried = append(tried, a.DstIP.String())
			if ok {
				answered = k
				break
			}
		}
		switch {
		case answered >= 0:
			a := alts[answered]
			c.Result = Pass
			c.Message = fmt.Sprintf("host %s answers across the overlay on network %s (%s from %s)", a.HostName(), a.Network, a.DstIP, a.SrcIP)
			reached = append(reached, a)
		case len(tried) == 0:
			c.Result = Warn
			c.Message = fmt.Sprintf("could not probe host %s on network %s: %s", t.HostName(), t.Network, strings.Join(errs, "; "))
			c.Fix = "run doctor as root in the host's network namespace"
		default:
			c.Result = Fail
			c.Message = fmt.Sprintf("host %s is unreachable across the overlay on network %s (vni %d): no reply from %s to an ICMP echo from %s through %s",
				t.HostName(), t.Network, t.VNI, strings.Join(tried, ", "), t.SrcIP, t.Device)
			c.Fix = fmt.Sprintf("allow UDP 4789 between this host and %s in both directions (host firewalls, security groups), check that its plugin runs (`consul-overlay status` there) and that its containers answer ping", t.VTEP)
		}
		r.add(c)
	}
	return reached
}

// checkMTU probes every reached target at its overlay MTU with DF and,
// where that is lost, finds the largest size that passes.
func checkMTU(ctx context.Context, cfg Config, reached []Target, r *Report) {
	for _, t := range reached {
		mtu := t.MTU
		c := Check{Name: "mtu", Host: t.HostName(), Network: t.Network}
		if mtu <= smallProbe {
			c.Result, c.Message = Warn, fmt.Sprintf("network %s: overlay MTU unknown, path MTU to %s not checked", t.Network, t.HostName())
			r.add(c)
			continue
		}
		ok, err := probe(ctx, cfg, t, mtu)
		if err != nil {
			c.Result, c.Message = Warn, fmt.Sprintf("could not probe host %s at %d bytes: %v", t.HostName(), mtu, err)
			r.add(c)
			continue
		}
		if ok {
			c.Result = Pass
			c.Message = fmt.Sprintf("host %s carries %d-byte packets with DF across the overlay on network %s (the overlay MTU)", t.HostName(), mtu, t.Network)
			r.add(c)
			continue
		}
		best, err := bisect(ctx, smallProbe, mtu, func(size int) (bool, error) { return probe(ctx, cfg, t, size) })
		if err != nil {
			c.Result, c.Message = Warn, fmt.Sprintf("host %s: %d-byte packets with DF are lost; finding the largest that passes failed: %v", t.HostName(), mtu, err)
			r.add(c)
			continue
		}
		c.Result = Fail
		c.Message = fmt.Sprintf("path MTU to host %s on network %s is too small for the overlay MTU %d: the largest packet with DF that passes is %d bytes",
			t.HostName(), t.Network, mtu, best)
		c.Fix = fmt.Sprintf("recreate the network with -o mtu=%d (or lower), or raise the underlay MTU between this host and %s to at least %d (overlay MTU + 50)", best, t.VTEP, mtu+50)
		r.add(c)
	}
}

// bisect finds the largest size in [lo, hi) for which pass is true, given
// that pass(lo) holds and pass(hi) does not.
func bisect(ctx context.Context, lo, hi int, pass func(int) (bool, error)) (int, error) {
	for hi-lo > 1 {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		mid := lo + (hi-lo)/2
		ok, err := pass(mid)
		if err != nil {
			return 0, err
		}
		if ok {
			lo = mid
		} else {
			hi = mid
		}
	}
	return lo, nil
}

func checkForeign(f func() (map[string][]string, error)) Check {
	c := Check{Name: "owners"}
	owners, err := f()
	if err != nil {
		c.Result, c.Message = Warn, fmt.Sprintf("could not list links: %v", err)
		return c
	}
	if len(owners) == 0 {
		c.Result, c.Message = Pass, "no link of another consul-overlay instance"
		return c
	}
	var parts []string
	for _, o := range sortedKeys(owners) {
		name := o
		if name == "" {
			name = "(default)"
		}
		parts = append(parts, fmt.Sprintf("owner %s: %s", name, strings.Join(owners[o], ", ")))
	}
	c.Result = Warn
	c.Message = "links of another consul-overlay instance (another KV_PREFIX or store): " + strings.Join(parts, "; ")
	c.Fix = "if a second instance runs on this host, make sure the networks do not share VNIs; if the plugin was restarted with other settings, restore them or remove the old networks"
	return c
}

// Clock skew limits.
const (
	SkewWarn = time.Second
	SkewFail = 30 * time.Second
)

func checkClock(ctx context.Context, consulTime func(context.Context) (time.Time, error), now func() time.Time) Check {
	c := Check{Name: "clock"}
	before := now()
	ct, err := consulTime(ctx)
	after := now()
	if err != nil {
		c.Result, c.Message = Warn, fmt.Sprintf("could not read Consul's time: %v", err)
		return c
	}
	// The Date header has a resolution of one second: compare with the
	// middle of the request and allow for the truncation.
	local := before.Add(after.Sub(before) / 2)
	skew := local.Sub(ct.Add(500 * time.Millisecond))
	abs := skew.Abs()
	c.Message = fmt.Sprintf("clock differs from Consul's by %s", skew.Round(10*time.Millisecond))
	switch {
	case abs > SkewFail:
		c.Result = Fail
	case abs > SkewWarn+500*time.Millisecond:
		c.Result = Warn
	default:
		c.Result = Pass
		return c
	}
	c.Fix = "synchronise the clocks (NTP: chrony or systemd-timesyncd) on this host and the Consul servers; sessions and TTLs depend on them"
	return c
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// WriteJSON writes the report as JSON.
func WriteJSON(w io.Writer, r *Report) error {
	e := json.NewEncoder(w)
	e.SetIndent("", "  ")
	return e.Encode(r)
}

// WriteText writes one line per check, "PASS name: message", and an
// indented "-> fix" line where there is something to do.
func WriteText(w io.Writer, r *Report) error {
	var b strings.Builder
	for _, c := range r.Checks {
		fmt.Fprintf(&b, "%-4s %-11s %s\n", c.Result, c.Name, c.Message)
		if c.Fix != "" {
			fmt.Fprintf(&b, "                 -> %s\n", c.Fix)
		}
	}
	n := map[Result]int{}
	for _, c := range r.Checks {
		n[c.Result]++
	}
	fmt.Fprintf(&b, "\ndoctor: %d PASS, %d WARN, %d FAIL\n", n[Pass], n[Warn], n[Fail])
	_, err := io.WriteString(w, b.String())
	return err
}
