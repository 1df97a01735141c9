package vxlan

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// FirewallChain is the filter-table chain, jumped to from the top of
// FORWARD, that holds the per-bridge rules.
const FirewallChain = "CONSUL-OVERLAY"

// firewall keeps bridged traffic of each overlay bridge flowing and
// everything routed into or out of an overlay dropped.
//
// Why: the bridges live in the host namespace, where dockerd sets the
// FORWARD policy to DROP and br_netfilter passes bridged frames through
// iptables. Per bridge, in both iptables and ip6tables:
//
//	-A CONSUL-OVERLAY -i vxbr-0a1b -o vxbr-0a1b -j ACCEPT   (within the network)
//	-A CONSUL-OVERLAY -o vxbr-0a1b -j DROP                  (nothing routed in)
//	-A CONSUL-OVERLAY -i vxbr-0a1b -j DROP                  (nothing routed out)
//
// The host's own traffic to its endpoints (INPUT/OUTPUT) is not affected.
// Calls hold Manager.mu, which serialises the commands.
type firewall struct {
	log  *slog.Logger
	bins []string // the enabled commands: iptables and/or ip6tables
}

// newFirewall resolves the commands; "" looks the default name up in
// PATH, "-" disables one. A missing command is logged and skipped.
func newFirewall(log *slog.Logger, ipt, ip6t string) *firewall {
	f := &firewall{log: log}
	for _, c := range []struct{ cfg, def string }{{ipt, "iptables"}, {ip6t, "ip6tables"}} {
		if c.cfg == "-" {
			continue
		}
		name := c.cfg
		if name == "" {
			name = c.def
		}
		path, err := exec.LookPath(name)
		if err != nil {
			log.Warn("firewall command not found: overlay bridges get no firewall rules (fine without dockerd, whose FORWARD policy DROP would block them)", "command", name, "error", err)
			continue
		}
		// A command that cannot read the filter table (for example
		// ip6tables on a host with IPv6 disabled) would fail every
		// network; skip it instead.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err = f.run(ctx, path, "-S", "FORWARD")
		cancel()
		if err != nil {
			log.Warn("firewall command unusable: its overlay bridge rules are skipped", "command", path, "error", err)
			continue
		}
		f.bins = append(f.bins, path)
	}
	return f
}

func (f *firewall) enabled() bool { return len(f.bins) > 0 }

// run executes one command: `<bin> -w -t filter <args>`.
func (f *firewall) run(ctx context.Context, bin string, args ...string) (string, error) {
	full := append([]string{"-w", "-t", "filter"}, args...)
	out, err := exec.CommandContext(ctx, bin, full...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", filepath.Base(bin), strings.Join(full, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// exitCode1 reports whether err is the exit status 1 that iptables gives
// for "no such rule" and "no such chain".
func exitCode1(err error) bool {
	var ee *exec.ExitError
	return errors.As(err, &ee) && ee.ExitCode() == 1
}

// exists checks a rule with -C.
func (f *firewall) exists(ctx context.Context, bin, chain string, rule []string) (bool, error) {
	_, err := f.run(ctx, bin, append([]string{"-C", chain}, rule...)...)
	if err == nil {
		return true, nil
	}
	if exitCode1(err) {
		return false, nil
	}
	return false, err
}

// rules lists a chain's rules as `-A <chain> …` lines; ok is false if the
// chain does not exist.
func (f *firewall) rules(ctx context.Context, bin, chain string) (lines []string, ok bool, err error) {
	out, err := f.run(ctx, bin, "-S", chain)
	if err != nil {
		if exitCode1(err) {
			return nil, false, nil
		}
		return nil, false, err
	}
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "-A "+chain+" ") {
			lines = append(lines, strings.TrimSpace(l))
		}
	}
	return lines, true, nil
}

// ensureBase makes our chain exist and the FORWARD jump to it be the first
// FORWARD rule, exactly once (dockerd puts its own jumps at the top when
// it starts).
//
// Equivalent to: `iptables -N CONSUL-OVERLAY; iptables -D FORWARD -j
// CONSUL-OVERLAY; iptables -I FORWARD 1 -j CONSUL-OVERLAY`.
func (f *firewall) ensureBase(ctx context.Context) (int, error) {
	changes := 0
	jump := "-A FORWARD -j " + FirewallChain
	for _, bin := range f.bins {
		_, ok, err := f.rules(ctx, bin, FirewallChain)
		if err != nil {
			return changes, err
		}
		if !ok {
			if _, err := f.run(ctx, bin, "-N", FirewallChain); err != nil {
				return changes, err
			}
			changes++
			f.log.Debug("firewall chain created", "command", filepath.Base(bin), "chain", FirewallChain)
		}
		fwd, _, err := f.rules(ctx, bin, "FORWARD")
		if err != nil {
			return changes, err
		}
		n := 0
		for _, l := range fwd {
			if l == jump {
				n++
			}
		}
		if n == 1 && fwd[0] == jump {
			continue
		}
		for range n {
			if _, err := f.run(ctx, bin, "-D", "FORWARD", "-j", FirewallChain); err != nil {
				return changes, err
			}
			changes++
		}
		if _, err := f.run(ctx, bin, "-I", "FORWARD", "1", "-j", FirewallChain); err != nil {
			return changes, err
		}
		changes++
		f.log.Debug("firewall jump put at the top of FORWARD", "command", filepath.Base(bin), "chain", FirewallChain)
	}
	return changes, nil
}

