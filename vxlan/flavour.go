package vxlan

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"time"
)

// Which flavour of iptables the host's firewall uses.
//
// iptables comes in two flavours that program different kernel tables: the
// nft flavour (xtables-nft-multi, the nf_tables kernel API; Debian 11 and
// later, RHEL 8 and later) and the legacy one (xtables-legacy-multi, the
// x_tables API; older hosts, and hosts switched back with
// update-alternatives). Rules written in the flavour the host does not use
// are loaded and silently ineffective: packets pass both, and dockerd's
// FORWARD policy DROP in the other still drops the overlay's bridged
// traffic. So, when the commands are not configured (Config.IPTables and
// IP6Tables both ""), the Manager asks each flavour's save command what it
// holds and programs the one that holds dockerd's chains (DOCKER,
// DOCKER-USER, ...), or else the one with more rules, or else the nft one,
// the default of current distributions. The plugin's rootfs carries both
// (scripts/plugin-rootfs.sh).
//
// A managed plugin starts before dockerd sets its chains up (at boot,
// dockerd starts its plugins before its networking): while neither flavour
// holds a rule of anyone but consul-overlay, the choice is provisional. A
// Manager then makes it again in the background (watchFlavour: after 1 s,
// doubling to 30 s, for ten minutes), and once a flavour other than the
// provisional one holds dockerd's rules, it moves its rules there: all of
// them written in the new flavour, then its own removed from the old one
// (moveFirewall). Rules of consul-overlay do not count: the provisional
// flavour holds them from the first write on, and counting them made that
// first write settle the choice, on a legacy host in the flavour dockerd
// does not use.

// flavourNames are the flavours, the default first.
var flavourNames = []string{"nft", "legacy"}

// flavourState is what one flavour's save commands show.
type flavourState struct {
	name                string // "nft" or "legacy"
	iptables, ip6tables string // its commands, "" when missing
	dockerChains        int    // chains named DOCKER*
	rules               int    // rules ("-A" lines), consul-overlay's not counted
	ours                int    // consul-overlay's rules, of any owner
}

// flavourChoice is the flavour chosen, and why.
type flavourChoice struct {
	flavourState
	reason string
	// settled: a flavour held rules; the choice is not made again.
	settled bool
	// others are the flavours not chosen, as probed.
	others []flavourState
}

// flavourDetector makes the choice; lookPath and save are exec.LookPath
// and a run of a save command, replaced in tests.
type flavourDetector struct {
	log      *slog.Logger
	lookPath func(name string) (string, error)
	save     func(ctx context.Context, bin string) (string, error)
}

func newFlavourDetector(log *slog.Logger) *flavourDetector {
	return &flavourDetector{log: log, lookPath: exec.LookPath, save: runSave}
}

// runSave runs `<bin> -t filter` and `<bin> -t nat` (an iptables-save)
// and returns their output; a table the flavour does not have is no error.
func runSave(ctx context.Context, bin string) (string, error) {
	// Both tables at once (issue 16: the probe's commands one after the
	// other were 0.1-0.2 s of every start).
	tables := []string{"filter", "nat"}
	outs := make([][]byte, len(tables))
	var wg sync.WaitGroup
	for i, table := range tables {
		wg.Add(1)
		go func() {
			defer wg.Done()
			outs[i], _ = exec.CommandContext(ctx, bin, "-t", table).Output() // a table the flavour lacks: none
		}()
	}
	wg.Wait()
	if ctx.Err() != nil {
		return "", fmt.Errorf("%s: %w", bin, ctx.Err())
	}
	return string(bytes.Join(outs, nil)), nil
}

