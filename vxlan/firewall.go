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
	"strconv"
	"strings"
	"sync"
	"time"
)

// FirewallChain is the filter-table chain, jumped to from FORWARD right
// after dockerd's DOCKER-USER jump (first without dockerd) for traffic in
// or out of an overlay's interface (forwardJumps), that holds the
// per-bridge rules.
const FirewallChain = "CONSUL-OVERLAY"

// firewall keeps bridged traffic of each overlay bridge flowing and
// everything routed into or out of an overlay dropped, keeps an internal
// overlay's containers off the host, and filters the underlay
// (allowlist.go).
//
// Why: the bridges live in the host namespace, where dockerd sets the
// FORWARD policy to DROP and br_netfilter passes bridged frames through
// iptables. For every bridge at once, in both iptables and ip6tables
// (<mark> is the owner mark, OwnerMark(Config.Owner)):
//
//	-A FORWARD -j DOCKER-USER                                                                         (dockerd's: the administrator's rules first)
//	-A FORWARD -i vxbr-+ -j CONSUL-OVERLAY                                                            (shared, right after it,
//	-A FORWARD -o vxbr-+ -j CONSUL-OVERLAY                                                             for traffic of an overlay
//	-A FORWARD -i vxg-+ -j CONSUL-OVERLAY                                                              only: forwardJumps)
//	-A FORWARD -o vxg-+ -j CONSUL-OVERLAY
//	-A CONSUL-OVERLAY -i vxbr-+ -m physdev --physdev-is-bridged -m comment --comment <mark> -j ACCEPT (bridged: within its network)
//	-A CONSUL-OVERLAY -o vxbr-+ -m comment --comment <mark> -j DROP                                   (nothing routed in)
//	-A CONSUL-OVERLAY -i vxbr-+ -m comment --comment <mark> -j DROP                                   (nothing routed out)
//	-t raw -A PREROUTING -i vxbr-+ -m addrtype ! --dst-type LOCAL -m comment --comment <mark> -j NOTRACK
//	                                                                                                  (with Config.NoTrackBridged)
//
// A bridged frame never leaves its bridge, so the one ACCEPT keeps each
// network to itself; traffic between two overlay bridges is routed and
// dropped. For an internal network (Network.Internal) also
//
//	-A INPUT -j CONSUL-OVERLAY-INPUT                                                    (shared, first in INPUT)
//	-A CONSUL-OVERLAY-INPUT -i vxbr-0a1b -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment <mark> -j RETURN
//	                                                                                    (replies to what the host started)
//	-A CONSUL-OVERLAY-INPUT -i vxbr-0a1b -m comment --comment <mark> -j DROP            (nothing else to the host's addresses)
//
// Those replies are addressed to the host, so NOTRACK (which skips only
// what is not for a local address) leaves them tracked.
//
// A network with Network.Egress (IPv4 only) gets its own FORWARD rules
// between the shared ACCEPT and the shared DROPs (egressRules: replies
// in; out to anywhere but another overlay or a Docker bridge) and a
// masquerade rule per subnet in the nat table's POSTROUTING
// (masqueradeRules). The ACCEPT stays first, so that bridged frames do
// not walk every egress network's rules (see planForward).
//
// A network in the data-plane namespace (Config.DataplaneNS) meets the
// host's hooks only on its gateway link vxg-<vni>, the host's way in and
// out of it: its bridged frames never cross the host's namespace. With a
// data-plane namespace the shared rules also hold
//
//	-A CONSUL-OVERLAY -o vxg-+ -m comment --comment <mark> -j DROP     (nothing routed in)
//	-A CONSUL-OVERLAY -i vxg-+ -m comment --comment <mark> -j DROP     (nothing routed out)
//
// and the link-local wildcard rules (linklocal.go) for -i vxg-+; the
// per-network INPUT rules (internal, API) of such a network name its
// gateway link instead of its bridge (fwIface).
//
// Our FORWARD jumps sit after DOCKER-USER so that administrators' rules
// there see overlay traffic, as they see Docker's own bridges'; dockerd
// puts its jumps back at the top when it starts, which keeps that order.
//
// The chains and jumps are shared by every instance (owner) in the
// namespace and never removed: an empty chain costs nothing, and removing
// it would race with another instance adding to it. Each instance removes
// only rules that carry its own mark; the default owner also removes the
// uncommented FORWARD rules of plugins from before owners existed. The
// per-bridge FORWARD and link-local rules of older versions go at the
// first sync, in the transaction that puts the wildcard ones in place.
// The writes of one call go through one iptables-restore --noflush
// transaction per command when iptables-restore is beside it.
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
	// none, the rules are then written one command each); save the
	// iptables-save ("": none, chains are listed with -S).
	restore map[string]string
	save    map[string]string
	// notrack: the raw-table NOTRACK rule of bridged overlay traffic is
	// installed (Config.NoTrackBridged).
	notrack bool

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
	// Manager.watchFlavour until settled. moveFrom is the flavour our
	// rules still have to be moved out of (nil: none).
	detector *flavourDetector
	flavour  flavourChoice
	moveFrom *flavourChoice
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
	f.bins, f.v6, f.restore, f.save = nil, map[string]bool{}, map[string]string{}, map[string]string{}
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
		if sv := path + "-save"; isExecutable(sv) {
			f.save[path] = sv
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
	return f.runIn(ctx, bin, "filter", args...)
}