// bridgeRules are the rules of one bridge; the ACCEPT must precede the
// DROPs, so it is inserted at the top and the DROPs appended.
func bridgeRules(br string) (accept []string, drops [][]string) {
	return []string{"-i", br, "-o", br, "-j", "ACCEPT"},
		[][]string{{"-o", br, "-j", "DROP"}, {"-i", br, "-j", "DROP"}}
}

// ensureBridge installs a bridge's rules where they are missing.
//
// Equivalent to: `iptables -C CONSUL-OVERLAY -i vxbr-0a1b -o vxbr-0a1b -j
// ACCEPT || iptables -I CONSUL-OVERLAY 1 -i vxbr-0a1b -o vxbr-0a1b -j
// ACCEPT`, then the same with -A for the two DROP rules.
func (f *firewall) ensureBridge(ctx context.Context, br string) (int, error) {
	changes, err := f.ensureBase(ctx)
	if err != nil {
		return changes, err
	}
	accept, drops := bridgeRules(br)
	for _, bin := range f.bins {
		ok, err := f.exists(ctx, bin, FirewallChain, accept)
		if err != nil {
			return changes, err
		}
		if !ok {
			if _, err := f.run(ctx, bin, append([]string{"-I", FirewallChain, "1"}, accept...)...); err != nil {
				return changes, err
			}
			changes++
			f.log.Debug("firewall rule added", "command", filepath.Base(bin), "rule", strings.Join(accept, " "))
		}
		for _, d := range drops {
			ok, err := f.exists(ctx, bin, FirewallChain, d)
			if err != nil {
				return changes, err
			}
			if ok {
				continue
			}
			if _, err := f.run(ctx, bin, append([]string{"-A", FirewallChain}, d...)...); err != nil {
				return changes, err
			}
			changes++
			f.log.Debug("firewall rule added", "command", filepath.Base(bin), "rule", strings.Join(d, " "))
		}
	}
	return changes, nil
}

// removeBridge deletes every rule of our chain that names the bridge.
//
// Equivalent to: `iptables -D CONSUL-OVERLAY -i vxbr-0a1b -o vxbr-0a1b -j
// ACCEPT` and so on for each rule `iptables -S CONSUL-OVERLAY` lists.
func (f *firewall) removeBridge(ctx context.Context, br string) (int, error) {
	return f.remove(ctx, func(ifaces []string) bool { return slices.Contains(ifaces, br) })
}

// removeStale deletes the rules of our chain that name an overlay bridge
// not in keep.
func (f *firewall) removeStale(ctx context.Context, keep map[string]bool) (int, error) {
	return f.remove(ctx, func(ifaces []string) bool {
		for _, i := range ifaces {
			if bridgeNameRE.MatchString(i) && !keep[i] {
				return true
			}
		}
		return false
	})
}

// remove deletes the rules of our chain whose -i/-o interfaces match.
func (f *firewall) remove(ctx context.Context, match func(ifaces []string) bool) (int, error) {
	changes := 0
	for _, bin := range f.bins {
		lines, _, err := f.rules(ctx, bin, FirewallChain)
		if err != nil {
			return changes, err
		}
		for _, l := range lines {
			fields := strings.Fields(l)[2:] // drop "-A CHAIN"
			var ifaces []string
			for i := 0; i+1 < len(fields); i++ {
				if fields[i] == "-i" || fields[i] == "-o" {
					ifaces = append(ifaces, fields[i+1])
				}
			}
			if !match(ifaces) {
				continue
			}
			if _, err := f.run(ctx, bin, append([]string{"-D", FirewallChain}, fields...)...); err != nil {
				return changes, err
			}
			changes++
			f.log.Debug("firewall rule removed", "command", filepath.Base(bin), "rule", strings.Join(fields, " "))
		}
	}
	return changes, nil
}
