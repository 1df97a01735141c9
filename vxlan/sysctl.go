package vxlan

import (
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// gcThresh are the neighbour table limits Docker's overlay raises: with the
// kernel's default gc_thresh3 of 1024 a host with many peers gets "no
// buffer space available" when adding neighbour entries. Highest first, so
// thresh1 <= thresh2 <= thresh3 holds at every step.
var gcThresh = []struct {
	key  string
	want int
}{
	{"net/ipv4/neigh/default/gc_thresh3", 65536},
	{"net/ipv4/neigh/default/gc_thresh2", 49152},
	{"net/ipv4/neigh/default/gc_thresh1", 8192},
	{"net/ipv6/neigh/default/gc_thresh3", 65536},
	{"net/ipv6/neigh/default/gc_thresh2", 49152},
	{"net/ipv6/neigh/default/gc_thresh1", 8192},
}

// raiseGCThresh raises the neighbour table limits under root (a sysctl
// tree such as /proc/sys), never lowering one. Failures are logged: a
// small table is a capacity limit, not a reason to refuse to start.
// The limits exist only in the initial network namespace.
//
// Equivalent to: `sysctl -w net.ipv4.neigh.default.gc_thresh3=65536` (and
// the others), when the current value is lower.
func raiseGCThresh(root string, log *slog.Logger) {
	for _, s := range gcThresh {
		name := strings.ReplaceAll(s.key, "/", ".")
		path := filepath.Join(root, s.key)
		b, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			log.Info("neighbour table limit not available here (not the initial network namespace?)", "sysctl", name)
			continue
		}
		if err != nil {
			log.Warn("read neighbour table limit", "sysctl", name, "error", err)
			continue
		}
		cur, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			log.Warn("parse neighbour table limit", "sysctl", name, "value", strings.TrimSpace(string(b)), "error", err)
			continue
		}
		if cur >= s.want {
			continue
		}
		if err := os.WriteFile(path, []byte(strconv.Itoa(s.want)), 0o644); err != nil {
			log.Warn("raise neighbour table limit", "sysctl", name, "from", cur, "to", s.want, "error", err)
			continue
		}
		log.Info("neighbour table limit raised", "sysctl", name, "from", cur, "to", s.want)
	}
}

// forwardingOff tells whether IPv4 forwarding is off in the sysctl tree
// root ("" for /proc/sys): a network with Egress routes nothing then.
// dockerd turns it on when it starts (its --ip-forward, on by default).
// A value that cannot be read counts as on: the check is a courtesy, the
// traffic itself tells.
//
// Equivalent to: `sysctl -n net.ipv4.ip_forward` = 0.
func forwardingOff(root string) bool {
	if root == "" {
		root = "/proc/sys"
	}
	b, err := os.ReadFile(filepath.Join(root, "net/ipv4/ip_forward"))
	return err == nil && strings.TrimSpace(string(b)) == "0"
}