// runIn executes one command on a table: `<bin> -w -t <table> <args>`.
func (f *firewall) runIn(ctx context.Context, bin, table string, args ...string) (string, error) {
	full := append([]string{"-w", "-t", table}, args...)
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
// without the table ("-I CONSUL-OVERLAY 1 -i vxbr-0a1b ...") and the
// table they go to.
type batch []write

type write struct {
	table string
	args  []string
}

// add adds a write to the filter table.
func (b *batch) add(args ...string) { *b = append(*b, write{"filter", args}) }

// addIn adds a write to another table.
func (b *batch) addIn(table string, args ...string) { *b = append(*b, write{table, args}) }

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
		for _, table := range []string{"filter", "raw", "mangle", "nat"} {
			var lines []string
			for _, w := range b {
				if w.table == table {
					lines = append(lines, strings.Join(w.args, " "))
				}
			}
			if len(lines) > 0 {
				in.WriteString("*" + table + "\n" + strings.Join(lines, "\n") + "\nCOMMIT\n")
			}
		}
		cmd := exec.CommandContext(ctx, r, "-w", "--noflush")
		cmd.Stdin = strings.NewReader(in.String())
		if out, err := cmd.CombinedOutput(); err != nil {
			return 0, fmt.Errorf("%s --noflush: %w: %s (input: %q)", filepath.Base(r), err, strings.TrimSpace(string(out)), in.String())
		}
		for _, w := range b {
			f.log.Debug("firewall rule written", "command", filepath.Base(bin), "table", w.table, "rule", strings.Join(w.args, " "))
		}
		return len(b), nil
	}
	for i, w := range b {
		if _, err := f.runIn(ctx, bin, w.table, w.args...); err != nil {
			return i, err
		}
		f.log.Debug("firewall rule written", "command", filepath.Base(bin), "table", w.table, "rule", strings.Join(w.args, " "))
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

// eachParallel is each with the commands run side by side (iptables and
// ip6tables program separate tables): a call costs the slower command's
// processes, not the sum. plan is called concurrently for different
// commands.
func (f *firewall) eachParallel(ctx context.Context, plan func(bin string) (batch, error)) (int, error) {
	if len(f.bins) < 2 {
		return f.each(ctx, plan)
	}
	type result struct {
		k   int
		err error
	}
	res := make([]result, len(f.bins))
	var wg sync.WaitGroup
	for i, bin := range f.bins {
		wg.Go(func() {
			one := &firewall{log: f.log, bins: []string{bin}, restore: f.restore}
			res[i].k, res[i].err = one.each(ctx, plan)
		})
	}
	wg.Wait()
	changes := 0
	var errs []error
	for _, r := range res {
		changes += r.k
		if r.err != nil {
			errs = append(errs, r.err)
		}
	}
	return changes, errors.Join(errs...)
}

// dockerJumpRE matches FORWARD's unconditional jumps to dockerd's chains
// (DOCKER-USER, DOCKER-ISOLATION-STAGE-1, DOCKER-FORWARD): they act only
// on Docker's own bridges, or are the administrator's DOCKER-USER.
var dockerJumpRE = regexp.MustCompile(`^-A [A-Z]+ -j DOCKER-[A-Z0-9-]+$`)

// forwardJumps are the conditions of FORWARD's jumps to FirewallChain,
// in chain order: one for each direction of each interface wildcard of
// ours. Every rule of the chain names an interface that one of them
// matches (a bridge, a gateway link or their wildcard), so the chain's
// verdicts are those of one unconditional jump, but forwarded traffic
// that touches no overlay (Docker's bridge networks, the host's own
// routing) walks these four rules instead of every egress network's
// seven (about 35 ns a rule; BENCHMARKS.md, twenty-sixth round). A packet
// that both jumps match (in through one overlay, out through another)
// meets the chain twice and gets the same verdict twice.
func forwardJumps() [][]string {
	return [][]string{{"-i", wildcard}, {"-o", wildcard}, {"-i", gatewayWildcard}, {"-o", gatewayWildcard}}
}

// jumpLine is the jump from chain from to chain to under cond as
// `iptables -S` lists it.
func jumpLine(from, to string, cond []string) string {
	return strings.Join(slices.Concat([]string{"-A", from}, cond, []string{"-j", to}), " ")
}

// placeJumps adds to b what makes the jumps `-A <from> <cond> -j <to>`,
// one per cond of conds in that order, appear exactly once each in from
// (listed as lines), together, right after dockerd's DOCKER-USER jump, or
// first if there is none: administrators' rules in DOCKER-USER see
// overlay traffic before we accept it, as they see Docker's own bridges'.
// Other DOCKER-* jumps between DOCKER-USER and ours are fine (dockerd puts
// its jumps back at the top when it restarts). The unconditional jump of
// earlier releases goes when conds has conditions. Misplaced jumps are
// deleted and inserted in the same transaction, so no packet misses
// them; an unconditional jump that goes is deleted after the inserts,
// which matters when the rules are written one command each.
func placeJumps(b *batch, lines []string, from, to string, conds [][]string) {
	want := make([]string, len(conds))
	for i, c := range conds {
		want[i] = jumpLine(from, to, c)
	}
	plain := jumpLine(from, to, nil) // the unconditional jump
	user := slices.Index(lines, "-A "+from+" -j DOCKER-USER")
	var at []int // our jumps, wanted or not, in chain order
	for i, l := range lines {
		if l == plain || slices.Contains(want, l) {
			at = append(at, i)
		}
	}
	if len(at) == len(want) && at[0] > user {
		ok := true
		for k, i := range at {
			ok = ok && lines[i] == want[k] && i == at[0]+k
		}
		for _, l := range lines[user+1 : at[0]] {
			ok = ok && dockerJumpRE.MatchString(l)
		}
		if ok {
			return
		}
	}
	pos := user + 1 // 0-based slot after DOCKER-USER once the wanted texts are deleted
	var stale []int
	for _, i := range at {
		if lines[i] == plain && !slices.Contains(want, plain) {
			stale = append(stale, i)
			continue
		}
		b.add(slices.Concat([]string{"-D", from}, strings.Fields(lines[i])[2:])...)
		if i < user {
			pos--
		}
	}
	for k, w := range want {
		b.add(slices.Concat([]string{"-I", from, fmt.Sprint(pos + 1 + k)}, strings.Fields(w)[2:])...)
	}
	for range stale {
		b.add("-D", from, "-j", to)
	}
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

// The rule set is constant-size: the FORWARD rules are three wildcard
// rules for every overlay bridge (vxbr-+), and so are the link-local
// rules; only an internal network (two INPUT rules), a network with
// Network.ConsulAPI (one INPUT rule) and one with Network.Egress (seven
// FORWARD rules and a nat rule) add rules of their own. Every write of
// one call (EnsureNetwork, DeleteNetwork, Reconcile, SetAllowedVTEPs) is
// planned from one listing per command (`iptables-save`, one process) and
// written in one `iptables-restore --noflush` transaction per command,
// only if something is missing or stale: a reconcile of any number of
// networks costs four processes, and an EnsureNetwork of an ordinary
// network two (the listings).

// wildcard is the interface match of every overlay bridge;
// gatewayWildcard of every gateway link of a network in the data-plane
// namespace, the host's side of it.
const (
	wildcard        = bridgePrefix + "+"
	gatewayWildcard = gatewayPrefix + "+"
)

// netIface reports whether name is the interface of one network in the
// host's namespace: its bridge or its gateway link.
func netIface(name string) bool {
	return bridgeNameRE.MatchString(name) || gatewayNameRE.MatchString(name)
}

// shared says what a sync does with the rules every bridge of an owner
// shares (the wildcard FORWARD rules, the link-local ones, NOTRACK).
type shared int

const (
	sharedKeep shared = iota // neither add nor remove
	sharedWant               // add what is missing, remove what differs
	sharedDrop               // remove: no bridge of ours is left
)

// fwSpec is what one sync wants.
type fwSpec struct {
	// underlay: plan the underlay filter (ensureInput's rules) with
	// vteps; prune removes allowed VTEPs not in vteps.
	underlay bool
	port     int
	v6       bool
	vteps    map[netip.Addr]bool
	prune    bool
	// added, if set, collects the underlay rules the sync inserts, so
	// that a failed EnsureNetwork removes exactly those (removeUnderlay).
	added *underlayAdded

	// bridges get their own rules as their Network says (internal,
	// ConsulAPI); gone bridges lose theirs; complete: bridges is every
	// bridge of ours, the rules of any other go. A "bridge" is the
	// network's interface in the host's namespace: its bridge, or its
	// gateway link (vxg-<vni>) in the data-plane layout.
	bridges  map[string]Network
	gone     map[string]bool
	complete bool

	shared  shared
	ll      netip.Addr // the link-local address (invalid: none)
	notrack bool       // raw-table NOTRACK of bridged overlay traffic
	// gateways: the shared rules include those of the gateway links
	// (gatewayForwardRules, linkLocalGatewayRules): the Manager has a
	// data-plane namespace.
	gateways bool
}

// forwardRules are the shared FORWARD rules: bridged frames of any
// overlay bridge pass (a bridged frame never leaves its bridge, so this
// keeps each network to itself), and everything routed into or out of an
// overlay bridge is dropped. The ACCEPT is inserted at the top, the DROPs
// appended.
func forwardRules(mark string) (accept []string, drops [][]string) {
	c := []string{"-m", "comment", "--comment", mark}
	return slices.Concat([]string{"-i", wildcard, "-m", "physdev", "--physdev-is-bridged"}, c, []string{"-j", "ACCEPT"}),
		[][]string{
			slices.Concat([]string{"-o", wildcard}, c, []string{"-j", "DROP"}),
			slices.Concat([]string{"-i", wildcard}, c, []string{"-j", "DROP"}),
		}
}

// gatewayForwardRules are the shared FORWARD rules of the gateway links
// (vxg-+) of the networks in the data-plane namespace: everything routed
// into or out of such a network through the host is dropped. No frame of
// theirs is bridged in the host's namespace, so there is no ACCEPT.
// Appended, after the bridges' ACCEPT.
func gatewayForwardRules(mark string) [][]string {
	c := []string{"-m", "comment", "--comment", mark}
	return [][]string{
		slices.Concat([]string{"-o", gatewayWildcard}, c, []string{"-j", "DROP"}),
		slices.Concat([]string{"-i", gatewayWildcard}, c, []string{"-j", "DROP"}),
	}
}

// egressRules are the FORWARD rules of a network with Network.Egress,
// whose interface in the host's namespace is iface, in chain order; they
// are inserted at the top, and the shared ACCEPT of bridged frames is put
// back above them (planForward). The replies to what its containers
// started come back in; what they start goes out to anywhere but into
// another overlay (vxbr-+, vxg-+) or one of Docker's bridge networks
// (docker0, docker_gwbridge, br-<id>), as a container of Docker's own
// bridge network is kept off the others. A connection to an address of
// the host that the nat table sent on (a port published with docker run
// -p, on a bridge network of this host) leaves the chain, and dockerd's
// own rules decide, as for a container on docker_gwbridge. The DROPs
// spare bridged frames (-i and -o the same bridge under br_netfilter),
// which the shared ACCEPT passes wherever it stands.
//
//	-A CONSUL-OVERLAY -o vxbr-0a1b -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment <mark> -j ACCEPT
//	-A CONSUL-OVERLAY -i vxbr-0a1b -m conntrack --ctstate DNAT -m comment --comment <mark> -j RETURN
//	-A CONSUL-OVERLAY -i vxbr-0a1b -o vxbr-+ -m physdev ! --physdev-is-bridged -m comment --comment <mark> -j DROP
//	(the same for -o vxg-+, -o docker+ and -o br-+)
//	-A CONSUL-OVERLAY -i vxbr-0a1b -m comment --comment <mark> -j ACCEPT
func egressRules(iface, mark string) [][]string {
	c := []string{"-m", "comment", "--comment", mark}
	out := [][]string{
		slices.Concat([]string{"-o", iface, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"}, c, []string{"-j", "ACCEPT"}),
		slices.Concat([]string{"-i", iface, "-m", "conntrack", "--ctstate", "DNAT"}, c, []string{"-j", "RETURN"}),
	}
	for _, o := range []string{wildcard, gatewayWildcard, "docker+", "br-+"} {
		out = append(out, slices.Concat([]string{"-i", iface, "-o", o, "-m", "physdev", "!", "--physdev-is-bridged"}, c, []string{"-j", "DROP"}))
	}
	return append(out, slices.Concat([]string{"-i", iface}, c, []string{"-j", "ACCEPT"}))
}

// egressIface is the network interface whose egressRules r is one of, ""
// when it is none.
func egressIface(r chainRule, mark string) string {
	for _, i := range r.ifaces {
		if !netIface(i) {
			continue
		}
		text := strings.Join(r.fields, " ")
		for _, e := range egressRules(i, mark) {
			if strings.Join(e, " ") == text {
				return i
			}
		}
	}
	return ""
}

// masqueradeRules are the nat-table POSTROUTING rules of a network with
// Network.Egress: what its containers send out of the host through any
// other interface leaves with the host's address, one rule per IPv4
// subnet (the masked Gateways).
//
//	-t nat -A POSTROUTING -s 10.10.0.0/24 ! -o vxbr-0a1b -m comment --comment <mark> -j MASQUERADE
func masqueradeRules(iface string, n Network, mark string) [][]string {
	var out [][]string
	for _, g := range n.Gateways {
		if !g.Addr().Is4() {
			continue
		}
		out = append(out, []string{"-s", g.Masked().String(), "!", "-o", iface, "-m", "comment", "--comment", mark, "-j", "MASQUERADE"})
	}
	return out
}

// planNat plans the masquerade rules of the networks with Egress (IPv4
// commands only); as planForward, a rule of an interface neither planned
// nor gone stays unless the spec is complete.
func (f *firewall) planNat(b *batch, bin string, l listing, s fwSpec) {
	want := map[string][]string{}
	var order []string
	if !f.v6[bin] && s.shared != sharedDrop {
		for _, br := range sortedBridges(s.bridges) {
			if n := s.bridges[br]; n.Egress {
				for _, r := range masqueradeRules(br, n, f.mark) {
					text := strings.Join(r, " ")
					want[text], order = r, append(order, text)
				}
			}
		}
	}
	have := map[string]bool{}
	lines, _ := l.chain("nat", "POSTROUTING")
	for _, line := range lines {
		r := parseRule(line)
		if !r.marked || r.comment != f.mark {
			continue
		}
		text := strings.Join(r.fields, " ")
		if want[text] != nil && !have[text] {
			have[text] = true
			continue
		}
		i := r.value("-o")
		if s.shared == sharedDrop || s.gone[i] || hasBridge(s.bridges, i) || s.complete && netIface(i) {
			b.addIn("nat", slices.Concat([]string{"-D", "POSTROUTING"}, r.fields)...)
		}
	}
	for _, text := range order {
		if !have[text] {
			b.addIn("nat", slices.Concat([]string{"-A", "POSTROUTING"}, want[text])...)
		}
	}
}

// notrackRule is the raw-table rule that keeps bridged overlay traffic out
// of conntrack: everything an overlay bridge receives that is not for an
// address of the host. Traffic to and from the host itself (the gateway
// address, the link-local address, replies to connections the host
// started) stays tracked, so the conntrack match of an internal
// network's INPUT rules and the host's own firewall keep working.
func notrackRule(mark string) []string {
	return []string{"-i", wildcard, "-m", "addrtype", "!", "--dst-type", "LOCAL", "-m", "comment", "--comment", mark, "-j", "NOTRACK"}
}

// listing is one command's rules: table → chain → `-A` lines, and the
// chains that exist.
type listing map[string]map[string][]string

func (l listing) chain(table, chain string) (lines []string, ok bool) {
	t := l[table]
	if t == nil {
		return nil, false
	}
	lines, ok = t[chain]
	return lines, ok
}

// parseListing reads `iptables-save` or `iptables -S` output.
func parseListing(l listing, table, out string) {
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "*"):
			table = line[1:]
		case strings.HasPrefix(line, ":"), strings.HasPrefix(line, "-N "), strings.HasPrefix(line, "-P "):
			f := strings.Fields(strings.TrimLeft(line, ":"))
			name := f[0]
			if len(f) > 1 && (f[0] == "-N" || f[0] == "-P") {
				name = f[1]
			}
			if l[table] == nil {
				l[table] = map[string][]string{}
			}
			if _, ok := l[table][name]; !ok {
				l[table][name] = nil
			}
		case strings.HasPrefix(line, "-A "):
			f := strings.Fields(line)
			if l[table] == nil {
				l[table] = map[string][]string{}
			}
			l[table][f[1]] = append(l[table][f[1]], line)
		}
	}
}

// list reads the tables of one command: `iptables-save` (one process,
// every table) when it is beside the command, else `iptables -S` per
// table. A table the command cannot list is left out.
//
// Equivalent to: `iptables-save`.
func (f *firewall) list(ctx context.Context, bin string, tables ...string) (listing, error) {
	l := listing{}
	if s := f.save[bin]; s != "" {
		out, err := exec.CommandContext(ctx, s).Output()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", s, err)
		}
		parseListing(l, "", string(out))
		return l, nil
	}
	for _, t := range tables {
		out, err := exec.CommandContext(ctx, bin, "-w", "-t", t, "-S").CombinedOutput()
		if err != nil {
			if t != "filter" {
				continue // no raw table (module missing): nothing of ours there
			}
			return nil, fmt.Errorf("%s -w -t %s -S: %w: %s", bin, t, err, strings.TrimSpace(string(out)))
		}
		parseListing(l, t, string(out))
	}
	return l, nil
}

