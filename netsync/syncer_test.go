package netsync

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"consul-overlay/cluster"
	"consul-overlay/internal/dockerapi"
	"consul-overlay/internal/testenv"
	"consul-overlay/kvstore"
)

// TestSyncer runs the syncer's behaviour against a real Consul agent, each
// case under its own prefix, with fake engines whose driver is the real
// cluster state.
func TestSyncer(t *testing.T) {
	agent := testenv.StartConsul(t)
	cases := []struct {
		name string
		fn   func(t *testing.T, c *cl)
	}{
		{"CreatePropagates", testCreatePropagates},
		{"RemoveRetiresKeepsUsed", testRemoveRetires},
		{"RetireKeepsStoppedContainers", testRetireKeepsStopped},
		{"ConflictOneWinner", testConflict},
		{"SameSettingsIdempotent", testSameSettings},
		{"LateHost", testLateHost},
		{"EngineOutage", testEngineOutage},
		{"PerHostNotPublished", testPerHost},
		{"CreateAgainAfterRetire", testCreateAgain},
		{"DuplicateNameOtherSettings", testDuplicateOther},
		{"DuplicateNameSameSettings", testDuplicateSame},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := make([]byte, 4)
			_, _ = rand.Read(b)
			tc.fn(t, &cl{t: t, addr: agent.Addr, prefix: "netsync-" + hex.EncodeToString(b) + "/"})
		})
	}
}

// cl is one test cluster: hosts sharing a store prefix.
type cl struct {
	t      *testing.T
	addr   string
	prefix string
	n      int
}

// host is one host: its store client, fake engine and syncer.
type host struct {
	name       string
	retireFile string // netsync.Config.RetireFile
	store      kvstore.Store
	engine     *fakeEngine
	syncer     *Syncer
	logs       *syncBuf
	cancel     context.CancelFunc
	done       chan struct{}
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func (c *cl) open() kvstore.Store {
	s, err := kvstore.NewConsul(kvstore.ConsulConfig{Address: c.addr, Prefix: c.prefix})
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { s.Close() })
	return s
}

// host starts a host whose plugin is installed as driver.
func (c *cl) host(name, driver string) *host {
	t := c.t
	c.n++
	store := c.open()
	clu, err := cluster.New(cluster.Config{HostID: "id-" + name, Node: name, VTEP: netip.AddrFrom4([4]byte{192, 0, 2, byte(c.n)})}, store)
	if err != nil {
		t.Fatal(err)
	}
	h := &host{name: name, store: store, engine: newFakeEngine(driver, clu), logs: &syncBuf{}}
	h.start(t)
	return h
}

func (h *host) start(t *testing.T) {
	log := slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	driver := h.engine.driver
	s, err := New(Config{
		HostID: "id-" + h.name, Node: h.name,
		DriverName: func(context.Context) (string, error) { return driver, nil },
		Resync:     time.Second, Logger: log, RetireFile: h.retireFile,
	}, h.store, h.engine)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.syncer, h.cancel, h.done = s, cancel, make(chan struct{})
	go func() { defer close(h.done); s.Run(ctx) }()
	t.Cleanup(h.stop)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("host %s log:\n%s", h.name, h.logs.String())
		}
	})
}

func (h *host) stop() {
	h.cancel()
	<-h.done
}

// userCreate is `docker network create` by a user on h.
func (h *host) userCreate(t *testing.T, name, subnet string, opts, labels map[string]string) string {
	t.Helper()
	id, err := h.engine.create(context.Background(), dockerapi.NetworkCreate{
		Name: name, Driver: h.engine.driver, Options: opts, Labels: labels,
		IPAM: dockerapi.NetworkIPAM{Driver: h.engine.driver, Config: []dockerapi.NetworkIPAMConfig{{Subnet: subnet}}},
	})
	if err != nil {
		t.Fatalf("host %s: create %s: %v", h.name, name, err)
	}
	return id
}

