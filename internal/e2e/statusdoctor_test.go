//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"consul-overlay/doctor"
	"consul-overlay/status"
	"consul-overlay/vxlan"
)

// pluginToolScript is the README's way (Troubleshooting) to run
// `consul-overlay status` or `doctor` through the managed plugin: the
// plugin's own binary, in its mount and network namespaces, with its
// settings (its environment), found by the plugin's ID through its shim.
// `ctr task exec` into the plugin is not used: dockerd takes the exec's exit
// for the plugin's and kills and restarts the plugin.
const pluginToolScript = `set -e
id=$(docker plugin inspect -f '{{.Id}}' "$PLUGIN")
pid=$(pgrep -o -P "$(pgrep -f -- "-id $id")")
exec env -i $(tr '\0' ' ' < /proc/$pid/environ) nsenter -t "$pid" -m -n /consul-overlay "$@"`

// pluginTool runs the plugin's binary on h with args as pluginToolScript
// does, and returns its standard output and exit code; err is a failure
// to run it at all (or to find the plugin).
func (s *suite) pluginTool(ctx context.Context, h *Host, args ...string) (string, int, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	out, err := run(ctx, append(h.dockerEnv(), "PLUGIN="+s.lab.Plugin), "bash", append([]string{"-c", pluginToolScript, "consul-overlay"}, args...)...)
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out, 0, nil
	case errors.As(err, &ee) && ee.ExitCode() > 0 && ee.ExitCode() < 126 && out != "":
		return out, ee.ExitCode(), nil
	default:
		return out, -1, fmt.Errorf("%s: consul-overlay %s through the plugin: %w", h, strings.Join(args, " "), err)
	}
}

// status runs `status --json` on h through the plugin.
func (s *suite) status(ctx context.Context, h *Host) (status.Report, int, error) {
	var r status.Report
	out, code, err := s.pluginTool(ctx, h, "status", "--json")
	if err != nil {
		return r, code, err
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return r, code, fmt.Errorf("%s: status --json (exit %d): %w\n%s", h, code, err, out)
	}
	return r, code, nil
}

// doctor runs `doctor --json` on h through the plugin.
func (s *suite) doctor(ctx context.Context, h *Host) (doctor.Report, int, error) {
	var r doctor.Report
	out, code, err := s.pluginTool(ctx, h, "doctor", "--json")
	if err != nil {
		return r, code, err
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return r, code, fmt.Errorf("%s: doctor --json (exit %d): %w\n%s", h, code, err, out)
	}
	return r, code, nil
}

func doctorText(r doctor.Report) string {
	var b strings.Builder
	_ = doctor.WriteText(&b, &r)
	return b.String()
}

func checksNamed(r doctor.Report, name string) []doctor.Check {
	var out []doctor.Check
	for _, c := range r.Checks {
		if c.Name == name {
			out = append(out, c)
		}
	}
	return out
}

// hostName is how doctor names a host: "node (vtep)".
func hostName(h *Host) string { return fmt.Sprintf("%s (%s)", h.Node, h.Addr) }