// ours reports whether a rule of chain is ours: it carries our mark, or,
// in FirewallChain only, no comment when we are the default owner (rules
// of plugins from before owners existed).
func (f *firewall) ours(r chainRule, chain string) bool {
	if r.marked {
		return r.comment == f.mark
	}
	return f.legacyOwner() && chain == FirewallChain
}

func isWildcard(iface string) bool { return strings.HasSuffix(iface, "+") }

// sync makes the rules of this owner match s, from one listing per command
// and in one transaction per command. Caller holds Manager.mu.
func (f *firewall) sync(ctx context.Context, s fwSpec) (int, error) {
	if !f.enabled() {
		return 0, nil
	}
	ul := ""
	if s.underlay {
		ul = f.underlayBin(s.v6)
		if ul == "" && !f.warnedNoUnderlay {
			f.warnedNoUnderlay = true
			f.log.Warn("no iptables command of the underlay's family: VXLAN is accepted from any host", "ipv6", s.v6)
		}
	}
	tables := []string{"filter"}
	if s.shared != sharedKeep {
		tables = append(tables, "raw")
	}
	if s.bridges != nil || s.gone != nil || s.shared != sharedKeep {
		tables = append(tables, "nat")
	}
	var next map[netip.Addr]bool // written by the underlay command's plan only
	changes, err := f.eachParallel(ctx, func(bin string) (batch, error) {
		l, err := f.list(ctx, bin, tables...)
		if err != nil {
			return nil, err
		}
		var b batch
		if s.underlay || s.shared == sharedWant {
			f.planBase(&b, l)
		}
		if s.underlay {
			lines, _ := l.chain("filter", InputChain)
			if n := f.planUnderlay(&b, bin, bin == ul, lines, s); bin == ul {
				next = n
			}
		} else if s.shared == sharedDrop {
			// No network of ours is left: nor is any VXLAN device of
			// ours, and a filter left on the port would outlive the
			// plugin (docker plugin rm) and drop another VXLAN user's
			// traffic there. The first network's sync writes it again
			// before its VXLAN device exists.
			lines, _ := l.chain("filter", InputChain)
			for _, line := range lines {
				if r := parseRule(line); f.ownUnderlayRule(r) {
					b.add(slices.Concat([]string{"-D", InputChain}, r.fields)...)
				}
			}
		}
		f.planForward(&b, bin, l, s)
		f.planInput(&b, bin, l, s)
		f.planNat(&b, bin, l, s)
		if s.shared != sharedKeep {
			f.planRaw(&b, l, s)
		}
		return b, nil
	})
	switch {
	case s.underlay && err != nil, !s.underlay && s.shared == sharedDrop:
		f.allowed = nil // unknown (or none): read back next time
	case s.underlay && ul != "":
		f.allowed = next
	}
	return changes, err
}

