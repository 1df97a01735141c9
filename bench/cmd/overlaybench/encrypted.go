package main

import (
	"fmt"
	"strings"
	"time"

	"consul-overlay/bench/harness"
	"consul-overlay/internal/testenv"
	"consul-overlay/vxlan"
)

// benchEncrypted measures an encrypted network (-o encrypted=true: VXLAN
// in IPsec ESP, rfc4106(gcm(aes))) against an unencrypted one between the
// same two hosts: the throughput ratio is the cost of encryption.
func benchEncrypted(t *runner, cfg *config, rep *report) {
	sec := rep.section("Encrypted overlay (-o encrypted=true)")
	ctx := t.Context()
	c := harness.NewCluster(t, 2, harness.ClusterOptions{Bin: cfg.bin, LogLevel: "info"})
	var plain, enc [2]*harness.Endpoint
	for i, p := range c.Plugins {
		for _, x := range []struct {
			spec harness.NetSpec
			ep   *[2]*harness.Endpoint
		}{
			{harness.NetSpec{Subnet4: "10.212.0.0/24", Options: map[string]string{"name": "bench-plain"}}, &plain},
			{harness.NetSpec{Subnet4: "10.213.0.0/24", Options: map[string]string{"name": "bench-encrypted", "encrypted": "true"}}, &enc},
		} {
			n, err := p.CreateNetwork(x.spec)
			if err != nil {
				if strings.Contains(err.Error(), "not supported here") {
					testenv.Missing(t, "IPsec ESP with rfc4106(gcm(aes)) in the kernel", err.Error())
				}
				t.Fatalf("host%d: create network %s: %v", i, x.spec.Options["name"], err)
			}
			if x.ep[i], err = n.Run(t); err != nil {
				t.Fatalf("host%d: run container: %v", i, err)
			}
		}
	}
	for _, ep := range [][2]*harness.Endpoint{plain, enc} {
		dst := ep[1].Addr4.Addr()
		if err := eventually(ctx, 15*time.Second, func() error {
			_, err := nsRun(ctx, ep[0].NS, "ping", "-n", "-c", "1", "-W", "1", dst.String())
			return err
		}); err != nil {
			t.Fatalf("no traffic to %s: %v", dst, err)
		}
	}
	plainMTU, err := linkMTU(plain[0].NS, "eth0")
	if err != nil {
		t.Fatal(err)
	}
	encMTU, err := linkMTU(enc[0].NS, "eth0")
	if err != nil {
		t.Fatal(err)
	}
	paths := []*dataPath{
		{name: "unencrypted overlay", mtu: plainMTU, client: plain[0].NS, server: plain[1].NS, dst: plain[1].Addr4.Addr()},
		{name: "encrypted overlay (ESP)", mtu: encMTU, client: enc[0].NS, server: enc[1].NS, dst: enc[1].Addr4.Addr()},
	}
	measurePaths(t, cfg, paths)
	okMax, outMax := pingOnce(ctx, enc[0].NS, enc[1].Addr4.Addr(), encMTU-28)

	fmt.Fprintf(sec, "Two hosts on a veth underlay (MTU 1500), one unencrypted and one encrypted network between them. %s\n\n", method(cfg))
	rows := pathTable(sec, paths, paths[1], paths[0])
	e, p := rows[1], rows[0]
	fmt.Fprintf(sec, "\nEncrypted MTU %d (unencrypted %d − %d of ESP). `ping -M do -s %d`: %s.\n", encMTU, plainMTU, vxlan.ESPOverhead, encMTU-28, passFail(okMax, outMax))
	rep.info("encrypted ÷ unencrypted overlay TCP throughput, 4 streams", r3(ratio(e.p4, p.p4)))
	rep.info("encrypted ÷ unencrypted overlay TCP throughput, 1 stream", r3(ratio(e.p1, p.p1)))
	rep.info("encrypted overlay RTT avg − unencrypted", fmt.Sprintf("%+.1f µs", e.avg-p.avg))
	rep.check("encrypted overlay MTU", fmt.Sprint(encMTU), fmt.Sprintf("= %d", plainMTU-vxlan.ESPOverhead), encMTU == plainMTU-vxlan.ESPOverhead)
	if !okMax {
		t.Errorf("a %d-byte DF ping does not cross the encrypted overlay (MTU %d): %s", encMTU-28, encMTU, outMax)
	}
}