// doctorHealthy checks that doctor on h passes, with the store, Consul
// permission, VXLAN and MTU checks PASS and one VXLAN and one MTU check
// naming the other host on the application's network.
func (s *suite) doctorHealthy(ctx context.Context, h *Host) error {
	r, code, err := s.doctor(ctx, h)
	if err != nil {
		return err
	}
	var errs []error
	if code != 0 || r.Failed {
		errs = append(errs, fmt.Errorf("exit %d, failed %v", code, r.Failed))
	}
	other := hostName(s.lab.Other(h))
	for _, name := range []string{"store", "permissions", "vxlan", "mtu"} {
		cs := checksNamed(r, name)
		if len(cs) == 0 {
			errs = append(errs, fmt.Errorf("no %s check", name))
		}
		for _, c := range cs {
			if c.Result != doctor.Pass {
				errs = append(errs, fmt.Errorf("%s check %s: %s", name, c.Result, c.Message))
			}
		}
	}
	for _, name := range []string{"vxlan", "mtu"} {
		if cs := checksNamed(r, name); len(cs) != 1 || cs[0].Host != other || cs[0].Network != appNetworkName {
			errs = append(errs, fmt.Errorf("%s checks %+v, want one of host %s on network %s", name, cs, other, appNetworkName))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%s: doctor: %w\n%s", h, err, doctorText(r))
	}
	return nil
}

// appNetworkName is the application network's name in the store (the
// name its hosts created it with, the compose project's network).
const appNetworkName = "colab-e2e-app"

// statusDoctor: `consul-overlay status` and `doctor` on the two-host lab,
// run through the managed plugin as the README says:
//   - status --json on each host lists both hosts alive, the application's
//     network with both hosts and every endpoint the store has (by ID, host
//     and address), and no drift; doctor passes its store, permission,
//     VXLAN and MTU checks against the other host;
//   - a neighbour entry deleted by hand on host A is reported by status as
//     exactly that drift (device, kind, address), and the plugin's next
//     peer resync (PEER_RESYNC_INTERVAL, 10s in the lab) repairs it;
//   - with UDP 4789 dropped on host B, doctor on A fails the VXLAN check
//     naming B, exit 1; without the rule it passes again;
//   - with B's underlay MTU at 1400, doctor on A fails the MTU check naming
//     B and the largest size that passes; restored, it passes again.
//
// Every fault is undone by t.Cleanup, also when the scenario fails.
func (s *suite) statusDoctor(t *testing.T) {
	ctx := t.Context()
	l := s.lab
	start := time.Now()
	var notes []string
	note := func(format string, args ...any) {
		notes = append(notes, fmt.Sprintf(format, args...))
		s.notes["status-doctor"] = strings.Join(notes, "; ")
	}

	// --- healthy ---
	eps, err := l.Endpoints(ctx, appKey)
	if err != nil {
		t.Fatal(err)
	}
	reports := map[*Host]status.Report{}
	for _, h := range l.Hosts() {
		var rep status.Report
		err := eventually(t, 30*time.Second, func(ctx context.Context) error {
			var code int
			var err error
			if rep, code, err = s.status(ctx, h); err != nil {
				return err
			}
			if code != 0 || len(rep.Drift) > 0 || len(rep.Errors) > 0 {
				return fmt.Errorf("%s: status exit %d, drift %v, errors %v", h, code, rep.Drift, rep.Errors)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		reports[h] = rep
		if rep.Host.Node != h.Node || rep.Host.VTEP != h.Addr.String() || !rep.Store.Reachable {
			t.Errorf("%s: status says this host is %+v, store %+v", h, rep.Host, rep.Store)
		}
		alive := map[string]bool{}
		for _, x := range rep.Hosts {
			hx := l.HostOf(x.Node)
			alive[x.Node] = x.Alive && hx != nil && x.VTEP == hx.Addr.String()
		}
		for _, x := range l.Hosts() {
			if !alive[x.Node] {
				t.Errorf("%s: status does not list %s (%s, %s) as alive: %+v", h, x, x.Node, x.Addr, rep.Hosts)
			}
		}
		i := slices.IndexFunc(rep.Networks, func(n status.Network) bool { return n.Key == appKey })
		if i < 0 {
			t.Errorf("%s: status lists no network %s: %+v", h, appKey, rep.Networks)
			continue
		}
		n := rep.Networks[i]
		if n.Name != appNetworkName || n.VNI != s.vni || !n.Member || !slices.Equal(n.Hosts, []string{l.A.Node, l.B.Node}) {
			t.Errorf("%s: status shows %s as name %q vni %d member %v hosts %v, want %s, %d, a member, hosts %s and %s",
				h, appKey, n.Name, n.VNI, n.Member, n.Hosts, appNetworkName, s.vni, l.A.Node, l.B.Node)
		}
		// Every endpoint of the store, on its host, with its address.
		var want, got []string
		local := 0
		for _, e := range eps {
			want = append(want, fmt.Sprintf("%s@%s=%s local=%v", e.ID, e.Node, e.IPv4, e.Node == h.Node))
			if e.Node == h.Node {
				local++
			}
		}
		for _, e := range n.Endpoints {
			got = append(got, fmt.Sprintf("%s@%s=%s local=%v", e.ID, e.Node, e.IPv4, e.Local))
		}
		slices.Sort(want)
		slices.Sort(got)
		if !slices.Equal(got, want) || n.LocalEndpoints != local || n.RemoteEndpoints != len(eps)-local || len(eps) != 2*len(appContainers) {
			t.Errorf("%s: status endpoints (%d local, %d remote):\n  %s\nwant (the store's, %d on this host):\n  %s",
				h, n.LocalEndpoints, n.RemoteEndpoints, strings.Join(got, "\n  "), local, strings.Join(want, "\n  "))
		}
	}
	for _, h := range l.Hosts() {
		if err := s.doctorHealthy(ctx, h); err != nil {
			t.Error(err)
		}
	}
	if t.Failed() {
		return
	}
	note("healthy checked in %s", time.Since(start).Round(100*time.Millisecond))

	t.Run("drift", func(t *testing.T) { s.statusDrift(t, reports[l.A], note) })
	t.Run("udp 4789 blocked", func(t *testing.T) { s.doctorBlocked(t, note) })
	t.Run("underlay mtu lowered", func(t *testing.T) { s.doctorMTU(t, note) })
}

// statusDrift deletes one neighbour entry of a remote endpoint on host A
// and checks that status reports exactly it, then that the plugin puts it
// back.
func (s *suite) statusDrift(t *testing.T, rep status.Report, note func(string, ...any)) {
	ctx := t.Context()
	h := s.lab.A
	dev := vxlan.VXLANName(s.vni)
	var ip, mac string
	for _, n := range rep.Networks {
		for _, e := range n.Endpoints {
			if n.Key == appKey && !e.Local && e.IPv4 != "" && ip == "" {
				ip, _, _ = strings.Cut(e.IPv4, "/")
				mac = e.MAC
			}
		}
	}
	if ip == "" {
		t.Fatalf("%s: status lists no remote endpoint with an IPv4 address on %s", h, appKey)
	}
	// Whatever happens, the entry is back afterwards (the plugin's own
	// value: a permanent neighbour, as `status` wants it).
	t.Cleanup(func() {
		ctx := context.WithoutCancel(ctx)
		if out, _ := h.RunData(ctx, "ip", "neigh", "show", ip, "dev", dev); !strings.Contains(out, "PERMANENT") {
			if _, err := h.RunData(ctx, "ip", "neigh", "replace", ip, "lladdr", mac, "dev", dev, "nud", "permanent"); err != nil {
				t.Errorf("restore neighbour %s on %s: %v", ip, dev, err)
			}
		}
	})
	want := status.Drift{Network: appKey, VNI: s.vni, Device: dev, Kind: "neighbour", Entry: ip, Problem: "missing", Want: mac}

	// The plugin may repair the entry between the delete and the status
	// read (its resync can fall there): then delete it again.
	var deleted time.Time
	var drift []status.Drift
	for try := 1; ; try++ {
		if _, err := h.RunData(ctx, "ip", "neigh", "del", ip, "dev", dev); err != nil {
			t.Fatalf("%s: delete the neighbour entry by hand: %v", h, err)
		}
		deleted = time.Now()
		r, code, err := s.status(ctx, h)
		if err != nil {
			t.Fatal(err)
		}
		drift = r.Drift
		if len(drift) > 0 || try == 3 {
			t.Logf("%s: `ip neigh del %s dev %s`; status exit %d, drift %+v", h, ip, dev, code, drift)
			if code != 1 {
				t.Errorf("status exit %d with drift, want 1", code)
			}
			break
		}
		t.Logf("%s: no drift right after the delete (try %d): the plugin's resync came between; again", h, try)
	}
	if len(drift) != 1 || drift[0] != want {
		t.Fatalf("%s: status drift after `ip neigh del %s dev %s`:\n  %+v\nwant exactly:\n  %+v", h, ip, dev, drift, want)
	}

	// The plugin's resync (PEER_RESYNC_INTERVAL) puts it back.
	resync := s.pluginResync(ctx, h)
	err := eventually(t, resync+15*time.Second, func(ctx context.Context) error {
		r, code, err := s.status(ctx, h)
		if err != nil {
			return err
		}
		if code != 0 || len(r.Drift) > 0 {
			return fmt.Errorf("status exit %d, drift %+v", code, r.Drift)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%s: the drift is not repaired within the resync interval (%s) and 15s: %v", h, resync, err)
	}
	took := time.Since(deleted)
	if out, _ := h.RunData(ctx, "ip", "neigh", "show", ip, "dev", dev); !strings.Contains(out, mac) || !strings.Contains(out, "PERMANENT") {
		t.Errorf("%s: status shows no drift but the neighbour entry is %q", h, out)
	}
	t.Logf("%s: repaired %s after the delete (PEER_RESYNC_INTERVAL %s)", h, took.Round(100*time.Millisecond), resync)
	note("drift repaired after %s", took.Round(100*time.Millisecond))
}

// pluginResync is the plugin's PEER_RESYNC_INTERVAL on h (30s when unset).
func (s *suite) pluginResync(ctx context.Context, h *Host) time.Duration {
	out, err := h.Docker(ctx, "plugin", "inspect", "-f", `{{range .Settings.Env}}{{println .}}{{end}}`, s.lab.Plugin)
	if err == nil {
		for _, line := range strings.Split(out, "\n") {
			if v, ok := strings.CutPrefix(line, "PEER_RESYNC_INTERVAL="); ok {
				if d, err := time.ParseDuration(v); err == nil {
					return d
				}
			}
		}
	}
	return 30 * time.Second
}

// doctorBlocked drops UDP 4789 on host B: doctor on A fails the VXLAN
// check naming B.
func (s *suite) doctorBlocked(t *testing.T, note func(string, ...any)) {
	ctx := t.Context()
	l := s.lab
	b := l.B
	rule := []string{"INPUT", "-p", "udp", "--dport", "4789", "-j", "DROP"}
	if _, err := b.Run(ctx, "iptables", append([]string{"-w", "-I"}, rule...)...); err != nil {
		t.Fatalf("%s: block udp 4789: %v", b, err)
	}
	removed := false
	unblock := func() error {
		if removed {
			return nil
		}
		_, err := b.Run(context.WithoutCancel(ctx), "iptables", append([]string{"-w", "-D"}, rule...)...)
		removed = err == nil
		return err
	}
	t.Cleanup(func() {
		if err := unblock(); err != nil {
			t.Errorf("%s: unblock udp 4789: %v", b, err)
		}
	})
	start := time.Now()
	r, code, err := s.doctor(ctx, l.A)
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	t.Logf("%s with udp 4789 dropped on %s (%s):\n%s", l.A, b, took.Round(100*time.Millisecond), doctorText(r))
	if code != 1 || !r.Failed {
		t.Errorf("doctor exit %d, failed %v, want exit 1", code, r.Failed)
	}
	cs := checksNamed(r, "vxlan")
	if len(cs) != 1 || cs[0].Result != doctor.Fail || cs[0].Host != hostName(b) || !strings.Contains(cs[0].Message, hostName(b)) || cs[0].Network != appNetworkName {
		t.Errorf("vxlan checks %+v, want one FAIL naming %s on %s", cs, hostName(b), appNetworkName)
	} else if !strings.Contains(cs[0].Fix, "4789") {
		t.Errorf("vxlan check's fix %q does not say to allow UDP 4789", cs[0].Fix)
	}
	if err := unblock(); err != nil {
		t.Fatalf("%s: unblock udp 4789: %v", b, err)
	}
	if err := eventually(t, 15*time.Second, func(ctx context.Context) error { return s.doctorHealthy(ctx, l.A) }); err != nil {
		t.Errorf("after the rule is removed: %v", err)
	}
	note("doctor with 4789 dropped took %s", took.Round(100*time.Millisecond))
}

// doctorMTU lowers host B's underlay MTU to 1400: doctor on A fails the
// MTU check naming B and the largest size that passes.
func (s *suite) doctorMTU(t *testing.T, note func(string, ...any)) {
	ctx := t.Context()
	l := s.lab
	b := l.B
	const link = "ul0"
	// "3: ul0@if4: <...> mtu 1500 qdisc ..."
	out, err := b.Run(ctx, "ip", "-o", "link", "show", link)
	f := strings.Fields(out)
	i := slices.Index(f, "mtu")
	if err != nil || i < 0 || i+1 == len(f) {
		t.Fatalf("%s: underlay mtu of %s: %v (%q)", b, link, err, out)
	}
	orig := f[i+1]
	if _, err := b.Run(ctx, "ip", "link", "set", link, "mtu", "1400"); err != nil {
		t.Fatalf("%s: lower the underlay mtu: %v", b, err)
	}
	restored := false
	restore := func() error {
		if restored {
			return nil
		}
		_, err := b.Run(context.WithoutCancel(ctx), "ip", "link", "set", link, "mtu", orig)
		restored = err == nil
		return err
	}
	t.Cleanup(func() {
		if err := restore(); err != nil {
			t.Errorf("%s: restore the underlay mtu %s: %v", b, orig, err)
		}
	})
	start := time.Now()
	r, code, err := s.doctor(ctx, l.A)
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	t.Logf("%s with %s's %s at mtu 1400 (%s):\n%s", l.A, b, link, took.Round(100*time.Millisecond), doctorText(r))
	if code != 1 || !r.Failed {
		t.Errorf("doctor exit %d, failed %v, want exit 1", code, r.Failed)
	}
	if cs := checksNamed(r, "vxlan"); len(cs) != 1 || cs[0].Result != doctor.Pass {
		t.Errorf("vxlan checks %+v, want one PASS (small packets pass)", cs)
	}
	cs := checksNamed(r, "mtu")
	if len(cs) != 1 || cs[0].Result != doctor.Fail || cs[0].Host != hostName(b) || !strings.Contains(cs[0].Message, hostName(b)) {
		t.Fatalf("mtu checks %+v, want one FAIL naming %s", cs, hostName(b))
	}
	// 1400 on the receiving link less 50 bytes of VXLAN encapsulation; a
	// veth takes up to 4 bytes past its MTU (room for a VLAN tag).
	found := false
	for size := 1350; size <= 1354; size++ {
		if strings.Contains(cs[0].Message, fmt.Sprintf("passes is %d bytes", size)) && strings.Contains(cs[0].Fix, fmt.Sprintf("mtu=%d", size)) {
			found = true
		}
	}
	if !found {
		t.Errorf("mtu check %+v does not name a largest size of 1350 to 1354", cs[0])
	}
	if err := restore(); err != nil {
		t.Fatalf("%s: restore the underlay mtu %s: %v", b, orig, err)
	}
	if err := eventually(t, 15*time.Second, func(ctx context.Context) error { return s.doctorHealthy(ctx, l.A) }); err != nil {
		t.Errorf("after the mtu is restored: %v", err)
	}
	note("doctor with the mtu lowered took %s", took.Round(100*time.Millisecond))
}

// HostOf is the host whose plugin has the node name node (nil: none).
func (l *Lab) HostOf(node string) *Host {
	for _, h := range l.Hosts() {
		if h.Node == node {
			return h
		}
	}
	return nil
}