// ownUnderlayRule reports whether r, a rule of InputChain, is one of this
// owner's underlay filter rules (a VXLAN port's, for no interface and no
// destination), of any port.
func (f *firewall) ownUnderlayRule(r chainRule) bool {
	return r.marked && r.comment == f.mark && r.value("--dport") != "" && len(r.ifaces) == 0 && r.value("-d") == ""
}

// underlayTarget tells what an underlay filter rule does: drop for the
// drop rule, vtep for a RETURN that allows one VTEP; neither for any other.
func underlayTarget(r chainRule) (vtep netip.Addr, drop bool) {
	src, target := r.value("-s"), r.value("-j")
	switch {
	case src == "" && target == "DROP":
		return netip.Addr{}, true
	case src != "" && target == "RETURN":
		if p, err := netip.ParsePrefix(src); err == nil && p.IsSingleIP() {
			return p.Addr(), false
		}
	}
	return netip.Addr{}, false
}

// planBase makes both chains exist and be jumped to from FORWARD (after
// DOCKER-USER, forwardJumps) and INPUT (first, unconditionally).
func (f *firewall) planBase(b *batch, l listing) {
	for _, c := range []struct {
		from, to string
		conds    [][]string
	}{{"FORWARD", FirewallChain, forwardJumps()}, {"INPUT", InputChain, [][]string{nil}}} {
		if _, ok := l.chain("filter", c.to); !ok {
			b.add("-N", c.to)
		}
		from, _ := l.chain("filter", c.from)
		placeJumps(b, from, c.from, c.to, c.conds)
	}
}

