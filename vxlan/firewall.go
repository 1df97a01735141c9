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
// iptables. Per bridge, in both iptables and ip6tables (<mark> is the
// owner mark, OwnerMark(Config.Owner)):
//
//	-A CONSUL-OVERLAY -i vxbr-0a1b -o vxbr-0a1b -m comment --comment <mark> -j ACCEPT   (within the network)
//	-A CONSUL-OVERLAY -o vxbr-0a1b -m comment --comment <mark> -j DROP                  (nothing routed in)
//	-A CONSUL-OVERLAY -i vxbr-0a1b -m comment --comment <mark> -j DROP                  (nothing routed out)
//
// The chain and the FORWARD jump are shared by every instance (owner) in
// the namespace and never removed: an empty chain costs nothing, and
// removing it would race with another instance adding to it. Each instance
// removes only rules that carry its own mark; the default owner also
// removes the uncommented rules of plugins from before owners existed
// (once its own commented copy of such a rule is in place, or when the
// bridge is gone).
//
// The host's own traffic to its endpoints (INPUT/OUTPUT) is not affected.
// Calls hold Manager.mu, which serialises the commands of one instance;
// iptables' -w lock serialises them between instances.
type firewall struct {
	log  *slog.Logger
	bins []string // the enabled commands: iptables and/or ip6tables
	mark string   // comment of our rules: OwnerMark(owner)
}

// legacyOwner reports whether uncommented rules in our chain are ours: the
// default owner's, from before rules carried comments.
func (f *firewall) legacyOwner() bool { return f.mark == OwnerAlias }

// newFirewall resolves the commands; "" looks the default name up in
// PATH, "-" disables one. A missing command is logged and skipped.
func newFirewall(log *slog.Logger, ipt, ip6t string) *firewall {
	f := &firewall{log: log, mark: OwnerAlias}
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

// bridgeRules are the rules of one bridge, commented with mark, in the
// order `iptables -S` prints their fields; the ACCEPT must precede the
// DROPs, so it is inserted at the top and the DROPs appended.
func bridgeRules(br, mark string) (accept []string, drops [][]string) {
	c := []string{"-m", "comment", "--comment", mark}
	rule := func(pre []string, target string) []string {
		return slices.Concat(pre, c, []string{"-j", target})
	}
	return rule([]string{"-i", br, "-o", br}, "ACCEPT"),
		[][]string{rule([]string{"-o", br}, "DROP"), rule([]string{"-i", br}, "DROP")}
}

// ensureBridge installs a bridge's rules where they are missing.
//
// Equivalent to: `iptables -C CONSUL-OVERLAY -i vxbr-0a1b -o vxbr-0a1b -m
// comment --comment <mark> -j ACCEPT || iptables -I CONSUL-OVERLAY 1 -i
// vxbr-0a1b -o vxbr-0a1b -m comment --comment <mark> -j ACCEPT`, then the
// same with -A for the two DROP rules.
func (f *firewall) ensureBridge(ctx context.Context, br string) (int, error) {
	changes, err := f.ensureBase(ctx)
	if err != nil {
		return changes, err
	}
	accept, drops := bridgeRules(br, f.mark)
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

// chainRule is one rule of our chain as `iptables -S` lists it.
type chainRule struct {
	fields  []string // after "-A CHAIN", as -D takes them
	ifaces  []string // the -i and -o interfaces
	comment string   // the --comment value, unquoted; "" if none
	marked  bool     // it has a comment match
}

func parseRule(line string) chainRule {
	r := chainRule{fields: strings.Fields(line)[2:]} // drop "-A CHAIN"
	for i := 0; i+1 < len(r.fields); i++ {
		switch r.fields[i] {
		case "-i", "-o":
			r.ifaces = append(r.ifaces, r.fields[i+1])
		case "--comment":
			r.marked = true
			r.comment = strings.Trim(r.fields[i+1], `"`)
		}
	}
	return r
}

// withoutComment is the rule's text without its comment match, to pair a
// legacy rule with its commented copy.
func (r chainRule) withoutComment() string {
	var out []string
	for i := 0; i < len(r.fields); i++ {
		if r.fields[i] == "-m" && i+1 < len(r.fields) && r.fields[i+1] == "comment" {
			i++
			continue
		}
		if r.fields[i] == "--comment" {
			i++
			continue
		}
		out = append(out, r.fields[i])
	}
	return strings.Join(out, " ")
}

// removeBridge deletes every rule of ours in our chain that names the
// bridge; other owners' rules stay.
//
// Equivalent to: `iptables -D CONSUL-OVERLAY -i vxbr-0a1b -o vxbr-0a1b -m
// comment --comment <mark> -j ACCEPT` and so on for each such rule
// `iptables -S CONSUL-OVERLAY` lists.
func (f *firewall) removeBridge(ctx context.Context, br string) (int, error) {
	return f.remove(ctx, func(r chainRule, _ map[string]bool) bool { return slices.Contains(r.ifaces, br) })
}

// removeStale deletes the rules of ours that name an overlay bridge not in
// keep, and legacy uncommented rules (default owner only) whose commented
// copy is in place.
func (f *firewall) removeStale(ctx context.Context, keep map[string]bool) (int, error) {
	return f.remove(ctx, func(r chainRule, commented map[string]bool) bool {
		for _, i := range r.ifaces {
			if bridgeNameRE.MatchString(i) && !keep[i] {
				return true
			}
		}
		return !r.marked && commented[r.withoutComment()]
	})
}

// remove deletes the rules of our chain that are ours (they carry our
// mark, or no comment when we are the default owner) and match. match
// also gets the set of our commented rules, by withoutComment.
func (f *firewall) remove(ctx context.Context, match func(r chainRule, commented map[string]bool) bool) (int, error) {
	changes := 0
	for _, bin := range f.bins {
		lines, _, err := f.rules(ctx, bin, FirewallChain)
		if err != nil {
			return changes, err
		}
		var ours []chainRule
		commented := map[string]bool{}
		for _, l := range lines {
			r := parseRule(l)
			switch {
			case r.marked && r.comment == f.mark:
				commented[r.withoutComment()] = true
			case !r.marked && f.legacyOwner():
			default:
				continue // another owner's
			}
			ours = append(ours, r)
		}
		for _, r := range ours {
			if !match(r, commented) {
				continue
			}
			if _, err := f.run(ctx, bin, append([]string{"-D", FirewallChain}, r.fields...)...); err != nil {
				return changes, err
			}
			changes++
			f.log.Debug("firewall rule removed", "command", filepath.Base(bin), "rule", strings.Join(r.fields, " "))
		}
	}
	return changes, nil
}
