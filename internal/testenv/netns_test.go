package testenv

import (
	"os"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

func TestNetNS(t *testing.T) {
	RequireRoot(t)
	var path string
	t.Run("lifecycle", func(t *testing.T) {
		ns := NewNetNS(t)
		path = ns.Path
		if _, err := os.Stat(ns.Path); err != nil {
			t.Fatalf("namespace file: %v", err)
		}
		// A link made through the handle is visible inside the namespace
		// and not in the caller's.
		if err := ns.Handle().LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "tbr0"}}); err != nil {
			t.Fatal(err)
		}
		out := ns.MustRun(t, "ip", "-o", "link", "show", "tbr0")
		if !strings.Contains(out, "tbr0") {
			t.Fatalf("ip link in namespace: %q", out)
		}
		if _, err := netlink.LinkByName("tbr0"); err == nil {
			t.Fatal("tbr0 visible in the test's own namespace")
		}
		orig, err := netns.Get()
		if err != nil {
			t.Fatal(err)
		}
		defer orig.Close()
		var inside bool
		if err := ns.Do(func() error {
			_, err := netlink.LinkByName("tbr0")
			inside = err == nil
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if !inside {
			t.Fatal("Do did not run inside the namespace")
		}
		// The goroutine's thread is where it was.
		now, err := netns.Get()
		if err != nil {
			t.Fatal(err)
		}
		defer now.Close()
		if !now.Equal(orig) {
			t.Fatal("namespace of the test goroutine changed")
		}
		if _, err := ns.Run(t, "false"); err == nil {
			t.Fatal("Run of a failing command returned no error")
		}
	})
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("namespace file %s left behind: %v", path, err)
	}
}

func TestUnderlay(t *testing.T) {
	RequireRoot(t)
	for _, v6 := range []bool{false, true} {
		name := "ipv4"
		if v6 {
			name = "ipv6"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			hosts := NewUnderlay(t, 3, UnderlayOptions{IPv6: v6, MTU: 9000})
			for _, h := range hosts {
				if h.Addr.Is6() != v6 {
					t.Fatalf("address %s, want ipv6=%v", h.Addr, v6)
				}
				l, err := h.NS.Handle().LinkByName(h.Link)
				if err != nil {
					t.Fatal(err)
				}
				if l.Attrs().MTU != 9000 {
					t.Errorf("%s mtu %d, want 9000", h.Link, l.Attrs().MTU)
				}
			}
			out, err := hosts[0].NS.Run(t, "ping", "-n", "-c", "1", "-W", "2", hosts[2].Addr.String())
			if err != nil {
				t.Fatalf("underlay ping: %v\n%s", err, out)
			}
		})
	}
}