// planUnderlay plans the underlay filter of ensureInput in one command's
// InputChain and returns the allowed set after the write (isUL: the
// command of the underlay's family).
func (f *firewall) planUnderlay(b *batch, bin string, isUL bool, lines []string, s fwSpec) map[netip.Addr]bool {
	have := map[netip.Addr]bool{}
	haveDrop := false
	dport := strconv.Itoa(s.port)
	for _, line := range lines {
		r := parseRule(line)
		if !f.ownUnderlayRule(r) {
			continue // another owner's, or not a VXLAN rule
		}
		var keep bool
		if isUL && r.value("--dport") == dport {
			switch vtep, drop := underlayTarget(r); {
			case drop:
				keep, haveDrop = true, true
			case vtep.IsValid() && (s.vteps[vtep] || !s.prune):
				keep, have[vtep] = true, true
			}
		}
		if !keep {
			b.add(slices.Concat([]string{"-D", InputChain}, r.fields)...)
		}
	}
	if !isUL {
		return nil
	}
	for _, v := range sortedAddrs(s.vteps) {
		if !have[v] {
			b.add(slices.Concat([]string{"-I", InputChain, "1"}, allowRule(v, s.port, f.mark))...)
			if s.added != nil {
				s.added.vteps = append(s.added.vteps, v)
			}
		}
	}
	if !haveDrop {
		b.add(slices.Concat([]string{"-A", InputChain}, vxlanDropRule(s.port, f.mark))...)
		if s.added != nil {
			s.added.drop = true
		}
	}
	for v := range s.vteps {
		have[v] = true
	}
	return have
}

