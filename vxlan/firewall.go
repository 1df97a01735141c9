package vxlan

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"
)

// FirewallChain is the filter-table chain, jumped to from FORWARD right
// after dockerd's DOCKER-USER jump (first without dockerd), that holds the
// per-bridge rules.
const FirewallChain = "CONSUL-OVERLAY"

// firewall keeps bridged traffic of each overlay bridge flowing and
// everything routed into or out of an overlay dropped, keeps an internal
// overlay's containers off the host, and filters the underlay
// (allowlist.go).
//
// Why: the bridges live in the host namespace, where dockerd sets the
// FORWARD policy to DROP and br_netfilter passes bridged frames through
// iptables. Per bridge, in both iptables and ip6tables (<mark> is the
// owner mark, OwnerMark(Config.Owner)):
//
//	-A FORWARD -j DOCKER-USER                                                           (dockerd's: the administrator's rules first)
//	-A FORWARD -j CONSUL-OVERLAY                                                        (shared, right after it)
//	-A CONSUL-OVERLAY -i vxbr-0a1b -o vxbr-0a1b -m comment --comment <mark> -j ACCEPT   (within the network)
//	-A CONSUL-OVERLAY -o vxbr-0a1b -m comment --comment <mark> -j DROP                  (nothing routed in)
//	-A CONSUL-OVERLAY -i vxbr-0a1b -m comment --comment <mark> -j DROP                  (nothing routed out)
//
// and for an internal network (Network.Internal) also
//
//	-A INPUT -j CONSUL-OVERLAY-INPUT                                                    (shared, first in INPUT)
//	-A CONSUL-OVERLAY-INPUT -i vxbr-0a1b -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment <mark> -j RETURN
//	                                                                                    (replies to what the host started)
//	-A CONSUL-OVERLAY-INPUT -i vxbr-0a1b -m comment --comment <mark> -j DROP            (nothing else to the host's addresses)
//
// Our FORWARD jump sits after DOCKER-USER so that administrators' rules
// there see overlay traffic, as they see Docker's own bridges'; dockerd
// puts its jumps back at the top when it starts, which keeps that order.
//
// The chains and jumps are shared by every instance (owner) in the
// namespace and never removed: an empty chain costs nothing, and removing
// it would race with another instance adding to it. Each instance removes
// only rules that carry its own mark; the default owner also removes the
// uncommented FORWARD rules of plugins from before owners existed (once
// its own commented copy of such a rule is in place, or when the bridge
// is gone). The writes of one call go through one iptables-restore
// --noflush transaction per command when iptables-restore is beside it.
//
// The host's own traffic to its endpoints (OUTPUT, and the replies) is not
// filtered.
// Calls hold Manager.mu, which serialises the commands of one instance;
// iptables' -w lock serialises them between instances.
type firewall struct {
	log  *slog.Logger
	bins []string // the enabled commands: iptables and/or ip6tables
	mark string   // comment of our rules: OwnerMark(owner)

	// v6 marks the commands of bins that are ip6tables.
	v6 map[string]bool
	// restore is the iptables-restore beside each command of bins ("":
	// none, the rules are then written one command each).
	restore map[string]string

	// allowed and explicit are the underlay allowlist (allowlist.go);
	// callers hold Manager.mu. allowed is what our RETURN rules hold as
	// far as we know (nil: unknown, read back at the next ensureInput);
	// explicit is the set SetAllowedVTEPs gave.
	allowed  map[netip.Addr]bool
	explicit map[netip.Addr]bool
	// warnedNoUnderlay: the missing underlay command was logged once.
	warnedNoUnderlay bool

	// detector chose the iptables flavour (flavour.go), nil when the
	// commands were configured; flavour is its choice, made again by
	// redetect until settled.
	detector *flavourDetector
	flavour  flavourChoice
}

// legacyOwner reports whether uncommented rules in our chain are ours: the
// default owner's, from before rules carried comments.
func (f *firewall) legacyOwner() bool { return f.mark == OwnerAlias }

// newFirewall resolves the commands; "" looks the default name up in
// PATH, "-" disables one. A missing command is logged and skipped.
func newFirewall(log *slog.Logger, ipt, ip6t string) *firewall {
	f := &firewall{log: log, mark: OwnerAlias}
	f.useCommands(ipt, ip6t)
	return f
}

// useCommands resolves the commands as newFirewall says and makes them
// the ones f runs.
func (f *firewall) useCommands(ipt, ip6t string) {
	log := f.log
	f.bins, f.v6, f.restore = nil, map[string]bool{}, map[string]string{}
	for _, c := range []struct {
		cfg, def string
		v6       bool
	}{{ipt, "iptables", false}, {ip6t, "ip6tables", true}} {
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
		f.v6[path] = c.v6
		// Only the sibling: a restore found elsewhere in PATH could act on
		// another namespace than a wrapper command does.
		if r := path + "-restore"; isExecutable(r) {
			f.restore[path] = r
		} else {
			log.Debug("no iptables-restore beside the command: rules are written one command each", "command", path)
		}
	}
}

func (f *firewall) enabled() bool { return len(f.bins) > 0 }