// probe reads what each flavour holds. A flavour without an iptables
// command is left out.
func (d *flavourDetector) probe(ctx context.Context) []flavourState {
	var states []flavourState
	type saved struct {
		state int // index in states
		bin   string
		out   string
		err   error
	}
	var runs []*saved
	for _, name := range flavourNames {
		st := flavourState{name: name}
		st.iptables, _ = d.lookPath("iptables-" + name)
		st.ip6tables, _ = d.lookPath("ip6tables-" + name)
		if st.iptables == "" && st.ip6tables == "" {
			continue
		}
		states = append(states, st)
		for _, cmd := range []string{"iptables-" + name + "-save", "ip6tables-" + name + "-save"} {
			if bin, err := d.lookPath(cmd); err == nil {
				runs = append(runs, &saved{state: len(states) - 1, bin: bin})
			}
		}
	}
	// Every save command at once: they only read.
	var wg sync.WaitGroup
	for _, r := range runs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.out, r.err = d.save(ctx, r.bin)
		}()
	}
	wg.Wait()
	for _, r := range runs {
		if r.err != nil {
			d.log.Warn("firewall flavour probe failed", "command", r.bin, "error", r.err)
			continue
		}
		st := &states[r.state]
		for _, line := range strings.Split(r.out, "\n") {
			switch {
			case strings.HasPrefix(line, ":DOCKER"):
				st.dockerChains++
			case strings.HasPrefix(line, "-A ") && consulOverlayRule(line):
				st.ours++
			case strings.HasPrefix(line, "-A "):
				st.rules++
			}
		}
	}
	return states
}

// consulOverlayRule reports whether a saved rule is consul-overlay's, of
// any owner: in or jumping to one of its chains, or carrying an owner mark
// as its comment. The probe does not count them.
func consulOverlayRule(line string) bool {
	return strings.Contains(line, FirewallChain) ||
		strings.Contains(line, "--comment "+OwnerAlias) || strings.Contains(line, `--comment "`+OwnerAlias)
}

// chooseFlavour picks among the probed flavours; ok is false when there is
// none (no flavour-named iptables command: the caller keeps "iptables").
func chooseFlavour(states []flavourState) (c flavourChoice, ok bool) {
	c, ok = chooseAmong(states)
	for _, st := range states {
		if ok && st.name != c.name {
			c.others = append(c.others, st)
		}
	}
	return c, ok
}

func chooseAmong(states []flavourState) (c flavourChoice, ok bool) {
	if len(states) == 0 {
		return c, false
	}
	if len(states) == 1 {
		return flavourChoice{flavourState: states[0], reason: "the only flavour installed", settled: true}, true
	}
	var withDocker []flavourState
	for _, st := range states {
		if st.dockerChains > 0 {
			withDocker = append(withDocker, st)
		}
	}
	if len(withDocker) == 1 {
		return flavourChoice{flavourState: withDocker[0], reason: "it holds dockerd's chains", settled: true}, true
	}
	best := states[0]
	for _, st := range states[1:] {
		if st.rules > best.rules {
			best = st
		}
	}
	switch {
	case best.rules == 0:
		return flavourChoice{flavourState: states[0], reason: "no flavour holds rules yet: the default, chosen again before the next firewall write"}, true
	case len(withDocker) > 1:
		return flavourChoice{flavourState: best, reason: "both hold dockerd's chains: the one with more rules", settled: true}, true
	default:
		return flavourChoice{flavourState: best, reason: "no dockerd chains: the one with more rules", settled: true}, true
	}
}

// detect probes and chooses, within 30 s, and logs the choice (quiet: a
// provisional one only at debug level).
func (d *flavourDetector) detect(ctx context.Context, quiet bool) (flavourChoice, bool) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	states := d.probe(ctx)
	c, ok := chooseFlavour(states)
	if !ok {
		if !quiet {
			d.log.Info("firewall flavour: no iptables-nft or iptables-legacy in PATH: using iptables as found")
		}
		return c, false
	}
	var seen []string
	for _, st := range states {
		seen = append(seen, fmt.Sprintf("%s: %d docker chains, %d rules", st.name, st.dockerChains, st.rules))
	}
	level := slog.LevelInfo
	if quiet && !c.settled {
		level = slog.LevelDebug
	}
	d.log.Log(ctx, level, "firewall flavour chosen", "flavour", c.name, "iptables", c.iptables, "ip6tables", c.ip6tables,
		"reason", c.reason, "seen", strings.Join(seen, "; "))
	return c, true
}

