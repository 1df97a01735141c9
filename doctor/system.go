package doctor

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"consul-overlay/status"
	"consul-overlay/vxlan"
)

// System is what the firewall, module and sysctl checks read of the host.
type System interface {
	// Module says whether a kernel module is loaded (or built in),
	// loadable, missing, or unknown (nothing to tell by).
	Module(name string) ModuleState
	// Sysctl reads a sysctl by its dotted name (an error wrapping
	// os.ErrNotExist: no such key).
	Sysctl(name string) (string, error)
	// Command runs a command and returns its standard output (an error
	// wrapping exec.ErrNotFound: no such command).
	Command(ctx context.Context, name string, args ...string) (string, error)
}

// HostSystem is the System of the running host (and the caller's network
// namespace, for sysctls and iptables).
type HostSystem struct{}

var _ System = HostSystem{}

// ModuleState is what Module found.
type ModuleState string

// The module states.
const (
	ModuleLoaded   ModuleState = "loaded"
	ModuleLoadable ModuleState = "loadable"
	ModuleMissing  ModuleState = "missing"
	ModuleUnknown  ModuleState = "unknown"
)

// moduleSymbols are a function of each module, found in /proc/kallsyms
// when the module is built in (a built-in module without parameters has
// no /sys/module entry).
var moduleSymbols = map[string]string{"vxlan": "vxlan_xmit", "bridge": "br_dev_xmit", "veth": "veth_xmit"}

// Module looks in /sys/module and /proc/kallsyms (loaded or built in) and
// in the running kernel's modules.builtin and modules.dep (loadable).
//
// Equivalent to: `ls /sys/module/vxlan` and `modinfo vxlan`.
func (HostSystem) Module(name string) ModuleState {
	if _, err := os.Stat(filepath.Join("/sys/module", name)); err == nil {
		return ModuleLoaded
	}
	if sym := moduleSymbols[name]; sym != "" && hasSymbol(sym) {
		return ModuleLoaded
	}
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return ModuleUnknown
	}
	dir := filepath.Join("/lib/modules", unix.ByteSliceToString(u.Release[:]))
	if _, err := os.Stat(dir); err != nil {
		return ModuleUnknown
	}
	for _, f := range []string{"modules.builtin", "modules.dep"} {
		fh, err := os.Open(filepath.Join(dir, f))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			path, _, _ := strings.Cut(sc.Text(), ":")
			base := filepath.Base(path)
			if base == name+".ko" || strings.HasPrefix(base, name+".ko.") {
				fh.Close()
				if f == "modules.builtin" {
					return ModuleLoaded
				}
				return ModuleLoadable
			}
		}
		fh.Close()
	}
	return ModuleMissing
}

// hasSymbol reports whether the kernel has a function of that name.
func hasSymbol(sym string) bool {
	fh, err := os.Open("/proc/kallsyms")
	if err != nil {
		return false
	}
	defer fh.Close()
	sc := bufio.NewScanner(fh)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 3 && f[2] == sym {
			return true
		}
	}
	return false
}

// Sysctl reads /proc/sys.
func (HostSystem) Sysctl(name string) (string, error) {
	b, err := os.ReadFile(filepath.Join("/proc/sys", strings.ReplaceAll(name, ".", "/")))
	return strings.TrimSpace(string(b)), err
}

// Command runs name with args.
func (HostSystem) Command(ctx context.Context, name string, args ...string) (string, error) {
	path, err := exec.LookPath(name)
	if err != nil {
		return "", err
	}
	out, err := exec.CommandContext(ctx, path, args...).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(ee.Stderr)))
		}
		return string(out), fmt.Errorf("%s %s: %w", name, strings.Join(args, " "), err)
	}
	return string(out), nil
}

// CheckSystem runs the firewall, module and sysctl checks.
func CheckSystem(ctx context.Context, s System) []Check {
	var out []Check
	out = append(out, checkFirewallBackend(ctx, s))
	out = append(out, checkModules(s))
	out = append(out, checkForwarding(s))
	out = append(out, checkForwardPolicy(ctx, s))
	return out
}

// flavour is "nf_tables" or "legacy" from `iptables -V`.
func flavour(version string) string {
	if strings.Contains(version, "nf_tables") {
		return "nf_tables"
	}
	return "legacy"
}