// planForward plans our rules of FirewallChain: with sharedWant exactly
// the wildcard rules (per-bridge rules of older versions go: the wildcard
// covers them), with sharedDrop none, with sharedKeep the rules of gone
// bridges go. With sharedWant the ACCEPT of bridged frames is also kept
// above every egress network's rules: in the host's namespace every
// bridged frame walks the chain, and each rule above the ACCEPT costs it
// about 35 ns (BENCHMARKS.md, twenty-fourth round). It gives a bridged
// frame the verdict their rules would: their first and last rules accept
// it and their DROPs spare it.
func (f *firewall) planForward(b *batch, bin string, l listing, s fwSpec) {
	accept, drops := forwardRules(f.mark)
	acceptText := strings.Join(accept, " ")
	// egressAbove: a rule of an egress network that stays sits above
	// our ACCEPT (the scan, which marks the ACCEPT in have when it
	// passes it, has not passed it yet).
	var egressAbove bool
	if s.gateways {
		drops = append(drops, gatewayForwardRules(f.mark)...)
	}
	want := map[string]bool{}
	if s.shared == sharedWant {
		for _, r := range append([][]string{accept}, drops...) {
			want[strings.Join(r, " ")] = true
		}
	}
	// egressOf tells the interface whose egress rules a rule is, if it
	// is one; egressSeen collects them in chain order.
	egressOf := map[string]string{}
	for _, br := range sortedBridges(s.bridges) {
		for _, r := range egressRules(br, f.mark) {
			egressOf[strings.Join(r, " ")] = br
		}
	}
	egressSeen := map[string][]string{}
	have := map[string]bool{}
	lines, _ := l.chain("filter", FirewallChain)
	for _, line := range lines {
		r := parseRule(line)
		if !f.ours(r, FirewallChain) {
			continue
		}
		text := strings.Join(r.fields, " ")
		if want[text] && !have[text] {
			have[text] = true
			continue
		}
		if i := egressIface(r, f.mark); i != "" {
			// Another network's egress rules stay unless it is gone;
			// a planned network's are checked as a whole below.
			switch br, planned := egressOf[text]; {
			case s.gone[i], s.complete && !hasBridge(s.bridges, i), s.shared == sharedDrop:
				b.add(slices.Concat([]string{"-D", FirewallChain}, r.fields)...)
			case planned && s.bridges[br].Egress && !f.v6[bin]:
				egressSeen[br] = append(egressSeen[br], text)
				egressAbove = egressAbove || !have[acceptText]
			case hasBridge(s.bridges, i):
				b.add(slices.Concat([]string{"-D", FirewallChain}, r.fields)...)
			default:
				egressAbove = egressAbove || !have[acceptText]
			}
			continue
		}
		del := s.shared != sharedKeep
		for _, i := range r.ifaces {
			if s.gone[i] || (s.complete && netIface(i) && !hasBridge(s.bridges, i)) {
				del = true
			}
		}
		if del {
			b.add(slices.Concat([]string{"-D", FirewallChain}, r.fields)...)
		}
	}
	// Each egress network's rules, exactly and in order, above the shared
	// DROPs: a set that is not whole is written again, at the top, or
	// right under our ACCEPT when that is the chain's first rule and
	// stays (no move then: an iptables-restore that deletes a rule by
	// its text costs iptables-nft about 10 ms more, issue 16).
	at := "1"
	if len(lines) > 0 && s.shared != sharedDrop {
		if r := parseRule(lines[0]); f.ours(r, FirewallChain) && strings.Join(r.fields, " ") == acceptText {
			at = "2"
		}
	}
	if !f.v6[bin] && s.shared != sharedDrop {
		for _, br := range sortedBridges(s.bridges) {
			if !s.bridges[br].Egress {
				continue
			}
			rules := egressRules(br, f.mark)
			texts := make([]string, len(rules))
			for i, r := range rules {
				texts[i] = strings.Join(r, " ")
			}
			if slices.Equal(egressSeen[br], texts) {
				continue
			}
			for _, t := range egressSeen[br] {
				b.add(slices.Concat([]string{"-D", FirewallChain}, strings.Fields(t))...)
			}
			for i := len(rules) - 1; i >= 0; i-- {
				b.add(slices.Concat([]string{"-I", FirewallChain, at}, rules[i])...)
			}
			egressAbove = egressAbove || at == "1"
		}
	}
	if s.shared != sharedWant {
		return
	}
	switch {
	case !have[acceptText]:
		b.add(slices.Concat([]string{"-I", FirewallChain, "1"}, accept)...)
	case egressAbove && f.restore[bin] != "":
		// Moved to the top in the same transaction (iptables-restore
		// applies a table's writes at once), so that no bridged frame
		// meets the chain without it. Written one command at a time,
		// the move would leave that gap, and the rules stay where they
		// are.
		b.add(slices.Concat([]string{"-D", FirewallChain}, accept)...)
		b.add(slices.Concat([]string{"-I", FirewallChain, "1"}, accept)...)
	}
	for _, d := range drops {
		if !have[strings.Join(d, " ")] {
			b.add(slices.Concat([]string{"-A", FirewallChain}, d)...)
		}
	}
}