// commands are the choice's commands for newFirewall ("-" for a missing
// one, which disables it).
func (c flavourChoice) commands() (ipt, ip6t string) {
	ipt, ip6t = c.iptables, c.ip6tables
	if ipt == "" {
		ipt = "-"
	}
	if ip6t == "" {
		ip6t = "-"
	}
	return ipt, ip6t
}

// FirewallDetection is the firewall flavour choice that New makes when
// Config leaves the commands to it, made ahead by DetectFirewall.
type FirewallDetection struct {
	done   chan struct{}
	choice flavourChoice
	ok     bool
	d      *flavourDetector
}

// DetectFirewall makes, in the background, the firewall flavour choice
// New would make (it only runs the save commands, which read): a caller
// starts it early and hands it to Config.Firewall, so that the choice
// overlaps its own start-up (issue 16: 0.1-0.2 s of a restart).
func DetectFirewall(ctx context.Context, log *slog.Logger) *FirewallDetection {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	fd := &FirewallDetection{done: make(chan struct{}), d: newFlavourDetector(log)}
	go func() {
		defer close(fd.done)
		fd.choice, fd.ok = fd.d.detect(ctx, false)
	}()
	return fd
}

// firewall waits for the choice and returns its firewall.
func (fd *FirewallDetection) firewall(log *slog.Logger) *firewall {
	<-fd.done
	if !fd.ok {
		return newFirewall(log, "", "")
	}
	ipt, ip6t := fd.choice.commands()
	f := newFirewall(log, ipt, ip6t)
	f.detector, f.flavour = fd.d, fd.choice
	return f
}

// newDetectedFirewall is newFirewall with the commands of the flavour d
// chooses (plain iptables and ip6tables when PATH has no flavour-named
// ones).
func newDetectedFirewall(ctx context.Context, log *slog.Logger, d *flavourDetector) *firewall {
	c, ok := d.detect(ctx, false)
	if !ok {
		return newFirewall(log, "", "")
	}
	ipt, ip6t := c.commands()
	f := newFirewall(log, ipt, ip6t)
	f.detector, f.flavour = d, c
	return f
}

// flavourWatch is how watchFlavour paces its checks.
type flavourWatch struct {
	first, most time.Duration // the first wait, doubled up to most
	window      time.Duration // how long the choice stays open
}

var defaultFlavourWatch = flavourWatch{first: time.Second, most: 30 * time.Second, window: 10 * time.Minute}

// watchFlavour makes a provisional flavour choice again in the background
// until it is settled, and moves this owner's rules when the host's
// firewall turns out to use the other flavour (recheckFlavour). After the
// window, a choice still provisional is kept. It ends with Close.
func (m *Manager) watchFlavour(w flavourWatch) {
	go func() {
		deadline := time.Now().Add(w.window)
		wait := w.first
		for {
			t := time.NewTimer(wait)
			select {
			case <-m.done:
				t.Stop()
				return
			case <-t.C:
			}
			wait = min(2*wait, w.most)
			if m.recheckFlavour(context.Background(), !time.Now().Before(deadline)) {
				return
			}
		}
	}()
}