// userCreateRacing is a user's create of a name the engine has, that
// overlapped the other create inside the engine: both succeed.
func (h *host) userCreateRacing(t *testing.T, name, subnet string) string {
	t.Helper()
	h.engine.mu.Lock()
	h.engine.noNameCheck = true
	h.engine.mu.Unlock()
	defer func() {
		h.engine.mu.Lock()
		h.engine.noNameCheck = false
		h.engine.mu.Unlock()
	}()
	return h.userCreate(t, name, subnet, nil, nil)
}

func has(h *host, name, subnet string) error {
	if c := h.engine.count(name); c > 1 {
		return fmt.Errorf("host %s has %d networks named %s", h.name, c, name)
	}
	n, ok := h.engine.get(name)
	if !ok {
		return fmt.Errorf("host %s has no network %s", h.name, name)
	}
	if subnet != "" && (len(n.IPAM.Config) != 1 || n.IPAM.Config[0].Subnet != subnet) {
		return fmt.Errorf("host %s: network %s has %v, want subnet %s", h.name, name, n.IPAM.Config, subnet)
	}
	return nil
}

func lacks(h *host, name string) error {
	if _, ok := h.engine.get(name); ok {
		return fmt.Errorf("host %s still has network %s", h.name, name)
	}
	return nil
}

func keys(t *testing.T, s kvstore.Store) []string {
	t.Helper()
	ps, err := s.List(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, p := range ps {
		if !strings.HasPrefix(p.Key, "members/") {
			out = append(out, p.Key)
		}
	}
	return out
}

func testCreatePropagates(t *testing.T, c *cl) {
	a := c.host("a", "consul-overlay:latest")
	b := c.host("b", "consul-overlay:v2") // installed under another name
	labels := map[string]string{"com.docker.compose.project": "p", "com.docker.compose.network": "app"}
	opts := map[string]string{"register": "false"}
	a.userCreate(t, "app", "10.99.1.0/24", opts, labels)
	start := time.Now()
	testenv.Eventually(t, 2*time.Second, func() error { return has(b, "app", "10.99.1.0/24") })
	t.Logf("propagated in %s", time.Since(start))
	n, _ := b.engine.get("app")
	if n.Driver != "consul-overlay:v2" || n.IPAM.Driver != "consul-overlay:v2" {
		t.Errorf("host b: drivers %q/%q, want its own plugin name", n.Driver, n.IPAM.Driver)
	}
	if !maps.Equal(n.Labels, labels) || !maps.Equal(n.Options, opts) {
		t.Errorf("host b: labels %v options %v, want %v %v", n.Labels, n.Options, labels, opts)
	}
	sp, err := cluster.GetSpec(context.Background(), a.store, "app")
	if err != nil {
		t.Fatal(err)
	}
	if sp.Spec.Key != "subnet-10.99.1.0_24" || sp.Spec.Retired || sp.Spec.OriginNode != "a" {
		t.Errorf("spec %+v", sp.Spec)
	}
	// Both hosts are members of the one logical network.
	testenv.Eventually(t, 2*time.Second, func() error {
		var rec cluster.Network
		p, err := a.store.Get(context.Background(), "networks/subnet-10.99.1.0_24/config")
		if err != nil {
			return err
		}
		if err := kvstore.Decode(p.Value, &rec); err != nil {
			return err
		}
		if len(rec.Hosts) != 2 {
			return fmt.Errorf("members %v, want both hosts", rec.Hosts)
		}
		return nil
	})
}

func testRemoveRetires(t *testing.T, c *cl) {
	a := c.host("a", "co")
	b := c.host("b", "co")
	a.userCreate(t, "web", "10.99.2.0/24", nil, nil)
	testenv.Eventually(t, 2*time.Second, func() error { return has(b, "web", "") })
	a.engine.connect("web", 1) // a container on A
	// A user removes it on B.
	if err := b.engine.RemoveNetwork(context.Background(), "web"); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 2*time.Second, func() error {
		sp, err := cluster.GetSpec(context.Background(), a.store, "web")
		if err != nil {
			return err
		}
		if !sp.Spec.Retired || sp.Spec.RetiredBy != "b" {
			return fmt.Errorf("spec not retired by b: %+v", sp.Spec)
		}
		return nil
	})
	// A keeps it while its container uses it, and B does not get it back.
	time.Sleep(1500 * time.Millisecond)
	if err := has(a, "web", ""); err != nil {
		t.Fatal(err)
	}
	if err := lacks(b, "web"); err != nil {
		t.Fatal(err)
	}
	// The last container leaves: gone from A and from the store.
	a.engine.connect("web", -1)
	testenv.Eventually(t, 3*time.Second, func() error {
		if err := lacks(a, "web"); err != nil {
			return err
		}
		if k := keys(t, a.store); len(k) > 0 {
			return fmt.Errorf("keys left: %v", k)
		}
		return nil
	})
}

