package vxlan

import (
	"fmt"
	"sort"

	"github.com/vishvananda/netlink"
)

// ForeignOwners lists the links that carry another consul-overlay
// instance's mark, by that instance's owner ("" is the default instance):
// overlays this Manager will never touch, in its namespace and its
// data-plane namespace. A plugin that finds some at start, and none of its
// own, was most likely restarted with another KV_PREFIX or store, and says
// so.
//
// Equivalent to: `ip -o link show | grep 'alias consul-overlay'`.
func (m *Manager) ForeignOwners() (map[string][]string, error) {
	out := map[string][]string{}
	for _, ns := range m.namespaces() {
		o, err := ForeignOwners(ns.nl, m.cfg.Owner)
		if err != nil {
			return nil, err
		}
		for owner, names := range o {
			out[owner] = append(out[owner], names...)
		}
	}
	for _, names := range out {
		sort.Strings(names)
	}
	return out, nil
}

// ForeignOwners is Manager.ForeignOwners without a Manager (whose creation
// writes sysctls and firewall rules), for read-only tools: the links in h's
// namespace (nil: the current one) marked by an instance other than owner.
func ForeignOwners(h *netlink.Handle, owner string) (map[string][]string, error) {
	if h == nil {
		var err error
		if h, err = netlink.NewHandle(); err != nil {
			return nil, fmt.Errorf("open netlink handle: %w", err)
		}
		defer h.Close()
	}
	links, err := retryDump(h.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	mine := OwnerMark(owner)
	out := map[string][]string{}
	for _, l := range links {
		a := l.Attrs()
		o, ok := ownerOfMark(a.Alias)
		if !ok || a.Alias == mine {
			continue
		}
		out[o] = append(out[o], a.Name)
	}
	for _, names := range out {
		sort.Strings(names)
	}
	return out, nil
}