// recheckFlavour makes the firewall flavour choice again; it reports
// whether the choice is settled and nothing is left to move. final keeps a
// choice that is still provisional.
func (m *Manager) recheckFlavour(ctx context.Context, final bool) bool {
	m.mu.Lock()
	f := m.fw
	done := f.detector == nil || (f.flavour.settled && f.moveFrom == nil)
	pending := f.moveFrom != nil
	m.mu.Unlock()
	if done {
		return true
	}
	var c flavourChoice
	if !pending {
		// The save commands only read: the probe runs without the lock.
		ok := false
		if c, ok = f.detector.detect(ctx, true); !ok {
			return true // no flavour-named command left: nothing to choose
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if f != m.fw {
		return true
	}
	if !pending {
		switch {
		case !c.settled && !final:
			return false
		case !c.settled:
			f.flavour.settled, f.flavour.others = true, c.others
			m.log.Info("firewall flavour kept: no flavour holds rules of anyone else after the watch window", "flavour", f.flavour.name)
			m.purgeOtherFlavours(ctx)
			return true
		case c.name == f.flavour.name:
			f.flavour = c
			m.log.Info("firewall flavour confirmed now that the host's firewall holds rules", "flavour", c.name, "reason", c.reason)
			m.purgeOtherFlavours(ctx)
			return true
		}
		old := f.flavour
		m.log.Warn("firewall flavour changed now that the host's firewall holds rules: moving this instance's rules to it",
			"from", old.name, "to", c.name, "reason", c.reason)
		f.flavour, f.moveFrom = c, &old
		f.useCommands(c.commands())
		f.allowed = nil // the new flavour's underlay rules are unknown
	}
	if err := m.moveFirewall(ctx, *f.moveFrom); err != nil {
		m.log.Error("firewall rules not moved to the host's flavour yet: overlay traffic may be dropped by dockerd's rules until they are (retried)",
			"from", f.moveFrom.name, "to", f.flavour.name, "error", err)
		return false
	}
	m.log.Info("firewall rules moved", "from", f.moveFrom.name, "to", f.flavour.name)
	f.moveFrom = nil
	return true
}

// moveFirewall writes every rule of this owner in the current flavour,
// then removes this owner's rules from the flavour old: the rules of every
// network of ours in the kernel (its bridge's, or its gateway link's in
// the data-plane layout; an internal network's and a Consul API network's
// as the old flavour holds them), the shared ones,
// the underlay filter and the IPsec marks. The new rules are in place
// before the old go, so isolation never lapses. Caller holds m.mu.
func (m *Manager) moveFirewall(ctx context.Context, old flavourChoice) error {
	prev := m.flavourFirewall(old)
	listings := map[string]listing{}
	for _, bin := range prev.bins {
		l, err := prev.list(ctx, bin, "filter", "raw", "mangle", "nat")
		if err != nil {
			return fmt.Errorf("list the %s flavour's rules: %w", old.name, err)
		}
		listings[bin] = l
	}
	links, err := m.host.linkList()
	if err != nil {
		return err
	}
	// Each network's interface in the host's namespace: its bridge, or
	// its gateway link when it is in the data-plane namespace.
	bridges := map[string]Network{}
	for _, l := range links {
		if name := l.Attrs().Name; m.owns(l) && netIface(name) {
			bridges[name] = prev.heldNetwork(listings, name, m.cfg.LinkLocal)
		}
	}
	sh := sharedWant
	if len(bridges) == 0 {
		sh = sharedDrop
	}
	s := m.fwSpec(bridges, sh)
	s.underlay = len(bridges) > 0
	var ch Changes
	if _, err := m.fw.sync(ctx, s); err != nil {
		return err
	}
	if len(m.sec.encrypted) > 0 {
		if err := m.syncESPRules(ctx, &ch); err != nil {
			return err
		}
	}
	_, err = prev.purge(ctx)
	return err
}

// flavourFirewall is a firewall of this owner in flavour c's commands,
// for its rules there.
func (m *Manager) flavourFirewall(c flavourChoice) *firewall {
	ipt, ip6t := c.commands()
	f := newFirewall(m.log, ipt, ip6t)
	f.mark = m.mark
	return f
}

// purge removes every rule of f's owner from f's commands (planPurge, from
// a fresh listing each) and returns how many it removed.
func (f *firewall) purge(ctx context.Context) (int, error) {
	return f.each(ctx, func(bin string) (batch, error) {
		l, err := f.list(ctx, bin, "filter", "raw", "mangle", "nat")
		if err != nil {
			return nil, err
		}
		return f.planPurge(l), nil
	})
}

// purgeOtherFlavours removes this owner's rules from the flavours not
// chosen that held rules of consul-overlay when probed: left there by a
// move that a kill -9 cut between its write and its purge, or by an
// earlier run that chose the other flavour. Ineffective where the host's
// firewall does not look, they are not harmless: a leftover DROP of
// routed overlay traffic drops what an egress network sends out. Called
// once the choice is settled; failures are logged. Caller holds m.mu.
func (m *Manager) purgeOtherFlavours(ctx context.Context) {
	for _, st := range m.fw.flavour.others {
		if st.ours == 0 {
			continue
		}
		k, err := m.flavourFirewall(flavourChoice{flavourState: st}).purge(ctx)
		switch {
		case err != nil:
			m.log.Error("rules of this instance left in the firewall flavour not chosen, not removed (retried at the next start)",
				"flavour", st.name, "chosen", m.fw.flavour.name, "error", err)
		case k > 0:
			m.log.Warn("removed rules of this instance left in the firewall flavour not chosen (an earlier move cut short, or an earlier choice)",
				"flavour", st.name, "chosen", m.fw.flavour.name, "rules", k)
		}
	}
}

// heldNetwork is the Network whose rules the listings hold for interface
// br (a bridge, or a gateway link):
// Internal if its internal rules are there, ConsulAPI if its Consul API
// rule is, Egress (with the subnets as Gateways) if its masquerade rules
// are.
func (f *firewall) heldNetwork(listings map[string]listing, br string, ll netip.Addr) Network {
	_, drop := internalRules(br, f.mark)
	internal := strings.Join(drop, " ")
	api := ""
	if ll.IsValid() {
		api = strings.Join(linkLocalAPIRule(ll, br, f.mark), " ")
	}
	var n Network
	for _, l := range listings {
		lines, _ := l.chain("filter", InputChain)
		for _, line := range lines {
			switch strings.Join(parseRule(line).fields, " ") {
			case internal:
				n.Internal = true
			case api:
				n.ConsulAPI = api != ""
			}
		}
		lines, _ = l.chain("nat", "POSTROUTING")
		for _, line := range lines {
			r := parseRule(line)
			if !r.marked || r.comment != f.mark || r.value("-o") != br || r.value("-j") != "MASQUERADE" {
				continue
			}
			if p, err := netip.ParsePrefix(r.value("-s")); err == nil && !slices.Contains(n.Gateways, p) {
				n.Egress, n.Gateways = true, append(n.Gateways, p)
			}
		}
	}
	return n
}

// planPurge plans the removal of every rule of this owner from one
// command's listing: its FORWARD and INPUT chains' rules, the NOTRACK rule
// and the IPsec marks. The chains and the jumps to them stay: they are
// shared by every owner and never removed.
func (f *firewall) planPurge(l listing) batch {
	var b batch
	for _, c := range []struct{ table, chain string }{
		{"filter", FirewallChain}, {"filter", InputChain}, {"raw", "PREROUTING"},
		{"mangle", ESPOutChain}, {"mangle", ESPInChain}, {"nat", "POSTROUTING"},
	} {
		lines, _ := l.chain(c.table, c.chain)
		for _, line := range lines {
			r := parseRule(line)
			if c.chain == FirewallChain && !f.ours(r, c.chain) || c.chain != FirewallChain && (!r.marked || r.comment != f.mark) {
				continue
			}
			fields := make([]string, len(r.fields))
			for i, x := range r.fields {
				fields[i] = strings.Trim(x, `"`) // the u32 expression; no field has a space
			}
			b.addIn(c.table, slices.Concat([]string{"-D", c.chain}, fields)...)
		}
	}
	return b
}