// testRetireKeepsStopped: a user removes a cluster-wide network on B while
// A's only container on it is stopped (`docker compose stop`). The
// engine's inspect counts running containers only, and it lets a network
// go under stopped ones, which then cannot start ("network not found"):
// A keeps the network until the container is removed.
func testRetireKeepsStopped(t *testing.T, c *cl) {
	a := c.host("a", "co")
	b := c.host("b", "co")
	a.userCreate(t, "web", "10.99.12.0/24", nil, nil)
	testenv.Eventually(t, 2*time.Second, func() error { return has(b, "web", "") })
	a.engine.connect("web", 1)
	a.engine.stop("web", 1)
	if err := b.engine.RemoveNetwork(context.Background(), "web"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second) // A's syncer has seen the retirement
	if err := has(a, "web", ""); err != nil {
		t.Fatalf("A removed the network its stopped container is attached to: %v", err)
	}
	sp, err := cluster.GetSpec(context.Background(), a.store, "web")
	if err != nil || !sp.Spec.Retired {
		t.Fatalf("spec %+v, %v; want retired", sp.Spec, err)
	}
	// The stopped container is removed: the network goes from A.
	a.engine.stop("web", -1)
	testenv.Eventually(t, 3*time.Second, func() error { return lacks(a, "web") })
}

func testConflict(t *testing.T, c *cl) {
	a := c.host("a", "co")
	b := c.host("b", "co")
	// Both at once, with other subnets.
	var wg sync.WaitGroup
	for h, sub := range map[*host]string{a: "10.99.3.0/24", b: "10.99.4.0/24"} {
		wg.Add(1)
		go func() { defer wg.Done(); h.userCreate(t, "db", sub, nil, nil) }()
	}
	wg.Wait()
	var win string
	testenv.Eventually(t, 3*time.Second, func() error {
		sp, err := cluster.GetSpec(context.Background(), a.store, "db")
		if err != nil {
			return err
		}
		win = sp.Spec.IPAM[0].Subnet
		for _, h := range []*host{a, b} {
			if err := has(h, "db", win); err != nil {
				return err
			}
		}
		if len(sp.Spec.Conflicts) != 1 {
			return fmt.Errorf("conflicts %v, want one", sp.Spec.Conflicts)
		}
		return nil
	})
	var loser *host
	for _, h := range []*host{a, b} {
		if cs, _ := h.syncer.Status(); len(cs) > 0 {
			if loser != nil {
				t.Fatalf("both hosts report a conflict")
			}
			loser = h
			if !strings.Contains(cs[0].Cluster, win) || cs[0].Network != "db" {
				t.Errorf("conflict %+v, want the winner's subnet %s", cs[0], win)
			}
		}
	}
	if loser == nil {
		t.Fatal("no host reports the conflict")
	}
	if !strings.Contains(loser.logs.String(), "level=ERROR") || !strings.Contains(loser.logs.String(), "network=db") {
		t.Errorf("host %s logged no error naming the network:\n%s", loser.name, loser.logs.String())
	}
	// Nothing half-created: the losing subnet's logical network is gone.
	testenv.Eventually(t, 2*time.Second, func() error {
		for _, k := range keys(t, a.store) {
			if strings.Contains(k, "10.99.3.0") && win != "10.99.3.0/24" || strings.Contains(k, "10.99.4.0") && win != "10.99.4.0/24" {
				return fmt.Errorf("the losing network left %s", k)
			}
		}
		return nil
	})
}

