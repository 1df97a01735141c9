package vxlan

import (
	"net/netip"
	"sync"
	"testing"
)

// TestSetVTEPBesideAllowlistAndDrops (a check for -race): SetVTEP writes m.cfg.VTEP under m.mu, but
// SetAllowedVTEPs validated its list against m.cfg.VTEP before taking
// m.mu, and VXLANDrops (the metrics scrape) read m.cfg.VTEP and the
// firewall's command table without m.mu at all: a concurrent map read and
// write ends the process. The driver calls SetVTEP when the underlay
// address changes, its peer watches call SetAllowedVTEPs and the metrics
// handler calls VXLANDrops, at any time.
func TestSetVTEPBesideAllowlistAndDrops(t *testing.T) {
	m, err := newManager(Config{VTEP: netip.MustParseAddr("192.0.2.1"), UnderlayMTU: 1500, IPTables: "-", IP6Tables: "-", Sysctl: "-"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(3)
	go func() {
		defer wg.Done()
		for i := range 200 {
			v := netip.AddrFrom4([4]byte{192, 0, 2, byte(10 + i%2)})
			if _, err := m.SetVTEP(t.Context(), v, nil); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	go func() {
		defer wg.Done()
		for range 200 {
			if err := m.SetAllowedVTEPs(t.Context(), []netip.Addr{netip.MustParseAddr("192.0.2.50")}); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	go func() {
		defer wg.Done()
		for range 200 {
			_, _ = m.VXLANDrops()
		}
	}()
	wg.Wait()
}