// isExecutable reports whether path is a regular file someone may execute.
func isExecutable(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0
}

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

// batch collects rule writes for one command, as iptables arguments
// without the table ("-I CONSUL-OVERLAY 1 -i vxbr-0a1b ...").
type batch [][]string

func (b *batch) add(args ...string) { *b = append(*b, args) }

// apply writes a batch in one iptables-restore --noflush transaction (the
// writes of one call land together or not at all, and cost one process),
// or one command each when no iptables-restore is beside the command. It
// returns the number of writes.
//
// Equivalent to: `printf '*filter\n-I CONSUL-OVERLAY 1 ...\nCOMMIT\n' |
// iptables-restore -w --noflush`.
func (f *firewall) apply(ctx context.Context, bin string, b batch) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	if r := f.restore[bin]; r != "" {
		var in strings.Builder
		in.WriteString("*filter\n")
		for _, args := range b {
			in.WriteString(strings.Join(args, " "))
			in.WriteByte('\n')
		}
		in.WriteString("COMMIT\n")
		cmd := exec.CommandContext(ctx, r, "-w", "--noflush")
		cmd.Stdin = strings.NewReader(in.String())
		if out, err := cmd.CombinedOutput(); err != nil {
			return 0, fmt.Errorf("%s --noflush: %w: %s (input: %q)", filepath.Base(r), err, strings.TrimSpace(string(out)), in.String())
		}
		for _, args := range b {
			f.log.Debug("firewall rule written", "command", filepath.Base(bin), "rule", strings.Join(args, " "))
		}
		return len(b), nil
	}
	for i, args := range b {
		if _, err := f.run(ctx, bin, args...); err != nil {
			return i, err
		}
		f.log.Debug("firewall rule written", "command", filepath.Base(bin), "rule", strings.Join(args, " "))
	}
	return len(b), nil
}

// each plans a batch for every command from a fresh listing and applies
// it. A transaction that fails (another instance changed a chain between
// the listing and the write, for example both created it) is planned from
// a new listing and tried once more.
func (f *firewall) each(ctx context.Context, plan func(bin string) (batch, error)) (int, error) {
	changes := 0
	for _, bin := range f.bins {
		var err error
		for attempt := range 2 {
			var b batch
			if b, err = plan(bin); err != nil {
				return changes, err
			}
			var k int
			k, err = f.apply(ctx, bin, b)
			changes += k
			if err == nil {
				break
			}
			if attempt == 0 {
				f.log.Debug("firewall write failed; listing again", "command", filepath.Base(bin), "error", err)
			}
		}
		if err != nil {
			return changes, err
		}
	}
	return changes, nil
}

// dockerJumpRE matches FORWARD's unconditional jumps to dockerd's chains
// (DOCKER-USER, DOCKER-ISOLATION-STAGE-1, DOCKER-FORWARD): they act only
// on Docker's own bridges, or are the administrator's DOCKER-USER.
var dockerJumpRE = regexp.MustCompile(`^-A [A-Z]+ -j DOCKER-[A-Z0-9-]+$`)

// placeJump adds to b what makes `-A <from> -j <to>` appear exactly once
// in from (listed as lines), right after dockerd's DOCKER-USER jump, or
// first if there is none: administrators' rules in DOCKER-USER see overlay
// traffic before we accept it, as they see Docker's own bridges'. Other
// DOCKER-* jumps between DOCKER-USER and ours are fine (dockerd puts its
// jumps back at the top when it restarts). A misplaced jump is deleted
// and inserted in the same transaction, so no packet misses it.
func placeJump(b *batch, lines []string, from, to string) {
	jump := "-A " + from + " -j " + to
	user := slices.Index(lines, "-A "+from+" -j DOCKER-USER")
	var at []int
	for i, l := range lines {
		if l == jump {
			at = append(at, i)
		}
	}
	if len(at) == 1 && at[0] > user {
		ok := true
		for _, l := range lines[user+1 : at[0]] {
			ok = ok && dockerJumpRE.MatchString(l)
		}
		if ok {
			return
		}
	}
	pos := user + 1 // 0-based slot after DOCKER-USER among the remaining rules
	for _, i := range at {
		b.add("-D", from, "-j", to)
		if i < user {
			pos--
		}
	}
	b.add("-I", from, fmt.Sprint(pos+1), "-j", to)
}

