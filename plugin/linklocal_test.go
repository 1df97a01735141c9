package main

import (
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"consul-overlay/internal/testenv"
	"consul-overlay/kvstore"
)

func TestLinkLocalFromEnv(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  map[string]string
		want linkLocalSettings
		err  string
	}{
		{name: "unset is off", env: nil},
		{name: "off", env: map[string]string{envLinkLocalAddr: "off"}},
		{name: "defaults", env: map[string]string{envLinkLocalAddr: "169.254.1.1"},
			want: linkLocalSettings{Domain: "consul", ConsulDNS: "127.0.0.1:8600"}},
		{name: "all set", env: map[string]string{envLinkLocalAddr: "169.254.9.9", envLinkLocalDomain: "dc1.example",
			envLinkLocalConsulDNS: "198.51.100.1", envLinkLocalUpstream: "198.51.100.3:5353, 203.0.113.53"},
			want: linkLocalSettings{Domain: "dc1.example", ConsulDNS: "198.51.100.1:53", Upstreams: []string{"198.51.100.3:5353", "203.0.113.53:53"}}},
		{name: "no upstream", env: map[string]string{envLinkLocalAddr: "169.254.1.1", envLinkLocalUpstream: "none"},
			want: linkLocalSettings{Domain: "consul", ConsulDNS: "127.0.0.1:8600", NoUpstream: true}},
		{name: "ipv6", env: map[string]string{envLinkLocalAddr: "fe80::1"}, err: envLinkLocalAddr},
		{name: "loopback", env: map[string]string{envLinkLocalAddr: "127.0.0.1"}, err: envLinkLocalAddr},
		{name: "garbage", env: map[string]string{envLinkLocalAddr: "yes"}, err: envLinkLocalAddr},
		{name: "bad consul dns", env: map[string]string{envLinkLocalAddr: "169.254.1.1", envLinkLocalConsulDNS: "localhost:8600"}, err: envLinkLocalConsulDNS},
		{name: "bad upstream", env: map[string]string{envLinkLocalAddr: "169.254.1.1", envLinkLocalUpstream: "1.2.3.4:0"}, err: envLinkLocalUpstream},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := linkLocalFromEnv(func(k string) string { return tc.env[k] })
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one naming %s", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got.Addr = got.Addr.Unmap()
			if tc.env[envLinkLocalAddr] == "" || tc.env[envLinkLocalAddr] == "off" {
				if got.Addr.IsValid() {
					t.Errorf("address %s, want off", got.Addr)
				}
				return
			}
			if got.Addr.String() != tc.env[envLinkLocalAddr] || got.Domain != tc.want.Domain || got.ConsulDNS != tc.want.ConsulDNS ||
				!slices.Equal(got.Upstreams, tc.want.Upstreams) || got.NoUpstream != tc.want.NoUpstream {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestResolvConfUpstreams(t *testing.T) {
	path := filepath.Join(t.TempDir(), "resolv.conf")
	conf := "search example.org\nnameserver 169.254.1.1\nnameserver 198.51.100.53\nnameserver 127.0.0.11\nnameserver 2001:db8::53\noptions ndots:1\n"
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := linkLocalFromEnv(func(k string) string { return map[string]string{envLinkLocalAddr: "169.254.1.1"}[k] })
	if err != nil {
		t.Fatal(err)
	}
	got, err := resolvConfUpstreams(path, s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"198.51.100.53:53", "[2001:db8::53]:53"}; !slices.Equal(got, want) {
		t.Errorf("upstreams %v, want %v (the address itself and Docker's embedded DNS left out)", got, want)
	}
}

// Port 53 taken on the address: the plugin does not start, and says which
// address, port and setting.
func TestStartLinkLocalPortTaken(t *testing.T) {
	testenv.RequireRoot(t)
	ns := testenv.NewNetNS(t)
	s, err := linkLocalFromEnv(func(k string) string {
		return map[string]string{envLinkLocalAddr: "169.254.1.1", envLinkLocalUpstream: "none"}[k]
	})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(t.Output(), nil))
	var startErr error
	err = ns.Do(func() error {
		// Another DNS server on all addresses, port 53.
		taken, err := net.ListenPacket("udp", "0.0.0.0:53")
		if err != nil {
			return err
		}
		defer taken.Close()
		_, stop, err := startLinkLocal(t.Context(), log, s, kvstore.ConsulConfig{}, false)
		if err == nil {
			stop()
		}
		startErr = err
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if startErr == nil {
		t.Fatal("startLinkLocal succeeded with port 53 taken")
	}
	for _, want := range []string{"LINKLOCAL_ADDR=169.254.1.1", "169.254.1.1:53/udp", "address already in use", "or to off"} {
		if !strings.Contains(startErr.Error(), want) {
			t.Errorf("error %q does not say %q", startErr, want)
		}
	}
	t.Logf("error: %v", startErr)
}
