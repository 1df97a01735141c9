package discovery

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/testenv"
	"consul-overlay/kvstore"
)

// agentClient builds the agent client the way the plugin does, through
// kvstore.
func agentClient(t *testing.T, a *testenv.ConsulAgent) *api.Client {
	t.Helper()
	store, err := kvstore.NewConsul(kvstore.ConsulConfig{Address: a.Addr})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	return store.Client()
}

func testLogger(t *testing.T) *slog.Logger {
	if testing.Verbose() || os.Getenv("DISCOVERY_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.DiscardHandler)
}

// startRegistrar builds a registrar and runs it until the test ends, then
// checks that Run returned.
func startRegistrar(t *testing.T, cfg Config) *Registrar {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	r, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run returned %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Error("Run did not return within 15s of cancel")
		}
	})
	return r
}

// ourServices lists the agent's services carrying the marker.
func ourServices(ctx context.Context, c *api.Client) (map[string]*api.AgentService, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return c.Agent().ServicesWithFilterOpts(fmt.Sprintf("Meta[%q] == %q", MetaManagedBy, ManagedByValue),
		(&api.QueryOptions{}).WithContext(ctx))
}

func endpointID(n int) string { return fmt.Sprintf("%064x", n+0xe0000) }

func loopback(n int) netip.Addr { return netip.AddrFrom4([4]byte{127, 0, 0, byte(n)}) }

func sortedKeys[V any](m map[string]V) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// fakeDriver is the Endpoints of a test: a mutable held list, and a log
// of reclaimed endpoint IDs.
type fakeDriver struct {
	mu        sync.Mutex
	eps       []Endpoint
	reclaimed []string
}

var _ Endpoints = (*fakeDriver)(nil)

func (d *fakeDriver) set(eps ...Endpoint) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.eps = append([]Endpoint(nil), eps...)
}

func (d *fakeDriver) HeldEndpoints(context.Context) ([]Endpoint, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]Endpoint(nil), d.eps...), nil
}

func (d *fakeDriver) ReclaimEndpoint(_ context.Context, id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.reclaimed = append(d.reclaimed, id)
}

func (d *fakeDriver) got() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := append([]string(nil), d.reclaimed...)
	sort.Strings(out)
	return out
}
