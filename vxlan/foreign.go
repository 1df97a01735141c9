package vxlan

import "sort"

// ForeignOwners lists the links that carry another consul-overlay
// instance's mark, by that instance's owner ("" is the default instance):
// overlays this Manager will never touch. A plugin that finds some at
// start, and none of its own, was most likely restarted with another
// KV_PREFIX or store, and says so.
//
// Equivalent to: `ip -o link show | grep 'alias consul-overlay'`.
func (m *Manager) ForeignOwners() (map[string][]string, error) {
	links, err := m.linkList()
	if err != nil {
		return nil, err
	}
	out := map[string][]string{}
	for _, l := range links {
		a := l.Attrs()
		owner, ok := ownerOfMark(a.Alias)
		if !ok || a.Alias == m.mark {
			continue
		}
		out[owner] = append(out[owner], a.Name)
	}
	for _, names := range out {
		sort.Strings(names)
	}
	return out, nil
}
