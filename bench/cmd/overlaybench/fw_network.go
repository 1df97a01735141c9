package main

import (
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/vishvananda/netlink"

	"consul-overlay/bench/harness"
)

// benchNetwork measures `docker network create` and `docker network rm`
// at the protocol level on host 1 of a two-host cluster that already has
// networks: the NetworkDriver.CreateNetwork and DeleteNetwork calls alone
// (the IPAM calls dockerd makes around them are timed apart), against the
// least a network costs the kernel: a bridge and a VXLAN device created,
// enslaved and set up by netlink (and deleted).
func benchNetwork(t *runner, cfg *config, rep *report) {
	sec := rep.section("Network create and delete (protocol level)")
	c := harness.NewCluster(t, 2, harness.ClusterOptions{Bin: cfg.bin, LogLevel: "info"})
	const warmup = 3
	n, others := 40, 20
	if cfg.quick {
		n, others = 15, 5
	}
	p := c.Plugins[1]
	// Networks already there: the cost of a new one must not grow with them.
	for i := range others {
		if _, err := p.CreateNetwork(harness.NetSpec{Subnet4: fmt.Sprintf("10.213.%d.0/24", i), Options: map[string]string{"name": fmt.Sprintf("other-%d", i)}}); err != nil {
			t.Fatal(err)
		}
	}
	h := c.Hosts[1].NS.Handle()
	vtep := c.Hosts[1].Addr.AsSlice()
	baseline := func(i int) (create, del time.Duration, err error) {
		start := time.Now()
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: fmt.Sprintf("bnbr%d", i), MTU: 1450}}
		if err := h.LinkAdd(br); err != nil {
			return 0, 0, fmt.Errorf("bridge: %w", err)
		}
		vx := &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: fmt.Sprintf("bnvx%d", i), MTU: 1450, MasterIndex: 0}, VxlanId: 0xfff000 + i, SrcAddr: vtep, Port: 4790, Proxy: true}
		if err := h.LinkAdd(vx); err != nil {
			return 0, 0, fmt.Errorf("vxlan: %w", err)
		}
		brl, err := h.LinkByName(br.Name)
		if err == nil {
			err = h.AddrAdd(brl, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 214, byte(i), 1), Mask: net.CIDRMask(24, 32)}})
		}
		var vxl netlink.Link
		if err == nil {
			vxl, err = h.LinkByName(vx.Name)
		}
		if err == nil {
			err = h.LinkSetMaster(vxl, brl)
		}
		if err == nil {
			err = h.LinkSetUp(vxl)
		}
		if err == nil {
			err = h.LinkSetUp(brl)
		}
		if err != nil {
			return 0, 0, fmt.Errorf("baseline network %d: %w", i, err)
		}
		create = time.Since(start)
		start = time.Now()
		if err := h.LinkDel(vxl); err != nil {
			return 0, 0, err
		}
		if err := h.LinkDel(brl); err != nil {
			return 0, 0, err
		}
		return create, time.Since(start), nil
	}

	var createT, deleteT, ipamT, baseC, baseD []time.Duration // ipamT: IPAM + CreateNetwork, as dockerd calls them
	for i := range warmup + n {
		bc, bd, err := baseline(i)
		if err != nil {
			t.Fatal(err)
		}
		spec := harness.NetSpec{Subnet4: fmt.Sprintf("10.215.%d.0/24", i), Options: map[string]string{"name": fmt.Sprintf("net-%d", i)}}
		t0 := time.Now()
		nw, err := p.CreateNetwork(spec)
		if err != nil {
			t.Fatalf("network %d: %v", i, err)
		}
		total := time.Since(t0)
		// The harness's CreateNetwork is IPAM then the driver call; time
		// the driver call alone by deleting and creating it again.
		if err := p.Call("/NetworkDriver.DeleteNetwork", map[string]any{"NetworkID": nw.ID}, nil); err != nil {
			t.Fatal(err)
		}
		req := map[string]any{
			"NetworkID": nw.ID,
			"Options": map[string]any{
				"com.docker.network.generic":     spec.Options,
				"com.docker.network.enable_ipv4": true,
			},
			"IPv4Data": []map[string]any{{"AddressSpace": nw.Space, "Pool": nw.Subnet4, "Gateway": nw.Gateway4}},
		}
		t1 := time.Now()
		if err := p.Call("/NetworkDriver.CreateNetwork", req, nil); err != nil {
			t.Fatalf("network %d again: %v", i, err)
		}
		create := time.Since(t1)
		t2 := time.Now()
		if err := p.Call("/NetworkDriver.DeleteNetwork", map[string]any{"NetworkID": nw.ID}, nil); err != nil {
			t.Fatal(err)
		}
		del := time.Since(t2)
		ip, _, _ := strings.Cut(nw.Gateway4, "/")
		if err := p.Call("/IpamDriver.ReleaseAddress", map[string]any{"PoolID": nw.Pool4, "Address": ip}, nil); err != nil {
			t.Fatal(err)
		}
		if err := p.Call("/IpamDriver.ReleasePool", map[string]any{"PoolID": nw.Pool4}, nil); err != nil {
			t.Fatal(err)
		}
		if i < warmup {
			continue
		}
		createT, deleteT, ipamT = append(createT, create), append(deleteT, del), append(ipamT, total)
		baseC, baseD = append(baseC, bc), append(baseD, bd)
	}
	fmt.Fprintf(sec, "%d networks created and deleted one after the other on host1 of a two-host cluster that has %d other networks "+
		"(after %d not counted). CreateNetwork is the NetworkDriver call alone (a second call after a DeleteNetwork, so that the IPAM "+
		"calls dockerd makes first are timed apart). Baseline, interleaved: a bridge with its address and a VXLAN device created, "+
		"enslaved and set up by netlink, then deleted: the kernel's part.\n\n", n, others, warmup)
	fmt.Fprintln(sec, "| Step | p50 ms | p99 ms | mean ms | max ms |")
	fmt.Fprintln(sec, "|---|---:|---:|---:|---:|")
	for _, r := range []struct {
		name string
		d    []time.Duration
	}{
		{"**CreateNetwork**", createT},
		{"baseline: bridge + VXLAN device by netlink", baseC},
		{"DeleteNetwork", deleteT},
		{"baseline: delete them by netlink", baseD},
		{"IPAM (RequestPool + gateway address) + CreateNetwork, as dockerd calls them", ipamT},
	} {
		d := summarize(durationsMS(r.d))
		fmt.Fprintf(sec, "| %s | %s | %s | %s | %s |\n", r.name, f(d.p50), f(d.p99), f(d.mean), f(d.mx))
	}
	ct, bt := summarize(durationsMS(createT)), summarize(durationsMS(baseC))
	dt, bd := summarize(durationsMS(deleteT)), summarize(durationsMS(baseD))
	fmt.Fprintf(sec, "\nCreateNetwork ÷ baseline: p50 %s, p99 %s. DeleteNetwork ÷ baseline: p50 %s.\n",
		fr(ratio(ct.p50, bt.p50)), fr(ratio(ct.p99, bt.p99)), fr(ratio(dt.p50, bd.p50)))
	rep.check("CreateNetwork (protocol level) p50", f(ct.p50)+" ms", "≤ 30 ms", ct.p50 <= 30)
	rep.info("DeleteNetwork (protocol level) p50 / p99", fmt.Sprintf("%s / %s ms", f(dt.p50), f(dt.p99)))
}