func hasDockerRules(rules string) bool {
	for _, l := range strings.Split(rules, "\n") {
		if strings.HasPrefix(l, "-N DOCKER") || strings.Contains(l, "-j DOCKER") {
			return true
		}
	}
	return false
}

func checkFirewallBackend(ctx context.Context, s System) Check {
	c := Check{Name: "firewall"}
	v, err := s.Command(ctx, "iptables", "-V")
	if err != nil {
		c.Result = Warn
		c.Message = fmt.Sprintf("iptables, which the plugin uses, cannot be run: %v; overlay bridges get no firewall rules", err)
		c.Fix = "install iptables (the flavour dockerd uses) if dockerd runs here"
		return c
	}
	ours := flavour(v)
	other, otherCmd := "legacy", "iptables-legacy"
	if ours == "legacy" {
		other, otherCmd = "nf_tables", "iptables-nft"
	}
	oursRules, _ := s.Command(ctx, "iptables", "-w", "-S")
	otherRules, otherErr := s.Command(ctx, otherCmd, "-w", "-S")
	inOurs, inOther := hasDockerRules(oursRules), otherErr == nil && hasDockerRules(otherRules)
	switch {
	case inOurs:
		c.Result = Pass
		c.Message = fmt.Sprintf("iptables is %s, the backend that holds dockerd's rules", ours)
	case inOther:
		c.Result = Fail
		c.Message = fmt.Sprintf("the plugin's iptables is %s but dockerd's rules are in %s: a packet must pass both, and dockerd's FORWARD DROP is not opened by our ACCEPT rules", ours, other)
		c.Fix = fmt.Sprintf("make `iptables` the %s flavour, as dockerd's (update-alternatives --set iptables /usr/sbin/%s), then restart the plugin", other, otherCmd)
	default:
		c.Result = Pass
		c.Message = fmt.Sprintf("iptables is %s; no dockerd rules in either backend", ours)
	}
	return c
}

func checkModules(s System) Check {
	c := Check{Name: "modules"}
	var missing, onDemand, unknown []string
	for _, m := range []string{"vxlan", "bridge", "veth"} {
		switch s.Module(m) {
		case ModuleLoaded:
		case ModuleLoadable:
			onDemand = append(onDemand, m)
		case ModuleMissing:
			missing = append(missing, m)
		default:
			unknown = append(unknown, m)
		}
	}
	switch {
	case len(missing) > 0:
		c.Result = Fail
		c.Message = fmt.Sprintf("kernel modules neither loaded nor loadable: %s", strings.Join(missing, ", "))
		c.Fix = "install the kernel's extra modules (for example linux-modules-extra-$(uname -r)) or use a kernel with them"
	case len(unknown) > 0:
		c.Result = Warn
		c.Message = fmt.Sprintf("cannot tell whether kernel modules %s are available (not in /sys/module or /proc/kallsyms, no /lib/modules for this kernel)", strings.Join(unknown, ", "))
		c.Fix = "check with `modprobe -n -v vxlan bridge veth` on the host"
	case len(onDemand) > 0:
		c.Result = Pass
		c.Message = fmt.Sprintf("kernel modules vxlan, bridge, veth available (%s loaded on first use)", strings.Join(onDemand, ", "))
	default:
		c.Result = Pass
		c.Message = "kernel modules vxlan, bridge, veth loaded"
	}
	return c
}

func checkForwarding(s System) Check {
	c := Check{Name: "sysctl"}
	v, err := s.Sysctl("net.ipv4.ip_forward")
	switch {
	case err != nil:
		c.Result, c.Message = Warn, fmt.Sprintf("cannot read net.ipv4.ip_forward: %v", err)
	case v != "1":
		c.Result = Warn
		c.Message = "net.ipv4.ip_forward is " + v + ": containers reach each other across the overlay but not beyond it through the gateway"
		c.Fix = "sysctl -w net.ipv4.ip_forward=1 (dockerd sets it when it starts) if containers need to reach other networks"
	default:
		c.Result, c.Message = Pass, "net.ipv4.ip_forward is 1"
	}
	return c
}