func hasBridge(m map[string]Network, br string) bool { _, ok := m[br]; return ok }

// planInput plans our internal-network and link-local rules of
// InputChain (the underlay rules are planUnderlay's).
func (f *firewall) planInput(b *batch, bin string, l listing, s fwSpec) {
	lines, _ := l.chain("filter", InputChain)
	type want struct {
		rule []string
		top  bool
	}
	var wants []want
	var apiReturns = map[string]bool{}
	for _, br := range sortedBridges(s.bridges) {
		n := s.bridges[br]
		if n.Internal {
			replies, drop := internalRules(br, f.mark)
			wants = append(wants, want{replies, true}, want{drop, false})
		}
	}
	var rejects []string
	ll := s.ll
	if f.v6[bin] {
		ll = netip.Addr{} // the address is IPv4
	}
	if ll.IsValid() {
		if s.shared == sharedWant {
			host, drop := linkLocalHostRules(ll, f.mark)
			wr := linkLocalWildcardRules(ll, f.mark)
			rejects = append(rejects, strings.Join(wr[2], " "))
			if s.gateways {
				gr := linkLocalGatewayRules(ll, f.mark)
				rejects = append(rejects, strings.Join(gr[2], " "))
				wr = append(wr, gr...)
			}
			for _, r := range append(wr, host) {
				wants = append(wants, want{r, true})
			}
			wants = append(wants, want{drop, false})
		}
		if s.shared != sharedDrop {
			for _, br := range sortedBridges(s.bridges) {
				if s.bridges[br].ConsulAPI {
					r := linkLocalAPIRule(ll, br, f.mark)
					apiReturns[strings.Join(r, " ")] = true
					wants = append(wants, want{r, true})
				}
			}
		}
	}
	wanted := map[string]bool{}
	for _, w := range wants {
		wanted[strings.Join(w.rule, " ")] = true
	}
	cur := ""
	if ll.IsValid() {
		cur = netip.PrefixFrom(ll, 32).String()
	}
	have := map[string]bool{}
	rejectAt, rejectsSeen := -1, 0 // the first wildcard REJECT of ours, how many there are
	var apiSeen []chainRule        // our API RETURNs, in chain order, with their index
	var apiIdx []int
	for i, line := range lines {
		r := parseRule(line)
		if !r.marked || r.comment != f.mark {
			continue
		}
		dst := r.value("-d")
		if dst == "" && len(r.ifaces) == 0 {
			continue // an underlay rule
		}
		text := strings.Join(r.fields, " ")
		if wanted[text] && !have[text] {
			have[text] = true
			if slices.Contains(rejects, text) {
				if rejectAt < 0 {
					rejectAt = i
				}
				rejectsSeen++
			}
			if apiReturns[text] {
				apiSeen, apiIdx = append(apiSeen, r), append(apiIdx, i)
			}
			continue
		}
		iface := ""
		if len(r.ifaces) > 0 {
			iface = r.ifaces[0]
		}
		var del bool
		switch {
		case s.gone[iface]:
			del = true
		case netIface(iface) && hasBridge(s.bridges, iface):
			del = true // a rule of a bridge we plan: not wanted
		case netIface(iface) && s.complete:
			del = true // a bridge not desired
		case dst == "":
			// an internal network's rule of a bridge we do not plan
		case s.shared == sharedKeep:
		case dst != cur, s.shared == sharedDrop:
			del = true
		case !netIface(iface):
			del = true // a host-wide or wildcard rule that differs
		case r.value("--dport") != strconv.Itoa(LinkLocalAPIPort) || r.value("-j") != "RETURN":
			del = true // an older version's per-bridge DNS or REJECT rule: the wildcard covers it
		}
		if del {
			b.add(slices.Concat([]string{"-D", InputChain}, r.fields)...)
		}
	}
	// A bridge's API RETURN must precede the wildcard REJECT: one that
	// follows it, or that the REJECT inserted now would precede, is
	// inserted again above it in the same transaction.
	for k, r := range apiSeen {
		if len(rejects) > 0 && (rejectsSeen < len(rejects) || apiIdx[k] > rejectAt) {
			b.add(slices.Concat([]string{"-D", InputChain}, r.fields)...)
			delete(have, strings.Join(r.fields, " "))
		}
	}
	for _, w := range wants { // the REJECT before the API RETURNs: each -I 1 lands on top
		text := strings.Join(w.rule, " ")
		if have[text] || apiReturns[text] {
			continue
		}
		if w.top {
			b.add(slices.Concat([]string{"-I", InputChain, "1"}, w.rule)...)
		} else {
			b.add(slices.Concat([]string{"-A", InputChain}, w.rule)...)
		}
		have[text] = true
	}
	for _, w := range wants {
		text := strings.Join(w.rule, " ")
		if apiReturns[text] && !have[text] {
			b.add(slices.Concat([]string{"-I", InputChain, "1"}, w.rule)...)
			have[text] = true
		}
	}
}

