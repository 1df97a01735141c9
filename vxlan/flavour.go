package vxlan

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os/exec"
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
// A managed plugin may start before dockerd has set its chains up (at
// boot): while neither flavour holds any rule, the choice is provisional
// and is made again before each firewall write (ensureBase, ensureInput),
// until a flavour holds rules.

// flavourNames are the flavours, the default first.
var flavourNames = []string{"nft", "legacy"}

// flavourState is what one flavour's save commands show.
type flavourState struct {
	name                string // "nft" or "legacy"
	iptables, ip6tables string // its commands, "" when missing
	dockerChains        int    // chains named DOCKER*
	rules               int    // rules ("-A" lines)
}

// flavourChoice is the flavour chosen, and why.
type flavourChoice struct {
	flavourState
	reason string
	// settled: a flavour held rules; the choice is not made again.
	settled bool
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
			case strings.HasPrefix(line, "-A "):
				st.rules++
			}
		}
	}
	return states
}

// chooseFlavour picks among the probed flavours; ok is false when there is
// none (no flavour-named iptables command: the caller keeps "iptables").
func chooseFlavour(states []flavourState) (c flavourChoice, ok bool) {
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

// redetect makes a provisional flavour choice again (caller holds
// Manager.mu): once a flavour holds rules, its commands are used from then
// on.
func (f *firewall) redetect(ctx context.Context) {
	if f.detector == nil || f.flavour.settled {
		return
	}
	c, ok := f.detector.detect(ctx, true)
	if !ok || !c.settled {
		return
	}
	if c.name != f.flavour.name {
		f.log.Warn("firewall flavour changed now that the host's firewall holds rules: rules written so far in the other flavour stay there, ineffective",
			"from", f.flavour.name, "to", c.name)
	}
	f.flavour = c
	f.useCommands(c.commands())
	f.allowed = nil // the new flavour's INPUT rules are unknown
}