func checkForwardPolicy(ctx context.Context, s System) Check {
	c := Check{Name: "sysctl"}
	bnf, err := s.Sysctl("net.bridge.bridge-nf-call-iptables")
	if err != nil || bnf != "1" {
		c.Result, c.Message = Pass, "bridge-nf-call-iptables is off (or br_netfilter not loaded): bridged overlay traffic skips iptables"
		return c
	}
	rules, err := s.Command(ctx, "iptables", "-w", "-S", "FORWARD")
	if err != nil {
		c.Result, c.Message = Warn, fmt.Sprintf("bridge-nf-call-iptables is 1 but the FORWARD chain cannot be read: %v", err)
		return c
	}
	drop, jump := false, false
	for _, l := range strings.Split(rules, "\n") {
		l = strings.TrimSpace(l)
		if l == "-P FORWARD DROP" {
			drop = true
		}
		if strings.HasPrefix(l, "-A FORWARD") && strings.HasSuffix(l, "-j "+vxlan.FirewallChain) {
			jump = true
		}
	}
	switch {
	case drop && !jump:
		c.Result = Warn
		c.Message = fmt.Sprintf("bridge-nf-call-iptables is 1 and the FORWARD policy is DROP, but FORWARD has no jump to %s: bridged overlay traffic is dropped", vxlan.FirewallChain)
		c.Fix = "restart the plugin (it writes its rules at start and for every network), and check that it uses the same iptables flavour as dockerd"
	default:
		c.Result = Pass
		c.Message = fmt.Sprintf("bridge-nf-call-iptables is 1; FORWARD policy DROP: %v, jump to %s: %v", drop, vxlan.FirewallChain, jump)
	}
	return c
}

// CheckEgress checks each network of this host with -o egress=host or
// auto: IPv4
// forwarding on, and each IPv4 subnet masqueraded (the nat rule the plugin
// writes with the network). Without either, its containers reach each
// other but nothing beyond the overlay. None when no network has it.
//
// Equivalent to: `sysctl net.ipv4.ip_forward` and `iptables -t nat -S
// POSTROUTING | grep -- "-s <subnet> .*MASQUERADE"`.
func CheckEgress(ctx context.Context, st *status.Report, s System) []Check {
	var out []Check
	var (
		read           bool // the host's side is read once, for the first egress network
		nat, fwd       string
		natErr, fwdErr error
	)
	for _, n := range st.Networks {
		mode := strings.TrimSpace(n.Egress)
		if !n.Member || (mode != "host" && mode != "auto") {
			continue
		}
		if !read {
			read = true
			nat, natErr = s.Command(ctx, "iptables", "-w", "-t", "nat", "-S", "POSTROUTING")
			fwd, fwdErr = s.Sysctl("net.ipv4.ip_forward")
		}
		name := n.Name
		if name == "" {
			name = n.Key
		}
		c := Check{Name: "egress", Network: name}
		var missing []string
		for _, sub := range n.Subnets {
			p, err := netip.ParsePrefix(sub)
			if err != nil || !p.Addr().Is4() {
				continue
			}
			if natErr == nil && !masqueraded(nat, p.Masked().String()) {
				missing = append(missing, p.Masked().String())
			}
		}
		switch {
		case fwdErr == nil && fwd != "1":
			c.Result = Fail
			c.Message = fmt.Sprintf("network %s has egress=%s but net.ipv4.ip_forward is %s: its containers cannot get out", name, mode, fwd)
			c.Fix = "sysctl -w net.ipv4.ip_forward=1 (dockerd sets it unless started with --ip-forward=false)"
		case natErr != nil:
			c.Result, c.Message = Warn, fmt.Sprintf("network %s has egress=%s; its masquerade rule cannot be read: %v", name, mode, natErr)
		case len(missing) > 0:
			c.Result = Fail
			c.Message = fmt.Sprintf("network %s has egress=%s but no masquerade rule for %s: its containers' traffic leaves with their own addresses, which nothing routes back", name, mode, strings.Join(missing, ", "))
			c.Fix = "restart the plugin (docker plugin disable -f, then enable): its restore writes the network's rules again"
		default:
			c.Result, c.Message = Pass, fmt.Sprintf("network %s has egress=%s: forwarding on, its subnet masqueraded", name, mode)
		}
		out = append(out, c)
	}
	return out
}

// masqueraded reports whether nat (iptables -S output) masquerades source
// subnet sub.
func masqueraded(nat, sub string) bool {
	for _, l := range strings.Split(nat, "\n") {
		f := strings.Fields(l)
		if i := slices.Index(f, "-s"); i >= 0 && i+1 < len(f) && f[i+1] == sub && slices.Contains(f, "MASQUERADE") {
			return true
		}
	}
	return false
}