// ensureBase makes our chain exist and the FORWARD jump to it sit right
// after dockerd's DOCKER-USER jump (first in FORWARD without dockerd),
// exactly once.
//
// Equivalent to: `iptables -N CONSUL-OVERLAY; iptables -D FORWARD -j
// CONSUL-OVERLAY; iptables -I FORWARD <after DOCKER-USER> -j
// CONSUL-OVERLAY`.
func (f *firewall) ensureBase(ctx context.Context) (int, error) {
	f.redetect(ctx)
	return f.each(ctx, func(bin string) (batch, error) {
		var b batch
		_, ok, err := f.rules(ctx, bin, FirewallChain)
		if err != nil {
			return nil, err
		}
		if !ok {
			b.add("-N", FirewallChain)
		}
		fwd, _, err := f.rules(ctx, bin, "FORWARD")
		if err != nil {
			return nil, err
		}
		placeJump(&b, fwd, "FORWARD", FirewallChain)
		return b, nil
	})
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

// internalRules are the INPUT rules of an internal network's bridge:
// nothing its containers start reaches any address of the host (DROP),
// while replies to connections the host started (a health check of the
// local Consul agent) still return. The RETURN must precede the DROP, so
// it is inserted at the top and the DROP appended.
func internalRules(br, mark string) (replies, drop []string) {
	c := []string{"-m", "comment", "--comment", mark}
	return slices.Concat([]string{"-i", br, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"}, c, []string{"-j", "RETURN"}),
		slices.Concat([]string{"-i", br}, c, []string{"-j", "DROP"})
}

// ensureBridge installs a bridge's rules where they are missing, in one
// transaction per command: the FORWARD rules always, the INPUT rules if
// the network is internal (and removes them if it is not). The INPUT
// chain must exist (ensureInput).
//
// Equivalent to: `iptables -I CONSUL-OVERLAY 1 -i vxbr-0a1b -o vxbr-0a1b
// -m comment --comment <mark> -j ACCEPT`, then -A for the two DROP rules,
// and for an internal network `iptables -I CONSUL-OVERLAY-INPUT 1 -i
// vxbr-0a1b -m conntrack --ctstate RELATED,ESTABLISHED -m comment
// --comment <mark> -j RETURN` and `iptables -A CONSUL-OVERLAY-INPUT -i
// vxbr-0a1b -m comment --comment <mark> -j DROP`, each if missing.
func (f *firewall) ensureBridge(ctx context.Context, br string, internal bool) (int, error) {
	changes, err := f.ensureBase(ctx)
	if err != nil {
		return changes, err
	}
	accept, drops := bridgeRules(br, f.mark)
	replies, drop := internalRules(br, f.mark)
	k, err := f.each(ctx, func(bin string) (batch, error) {
		fwd, _, err := f.rules(ctx, bin, FirewallChain)
		if err != nil {
			return nil, err
		}
		input, ok, err := f.rules(ctx, bin, InputChain)
		if err != nil {
			return nil, err
		}
		has := func(lines []string, chain string, rule []string) bool {
			return slices.Contains(lines, "-A "+chain+" "+strings.Join(rule, " "))
		}
		var b batch
		if !has(fwd, FirewallChain, accept) {
			b.add(slices.Concat([]string{"-I", FirewallChain, "1"}, accept)...)
		}
		for _, d := range drops {
			if !has(fwd, FirewallChain, d) {
				b.add(slices.Concat([]string{"-A", FirewallChain}, d)...)
			}
		}
		if internal && !ok {
			return nil, fmt.Errorf("internal network bridge %s: chain %s missing in %s", br, InputChain, filepath.Base(bin))
		}
		for _, r := range []struct {
			rule []string
			pos  []string
		}{{replies, []string{"-I", InputChain, "1"}}, {drop, []string{"-A", InputChain}}} {
			switch present := has(input, InputChain, r.rule); {
			case internal && !present:
				b.add(slices.Concat(r.pos, r.rule)...)
			case !internal && present:
				b.add(slices.Concat([]string{"-D", InputChain}, r.rule)...)
			}
		}
		return b, nil
	})
	return changes + k, err
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

// value returns the argument of flag in the rule ("" if absent).
func (r chainRule) value(flag string) string {
	if i := slices.Index(r.fields, flag); i >= 0 && i+1 < len(r.fields) {
		return r.fields[i+1]
	}
	return ""
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

// removeBridge deletes every rule of ours in our chains (FORWARD's and
// INPUT's) that names the bridge; other owners' rules stay.
//
// Equivalent to: `iptables -D CONSUL-OVERLAY -i vxbr-0a1b -o vxbr-0a1b -m
// comment --comment <mark> -j ACCEPT` and so on for each such rule
// `iptables -S CONSUL-OVERLAY` (and `-S CONSUL-OVERLAY-INPUT`) lists.
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

// remove deletes the rules of our chains that are ours (they carry our
// mark, or, in the FORWARD chain only, no comment when we are the default
// owner) and match, in one transaction per command. match also gets the
// set of our commented rules of that chain, by withoutComment.
func (f *firewall) remove(ctx context.Context, match func(r chainRule, commented map[string]bool) bool) (int, error) {
	return f.each(ctx, func(bin string) (batch, error) {
		var b batch
		for _, chain := range []string{FirewallChain, InputChain} {
			lines, _, err := f.rules(ctx, bin, chain)
			if err != nil {
				return nil, err
			}
			var ours []chainRule
			commented := map[string]bool{}
			for _, l := range lines {
				r := parseRule(l)
				switch {
				case r.marked && r.comment == f.mark:
					commented[r.withoutComment()] = true
				case !r.marked && f.legacyOwner() && chain == FirewallChain:
				default:
					continue // another owner's
				}
				ours = append(ours, r)
			}
			for _, r := range ours {
				if match(r, commented) {
					b.add(slices.Concat([]string{"-D", chain}, r.fields)...)
				}
			}
		}
		return b, nil
	})
}
