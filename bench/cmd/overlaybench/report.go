package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"sync"
)

// report collects the sections' markdown and the figures checked against
// their targets.
type report struct {
	mu       sync.Mutex
	sections []*section
	checks   []check
}

type section struct {
	title string
	b     strings.Builder
}

func (s *section) Write(p []byte) (int, error) { return s.b.Write(p) }

// check is one figure against its target; target "" is a figure without
// one.
type check struct {
	name, value, target string
	met, skipped        bool
}

func (r *report) section(title string) *section {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := &section{title: title}
	r.sections = append(r.sections, s)
	return s
}

func (r *report) check(name, value, target string, met bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.checks = append(r.checks, check{name: name, value: value, target: target, met: met})
}

func (r *report) info(name, value string) { r.check(name, value, "", true) }

// failed records a section that could not finish.
func (r *report) failed(name string, err error, skipped bool) {
	s := r.section(name + ": not measured")
	what := "FAILED"
	if skipped {
		what = "Skipped"
	}
	fmt.Fprintf(s, "%s: %s\n", what, firstLines(err.Error(), 12))
	r.mu.Lock()
	r.checks = append(r.checks, check{name: name, value: what, target: "runs", skipped: skipped})
	r.mu.Unlock()
}

func firstLines(s string, n int) string {
	l := strings.Split(s, "\n")
	if len(l) > n {
		l = append(l[:n], "...")
	}
	return strings.Join(l, "\n")
}

// markdown renders one run: header, targets table, then the sections.
func (r *report) markdown(header string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b strings.Builder
	b.WriteString(header)
	b.WriteString("\n### Against the targets\n\n| Figure | Value | Target | Met |\n|---|---|---|---|\n")
	for _, c := range r.checks {
		met := "no"
		switch {
		case c.skipped:
			met = "skipped"
		case c.target == "":
			met = "—"
		case c.met:
			met = "yes"
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", c.name, c.value, c.target, met)
	}
	for _, s := range r.sections {
		fmt.Fprintf(&b, "\n### %s\n\n%s", s.title, s.b.String())
	}
	return b.String()
}

// runsMarker separates BENCHMARKS.md's introduction from its runs; each
// run is inserted right below it, so older runs stay below newer ones.
const runsMarker = "<!-- make bench inserts each new run below this line; older runs follow. -->"

// updateFile inserts run into path below the marker, creating the file
// with intro if it does not exist (or has no marker).
func updateFile(path, intro, run string) error {
	old, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	content := string(old)
	head, rest, found := strings.Cut(content, runsMarker)
	if !found {
		head, rest = intro, ""
		if content != "" {
			rest = "\n" + content // keep whatever was there, below
		}
	}
	out := strings.TrimRight(head, "\n") + "\n\n" + runsMarker + "\n\n" + strings.TrimRight(run, "\n") + "\n" + strings.TrimLeft(rest, "\n")
	if rest != "" {
		out = strings.TrimRight(head, "\n") + "\n\n" + runsMarker + "\n\n" + strings.TrimRight(run, "\n") + "\n\n" + strings.TrimLeft(rest, "\n")
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(out), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