func testSameSettings(t *testing.T, c *cl) {
	a := c.host("a", "co")
	b := c.host("b", "co")
	labels := map[string]string{"l": "v"}
	ida := a.userCreate(t, "same", "10.99.5.0/24", nil, labels)
	idb := b.userCreate(t, "same", "10.99.5.0/24", nil, labels)
	testenv.Eventually(t, 2*time.Second, func() error {
		_, err := cluster.GetSpec(context.Background(), a.store, "same")
		return err
	})
	time.Sleep(1500 * time.Millisecond)
	for h, id := range map[*host]string{a: ida, b: idb} {
		n, ok := h.engine.get("same")
		if !ok || n.ID != id {
			t.Errorf("host %s: network replaced (%v)", h.name, ok)
		}
		if cs, _ := h.syncer.Status(); len(cs) > 0 {
			t.Errorf("host %s: conflict %+v", h.name, cs)
		}
	}
}

func testLateHost(t *testing.T, c *cl) {
	a := c.host("a", "co")
	a.userCreate(t, "n1", "10.99.6.0/24", nil, nil)
	a.userCreate(t, "n2", "10.99.7.0/24", nil, nil)
	testenv.Eventually(t, 2*time.Second, func() error {
		sps, err := cluster.ListSpecs(context.Background(), a.store)
		if err != nil || len(sps) != 2 {
			return fmt.Errorf("specs %v %v", sps, err)
		}
		return nil
	})
	start := time.Now()
	late := c.host("c", "co")
	testenv.Eventually(t, 2*time.Second, func() error {
		return errors.Join(has(late, "n1", "10.99.6.0/24"), has(late, "n2", "10.99.7.0/24"))
	})
	t.Logf("late host caught up in %s", time.Since(start))
}

func testEngineOutage(t *testing.T, c *cl) {
	a := c.host("a", "co")
	b := c.host("b", "co")
	<-b.syncer.Ready()
	b.engine.setDown(true)
	a.userCreate(t, "o1", "10.99.8.0/24", nil, nil)
	a.userCreate(t, "o2", "10.99.9.0/24", nil, nil)
	time.Sleep(1500 * time.Millisecond)
	b.engine.setDown(false)
	start := time.Now()
	testenv.Eventually(t, 2*time.Second, func() error {
		return errors.Join(has(b, "o1", ""), has(b, "o2", ""))
	})
	t.Logf("caught up %s after the engine answered", time.Since(start))
	time.Sleep(1500 * time.Millisecond)
	b.engine.mu.Lock()
	defer b.engine.mu.Unlock()
	for _, n := range []string{"o1", "o2"} {
		if b.engine.creates[n] != 1 {
			t.Errorf("host b created %s %d times", n, b.engine.creates[n])
		}
	}
}

func testPerHost(t *testing.T, c *cl) {
	a := c.host("a", "co")
	b := c.host("b", "co")
	a.userCreate(t, "local", "10.99.10.0/24", map[string]string{"name": "local"}, nil)
	<-a.syncer.Ready()
	time.Sleep(1500 * time.Millisecond)
	if err := lacks(b, "local"); err != nil {
		t.Error(err)
	}
	if _, err := cluster.GetSpec(context.Background(), a.store, "local"); !errors.Is(err, kvstore.ErrNotFound) {
		t.Errorf("a per-host network was published (%v)", err)
	}
}