func sortedBridges(m map[string]Network) []string {
	out := make([]string, 0, len(m))
	for br := range m {
		out = append(out, br)
	}
	slices.Sort(out)
	return out
}

// planRaw plans the NOTRACK rule in the raw table's PREROUTING.
func (f *firewall) planRaw(b *batch, l listing, s fwSpec) {
	want := strings.Join(notrackRule(f.mark), " ")
	wanted := s.shared == sharedWant && s.notrack
	have := false
	lines, _ := l.chain("raw", "PREROUTING")
	for _, line := range lines {
		r := parseRule(line)
		if !r.marked || r.comment != f.mark {
			continue
		}
		if text := strings.Join(r.fields, " "); wanted && text == want && !have {
			have = true
			continue
		}
		b.addIn("raw", slices.Concat([]string{"-D", "PREROUTING"}, r.fields)...)
	}
	if wanted && !have {
		b.addIn("raw", slices.Concat([]string{"-A", "PREROUTING"}, notrackRule(f.mark))...)
	}
}

// fwSpec is the firewall spec of this Manager's settings for bridges.
// Caller holds m.mu.
func (m *Manager) fwSpec(bridges map[string]Network, sh shared) fwSpec {
	return fwSpec{
		port:     m.cfg.Port,
		v6:       m.cfg.VTEP.Is6(),
		vteps:    m.wantVTEPs(),
		bridges:  bridges,
		shared:   sh,
		ll:       m.cfg.LinkLocal,
		notrack:  m.fw.notrack,
		gateways: m.dp != nil,
	}
}

// fwIface is the interface the firewall rules of network vni name: its
// bridge, or its gateway link when its bridge is in the data-plane
// namespace. hostLinks, the names of the host's links, tells which (nil:
// a Manager without a data-plane namespace, the bridge).
func fwIface(vni uint32, hostLinks map[string]bool) string {
	if hostLinks == nil || hostLinks[BridgeName(vni)] || hostLinks[VXLANName(vni)] {
		return BridgeName(vni)
	}
	return GatewayName(vni)
}

// hostLinkNames are the names of the host's links when the Manager has a
// data-plane namespace (fwIface), nil otherwise. Caller holds m.mu.
func (m *Manager) hostLinkNames() (map[string]bool, error) {
	if m.dp == nil {
		return nil, nil
	}
	links, err := m.host.linkList()
	if err != nil {
		return nil, err
	}
	names := make(map[string]bool, len(links))
	for _, l := range links {
		names[l.Attrs().Name] = true
	}
	return names, nil
}

// hasOwnBridge reports whether a bridge of this owner other than except
// is in either namespace: a network of ours is left. Caller holds m.mu.
func (m *Manager) hasOwnBridge(except string) (bool, error) {
	for _, ns := range m.namespaces() {
		links, err := ns.linkList()
		if err != nil {
			return false, err
		}
		for _, l := range links {
			if name := l.Attrs().Name; name != except && m.owns(l) && bridgeNameRE.MatchString(name) {
				return true, nil
			}
		}
	}
	return false, nil
}

// releaseFirewall removes the rules of network vni (gone or going), on its
// bridge and on its gateway link, and the shared rules if no other bridge
// of ours is left in either namespace. Caller holds m.mu.
func (m *Manager) releaseFirewall(ctx context.Context, vni uint32, ch *Changes) error {
	br := BridgeName(vni)
	if !m.fw.enabled() {
		return nil
	}
	sh := sharedDrop
	if has, err := m.hasOwnBridge(br); err != nil {
		return err
	} else if has {
		sh = sharedKeep
	}
	s := m.fwSpec(nil, sh)
	s.gone = map[string]bool{br: true, GatewayName(vni): true}
	k, err := m.fw.sync(ctx, s)
	ch.Rules += k
	if err != nil {
		return fmt.Errorf("firewall rules of %q: %w", br, err)
	}
	return nil
}
