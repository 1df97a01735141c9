package ipam

import (
	"errors"
	"net/netip"
	"sync"
	"testing"

	"github.com/docker/go-plugins-helpers/ipam"
)

// An explicit address asked for again under the name its record carries
// goes to the request only while no running container holds it: `docker
// rename` renames a running container's endpoint without telling IPAM, so
// a new container under the old name with --ip of that address is another
// endpoint. Once the renamed container is gone (its interface with it),
// the same request is Docker's retry or a restart and gets the address.
//
//	docker run -d --name web --network N img          # web gets 10.9.0.2
//	docker rename web web-old                         # still running
//	docker run -d --name web --network N --ip 10.9.0.2 img
func TestRegrantRefusedWhileAContainerHoldsIt(t *testing.T) {
	var mu sync.Mutex
	held := map[netip.Addr]bool{} // addresses a running container holds (the kernel's answer)
	var asked []string
	d, err := New(Config{Node: "h1", Logger: testLogger(), InContainer: func(poolID string, a netip.Addr) bool {
		mu.Lock()
		defer mu.Unlock()
		asked = append(asked, poolID+" "+a.String())
		return held[a]
	}}, newMemStore())
	if err != nil {
		t.Fatal(err)
	}
	p := mustPool(t, d, "10.9.0.0/24", "", false).PoolID
	first := hostOf(mustAddr(t, d, p, "", map[string]string{EndpointNameOption: "web", MACAddressOption: "02:00:00:00:00:01"}))
	a := netip.MustParseAddr(first)
	mu.Lock()
	held[a] = true // web runs with it, renamed to web-old since
	mu.Unlock()

	again := func() (*ipam.RequestAddressResponse, error) {
		return d.RequestAddress(&ipam.RequestAddressRequest{PoolID: p, Address: first,
			Options: map[string]string{EndpointNameOption: "web", MACAddressOption: "02:00:00:00:00:02"}})
	}
	r, err := again()
	if err == nil {
		t.Fatalf("address %s handed to a second container (%s) while the renamed one still uses it", first, r.Address)
	}
	if !errors.Is(err, ErrAddressInUse) {
		t.Fatalf("want ErrAddressInUse, got %v", err)
	}
	mu.Lock()
	if len(asked) != 1 || asked[0] != p+" "+first {
		t.Errorf("InContainer asked %q, want once for pool %s and %s", asked, p, first)
	}
	held[a] = false // web-old removed: its interface is gone
	mu.Unlock()
	if r, err = again(); err != nil {
		t.Fatalf("the address asked for again once no container holds it: %v", err)
	}
	if hostOf(r.Address) != first {
		t.Fatalf("got %s, want %s", r.Address, first)
	}
}