func testCreateAgain(t *testing.T, c *cl) {
	a := c.host("a", "co")
	b := c.host("b", "co")
	a.userCreate(t, "again", "10.99.11.0/24", nil, nil)
	testenv.Eventually(t, 2*time.Second, func() error { return has(b, "again", "") })
	if err := b.engine.RemoveNetwork(context.Background(), "again"); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 3*time.Second, func() error {
		if err := lacks(a, "again"); err != nil {
			return err
		}
		if k := keys(t, a.store); len(k) > 0 {
			return fmt.Errorf("keys left: %v", k)
		}
		return nil
	})
	b.userCreate(t, "again", "10.99.12.0/24", nil, nil)
	testenv.Eventually(t, 2*time.Second, func() error { return has(a, "again", "10.99.12.0/24") })
}

// testDuplicateOther: host B's create from A's spec and a user's create on
// B of the name with another subnet overlapped, and B's engine let both
// through (its name check is best effort; the e2e saw it on engine 20.10).
// The spec wins on B: the user's network is removed as a conflict's loser,
// and nothing of its subnet is left in the store, on either host.
func testDuplicateOther(t *testing.T, c *cl) {
	a := c.host("a", "co")
	b := c.host("b", "co")
	a.userCreate(t, "dup", "10.99.13.0/24", nil, nil)
	testenv.Eventually(t, 2*time.Second, func() error { return has(b, "dup", "10.99.13.0/24") })
	b.userCreateRacing(t, "dup", "10.99.14.0/24")
	testenv.Eventually(t, 3*time.Second, func() error {
		if err := errors.Join(has(a, "dup", "10.99.13.0/24"), has(b, "dup", "10.99.13.0/24")); err != nil {
			return err
		}
		sp, err := cluster.GetSpec(context.Background(), a.store, "dup")
		if err != nil {
			return err
		}
		if len(sp.Spec.Conflicts) != 1 || sp.Spec.Conflicts[0].Node != "b" || !strings.Contains(sp.Spec.Conflicts[0].Settings, "10.99.14.0/24") {
			return fmt.Errorf("conflicts %+v, want b's with 10.99.14.0/24", sp.Spec.Conflicts)
		}
		for _, k := range keys(t, a.store) {
			if strings.Contains(k, "10.99.14.0") {
				return fmt.Errorf("the losing network left %s", k)
			}
		}
		return nil
	})
	// Removing the network on A now retires it everywhere: nothing left.
	if err := a.engine.RemoveNetwork(context.Background(), "dup"); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 3*time.Second, func() error {
		if err := errors.Join(lacks(a, "dup"), lacks(b, "dup")); err != nil {
			return err
		}
		if k := keys(t, a.store); len(k) > 0 {
			return fmt.Errorf("keys left: %v", k)
		}
		return nil
	})
}

// testDuplicateSame: as testDuplicateOther with the spec's settings: the
// second network is removed and no conflict is recorded; while a container
// uses it, it is kept.
func testDuplicateSame(t *testing.T, c *cl) {
	a := c.host("a", "co")
	b := c.host("b", "co")
	a.userCreate(t, "dup2", "10.99.15.0/24", nil, nil)
	testenv.Eventually(t, 2*time.Second, func() error { return has(b, "dup2", "10.99.15.0/24") })
	first, _ := b.engine.get("dup2")
	b.engine.connect("dup2", 1) // a container on the first one
	b.userCreateRacing(t, "dup2", "10.99.15.0/24")
	testenv.Eventually(t, 3*time.Second, func() error { return has(b, "dup2", "10.99.15.0/24") })
	if n, _ := b.engine.get("dup2"); n.ID != first.ID {
		t.Errorf("host b kept the second network %s, not the one in use %s", n.ID, first.ID)
	}
	sp, err := cluster.GetSpec(context.Background(), a.store, "dup2")
	if err != nil {
		t.Fatal(err)
	}
	if len(sp.Spec.Conflicts) != 0 {
		t.Errorf("conflicts %+v, want none", sp.Spec.Conflicts)
	}
}
