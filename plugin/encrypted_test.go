package main

import (
	"encoding/base64"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	cstate "consul-overlay/cluster"
	"consul-overlay/internal/testenv"
	"consul-overlay/kvstore"
)

// Encrypted networks through the real plugin binary, three hosts in
// namespaces and a real Consul: an encrypted network between two hosts
// carries ping, its key ring appears in the store (never in a log), a
// rotation pushed through Consul during a 20 ms ping loses nothing, an
// unencrypted network on the same hosts keeps working, and the network's
// removal leaves no xfrm state. On a kernel without ESP the request is
// refused with a clear error and leaves nothing in the store; the test
// then reports the missing prerequisite.
func TestProtocolEncrypted(t *testing.T) {
	requireNsenter(t)
	hosts := testenv.NewUnderlay(t, 3, testenv.UnderlayOptions{})
	consul := testenv.StartConsul(t, testenv.WithNetNS(hosts[0].NS.Path), testenv.WithBindAddr(hosts[0].Addr.String()))
	prefix := "co-enc-" + randomID()[:8] + "/"
	var plugins []*pluginProc
	for i, h := range hosts {
		plugins = append(plugins, startPluginEnv(t, fmt.Sprintf("host%d", i), h, consul.Addr, prefix, "ENCRYPTION_KEY_GRACE=1s"))
	}
	a, b, x := plugins[0], plugins[1], plugins[2]
	encSpec := netSpec{subnet4: "10.95.1.0/24", opts: map[string]string{"name": "secret", "encrypted": "true"}}
	na, err := a.createNetwork(encSpec)
	if err != nil {
		if !strings.Contains(err.Error(), "encrypted networks are not supported here") || !strings.Contains(err.Error(), "ESP") {
			t.Fatalf("encrypted network refused without a clear reason: %v", err)
		}
		if keys := stateKeys(t, consul, prefix+"networks/"); len(keys) != 0 {
			t.Errorf("refused network left keys: %v", keys)
		}
		testenv.KernelLacks(t, "IPsec ESP with rfc4106(gcm(aes))", "CONFIG_INET_ESP and CONFIG_CRYPTO_GCM; the plugin said: "+err.Error())
	}
	nb, err := b.createNetwork(encSpec)
	if err != nil {
		t.Fatal(err)
	}
	plainSpec := netSpec{subnet4: "10.95.2.0/24", opts: map[string]string{"name": "plain"}}
	var plain []*dockerNet
	for _, p := range plugins {
		n, err := p.createNetwork(plainSpec)
		if err != nil {
			t.Fatal(err)
		}
		plain = append(plain, n)
	}
	ca, cb := na.run(t), nb.run(t)
	pa, px := plain[0].run(t), plain[2].run(t)
	eventually(t, 15*time.Second, func() error { return ca.ping(t, cb.addr4.Addr(), 1) })
	eventually(t, 15*time.Second, func() error { return px.ping(t, pa.addr4.Addr(), 1) })

	// The ring is in the store under the prefix.
	store, err := kvstore.NewConsul(kvstore.ConsulConfig{Address: consul.Addr, Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	pair, err := store.Get(t.Context(), cstate.KeysKey)
	if err != nil {
		t.Fatalf("key ring in the store: %v", err)
	}
	var ring cstate.KeyRing
	if err := kvstore.Decode(pair.Value, &ring); err != nil || len(ring.Keys) != 1 {
		t.Fatalf("key ring: %v %v", ring.Keys, err)
	}

	// Rotation through Consul during a 20 ms ping.
	kr, err := cstate.NewKeyring(cstate.KeyringConfig{Rotation: time.Hour, Grace: time.Second}, store)
	if err != nil {
		t.Fatal(err)
	}
	out := make(chan string, 1)
	go func() {
		o, _ := ca.ns.Run(t, "ping", "-n", "-q", "-c", "250", "-i", "0.02", "-W", "1", cb.addr4.Addr().String())
		out <- o
	}()
	time.Sleep(time.Second)
	rotated, err := kr.Rotate(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	res := <-out
	m := regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`).FindStringSubmatch(res)
	if m == nil || m[1] != m[2] {
		t.Errorf("ping during the rotation lost packets:\n%s", res)
	}
	t.Logf("rotation through Consul: %s", strings.TrimSpace(res))

	// No key material in any log.
	for _, p := range plugins {
		log, _ := os.ReadFile(p.logf)
		for _, k := range rotated.Keys {
			if s := base64.StdEncoding.EncodeToString(k.Secret); strings.Contains(string(log), s) || strings.Contains(string(log), fmt.Sprintf("%x", k.Secret)) {
				t.Errorf("plugin %s logged a key's secret", p.name)
			}
		}
	}

	// Removal: no xfrm state of ours, plain network unaffected.
	ca.remove(t)
	cb.remove(t)
	for _, n := range []*dockerNet{na, nb} {
		if err := n.remove(); err != nil {
			t.Fatal(err)
		}
	}
	for _, h := range hosts[:2] {
		if out := h.NS.MustRun(t, "ip", "xfrm", "state"); strings.Contains(out, "reqid 0xc0e") || strings.Contains(out, "reqid 323") {
			t.Errorf("xfrm states left on %s:\n%s", h.Addr, out)
		}
		if out := h.NS.MustRun(t, "ip", "xfrm", "policy"); strings.Contains(out, "mark 0xc0e") {
			t.Errorf("xfrm policies left on %s:\n%s", h.Addr, out)
		}
	}
	if err := px.ping(t, pa.addr4.Addr(), 2); err != nil {
		t.Error(err)
	}
	_ = x
}
