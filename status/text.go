package status

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"consul-overlay/cluster"
)

// WriteJSON writes the report as indented JSON.
func WriteJSON(w io.Writer, r *Report) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteText writes the report for people: this host, the store, the
// networks with their endpoints, the hosts, then the drift.
func WriteText(w io.Writer, r *Report) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	p := func(format string, a ...any) { fmt.Fprintf(tw, format, a...) }
	p("Host:\t%s (id %s)\n", orNone(r.Host.Node), orNone(r.Host.ID))
	p("VTEP:\t%s\n", orNone(r.Host.VTEP))
	reach := "reachable"
	if !r.Store.Reachable {
		reach = "UNREACHABLE: " + r.Store.Error
	}
	p("Store:\t%s %s, prefix %s: %s\n", r.Store.Kind, r.Store.Address, r.Store.Prefix, reach)
	tw.Flush()

	fmt.Fprintf(w, "\nNetworks (%d):\n", len(r.Networks))
	for _, n := range r.Networks {
		name := n.Name
		if name == "" {
			name = "-"
		}
		mtu := "auto"
		if n.MTU > 0 {
			mtu = fmt.Sprint(n.MTU)
		}
		if n.KernelMTU > 0 {
			mtu += fmt.Sprintf(" (here %d)", n.KernelMTU)
		}
		member := ""
		if !n.Member {
			member = ", this host is not a member"
		}
		fmt.Fprintf(w, "  %s  name %s  vni %d  subnets %s  mtu %s%s\n", n.Key, name, n.VNI, strings.Join(n.Subnets, ","), mtu, member)
		if settings := networkSettings(n); settings != "" {
			fmt.Fprintf(w, "    settings: %s\n", settings)
		}
		fmt.Fprintf(w, "    hosts: %s\n", strings.Join(n.Hosts, ", "))
		fmt.Fprintf(w, "    endpoints: %d local, %d remote\n", n.LocalEndpoints, n.RemoteEndpoints)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		for _, e := range n.Endpoints {
			where := "remote"
			if e.Local {
				where = "local"
			}
			fmt.Fprintf(tw, "      %s\t%s\t%s\t%s\t%s\t%s\n", short(e.ID), e.Node, where, orNone(e.IPv4), orNone(e.IPv6), e.MAC)
		}
		tw.Flush()
	}

	writeClusterNetworks(w, r.ClusterNetworks)

	fmt.Fprintf(w, "\nHosts (%d):\n", len(r.Hosts))
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "  NODE\tID\tVTEP\tALIVE\tSTARTED\tNETWORKS\n")
	for _, h := range r.Hosts {
		node := orNone(h.Node)
		if h.Self {
			node += " (this host)"
		}
		alive := "no"
		if h.Alive {
			alive = "yes"
		}
		started := "-"
		if !h.Started.IsZero() {
			started = h.Started.UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%d\n", node, short(h.ID), orNone(h.VTEP), alive, started, h.Networks)
	}
	tw.Flush()

	if len(r.Drift) == 0 {
		fmt.Fprintf(w, "\nDrift: none\n")
	} else {
		fmt.Fprintf(w, "\nDrift (%d):\n", len(r.Drift))
		for _, d := range r.Drift {
			fmt.Fprintf(w, "  %s: %s\n", orNone(d.Network), d)
		}
	}
	if len(r.Errors) > 0 {
		fmt.Fprintf(w, "\nErrors:\n")
		for _, e := range r.Errors {
			fmt.Fprintf(w, "  %s\n", e)
		}
	}
	return nil
}

func orNone(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// networkSettings lists what sets the network apart: internal, and its -o
// options other than those of its first line (name, vni, mtu), sorted;
// "" for none.
func networkSettings(n Network) string {
	var out []string
	if n.Internal {
		out = append(out, "internal")
	}
	for _, k := range slices.Sorted(maps.Keys(n.Options)) {
		switch k {
		case "name", "vni", "mtu", "com.docker.network.driver.mtu":
			continue
		case cluster.OptionEgressDefault:
			if cluster.EgressDefaulted(n.Options) {
				out = append(out, "egress="+n.Options[k]+" (default)")
			}
			continue
		}
		out = append(out, k+"="+n.Options[k])
	}
	return strings.Join(out, ", ")
}
