package ipam

import (
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"consul-overlay/internal/fault"
	"consul-overlay/internal/testenv"
	"consul-overlay/kvstore"

	"github.com/docker/go-plugins-helpers/ipam"
)

// crashChildEnv carries a crashCall to the child process.
const crashChildEnv = "IPAM_CRASH_CHILD"

// crashCall is one IPAM call run by a child process that is killed at an
// armed fault point, as kill -9 would kill the plugin.
type crashCall struct {
	// Store: "embedded" (Path) or "consul" (Addr, Prefix).
	Store, Path, Addr, Prefix string
	Node                      string
	Call                      string // requestpool, requestaddress, releaseaddress, releasepool
	PoolID, Pool, Address     string
	Options                   map[string]string
}

func (cc crashCall) open(t testing.TB) kvstore.Store {
	if cc.Store == "consul" {
		return consulClient(t, cc.Addr, cc.Prefix)
	}
	s, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: cc.Path, Prefix: "test", OpenTimeout: 10 * time.Second})
	if err != nil {
		t.Fatalf("open embedded store: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// TestCrashChild is the child side of TestCrashPoints.
func TestCrashChild(t *testing.T) {
	spec := os.Getenv(crashChildEnv)
	if spec == "" {
		t.Skip("run by TestCrashPoints")
	}
	var cc crashCall
	if err := json.Unmarshal([]byte(spec), &cc); err != nil {
		t.Fatal(err)
	}
	d, err := New(Config{Node: cc.Node, Logger: testLogger(), Timeout: 20 * time.Second}, cc.open(t))
	if err != nil {
		t.Fatal(err)
	}
	switch cc.Call {
	case "requestpool":
		_, err = d.RequestPool(&ipam.RequestPoolRequest{AddressSpace: LocalAddressSpace, Pool: cc.Pool})
	case "requestaddress":
		_, err = d.RequestAddress(&ipam.RequestAddressRequest{PoolID: cc.PoolID, Address: cc.Address, Options: cc.Options})
	case "releaseaddress":
		err = d.ReleaseAddress(&ipam.ReleaseAddressRequest{PoolID: cc.PoolID, Address: cc.Address})
	case "releasepool":
		err = d.ReleasePool(&ipam.ReleasePoolRequest{PoolID: cc.PoolID})
	default:
		t.Fatalf("unknown call %q", cc.Call)
	}
	t.Fatalf("the call returned (%v): its fault point was never reached", err)
}

// crashCase crashes one call at one point and replays what Docker does
// after the plugin restarts.
type crashCase struct {
	point string
	// setup prepares the store (as host "a" and "b"); it returns the call
	// host "a" makes in the child.
	setup func(t *testing.T, c *crashEnv) crashCall
	// after runs on the restarted host "a": Docker's retry or clean-up,
	// the sweeps, and the checks. The store must be empty at the end.
	after func(t *testing.T, c *crashEnv, call crashCall)
}

// crashEnv is a store that the test and the child process take turns on.
type crashEnv struct {
	*cluster
	clk   *clock
	a, b  *Driver
	reset func() // closes the test's clients, so the child can open the store
}

const crashPool = "10.60.0.0/24"

func poolOf(t *testing.T, d *Driver) string {
	return mustPool(t, d, crashPool, "", false).PoolID
}

// sweepAll runs both sweeps twice a grace period apart, with bound and
// uses as Docker and the network driver would answer them.
func sweepAll(t *testing.T, c *crashEnv, bound func(string, netip.Addr) bool, uses func(string) (int, bool)) {
	t.Helper()
	for range 2 {
		c.clk.advance(2 * DefaultGrace)
		if _, err := c.a.Sweep(t.Context(), bound); err != nil {
			t.Fatalf("sweep: %v", err)
		}
		if _, err := c.a.SweepPools(t.Context(), uses); err != nil {
			t.Fatalf("sweep pools: %v", err)
		}
	}
}

func bindOnly(addrs ...string) func(string, netip.Addr) bool {
	return func(_ string, a netip.Addr) bool { return slices.Contains(addrs, a.String()) }
}

func usesN(n int) func(string) (int, bool) { return func(string) (int, bool) { return n, true } }

// onlyAddrs fails unless the pool's address records are exactly want.
func onlyAddrs(t *testing.T, c *crashEnv, poolID string, want ...string) {
	t.Helper()
	ref, err := parsePoolID(poolID)
	if err != nil {
		t.Fatal(err)
	}
	dir := addrDir(ref.space, ref.subnet)
	pairs, err := c.inspect.List(t.Context(), dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, p := range pairs {
		got = append(got, strings.TrimPrefix(p.Key, dir))
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("address records of %s: %v, want %v (a leak?)", poolID, got, want)
	}
}

// heldBy returns the record of address a; there is one key per address,
// so the record names its only holder.
func heldBy(t *testing.T, c *crashEnv, poolID, a string) *addrRecord {
	t.Helper()
	return c.addrRecord(poolID, a)
}

var crashCases = []crashCase{}

func init() {
	pool := func(point string) crashCase {
		return crashCase{
			point: point,
			setup: func(t *testing.T, c *crashEnv) crashCall {
				return crashCall{Call: "requestpool", Pool: crashPool}
			},
			after: func(t *testing.T, c *crashEnv, _ crashCall) {
				p := poolOf(t, c.a) // Docker's retry
				sweepAll(t, c, nil, usesN(1))
				info, err := c.a.PoolInfo(t.Context(), p)
				if err != nil || info.Holders["a"] != 1 {
					t.Fatalf("after the retry and the sweep: %+v, %v; want one hold of a", info, err)
				}
				mustReleasePool(t, c.a, p) // docker network rm
			},
		}
	}
	join := func(point string) crashCase {
		return crashCase{
			point: point,
			setup: func(t *testing.T, c *crashEnv) crashCall {
				poolOf(t, c.b)
				return crashCall{Call: "requestpool", Pool: crashPool}
			},
			after: func(t *testing.T, c *crashEnv, _ crashCall) {
				p := poolOf(t, c.a)
				sweepAll(t, c, nil, usesN(1))
				info, err := c.a.PoolInfo(t.Context(), p)
				if err != nil || info.Holders["a"] != 1 || info.Holders["b"] != 1 {
					t.Fatalf("after the retry and the sweep: %+v, %v; want one hold each", info, err)
				}
				mustReleasePool(t, c.a, p)
				mustReleasePool(t, c.b, p)
			},
		}
	}
	gateway := func(point string) crashCase {
		return crashCase{
			point: point,
			setup: func(t *testing.T, c *crashEnv) crashCall {
				return crashCall{Call: "requestaddress", PoolID: poolOf(t, c.a), Options: gw}
			},
			after: func(t *testing.T, c *crashEnv, call crashCall) {
				// Docker's network create failed with the crash; its
				// retry asks for the pool and the gateway again, then it
				// releases the pool of the failed attempt.
				p := poolOf(t, c.a)
				g := hostOf(mustAddr(t, c.a, p, "", gw))
				mustReleasePool(t, c.a, call.PoolID)
				if g != "10.60.0.1" {
					t.Errorf("gateway after the retry: %s", g)
				}
				sweepAll(t, c, bindOnly(), usesN(1))
				onlyAddrs(t, c, p, g)
				mustRelease(t, c.a, p, g) // docker network rm
				mustReleasePool(t, c.a, p)
			},
		}
	}
	dynamic := func(point string) crashCase {
		return crashCase{
			point: point,
			setup: func(t *testing.T, c *crashEnv) crashCall {
				p := poolOf(t, c.a)
				mustAddr(t, c.a, p, "", gw)
				return crashCall{Call: "requestaddress", PoolID: p, Options: mac("02:00:00:00:60:01")}
			},
			after: func(t *testing.T, c *crashEnv, call crashCall) {
				p := call.PoolID
				// Docker's retry: the container starts again, with a new
				// random MAC.
				y := hostOf(mustAddr(t, c.a, p, "", mac("02:00:00:00:60:02")))
				if r := heldBy(t, c, p, y); r.MAC != "02:00:00:00:60:02" || r.Node != "a" {
					t.Fatalf("retry got %s held as %+v", y, r)
				}
				sweepAll(t, c, bindOnly(y), usesN(1))
				if r := heldBy(t, c, p, y); r.tombstone() {
					t.Fatalf("the sweep reclaimed the retry's bound address: %+v", r)
				}
				onlyAddrs(t, c, p, "10.60.0.1", y)
				mustRelease(t, c.a, p, y)
				mustRelease(t, c.a, p, "10.60.0.1")
				mustReleasePool(t, c.a, p)
			},
		}
	}
	static := func(point string) crashCase {
		return crashCase{
			point: point,
			setup: func(t *testing.T, c *crashEnv) crashCall {
				p := poolOf(t, c.a)
				mustAddr(t, c.a, p, "", gw)
				o := map[string]string{EndpointNameOption: "web", MACAddressOption: "02:00:00:00:61:01"}
				return crashCall{Call: "requestaddress", PoolID: p, Address: "10.60.0.9", Options: o}
			},
			after: func(t *testing.T, c *crashEnv, call crashCall) {
				p := call.PoolID
				// Docker v29's retry names the same endpoint (new MAC).
				o := map[string]string{EndpointNameOption: "web", MACAddressOption: "02:00:00:00:61:02"}
				if got := hostOf(mustAddr(t, c.a, p, "10.60.0.9", o)); got != "10.60.0.9" {
					t.Fatalf("retry got %s", got)
				}
				sweepAll(t, c, bindOnly("10.60.0.9"), usesN(1))
				onlyAddrs(t, c, p, "10.60.0.1", "10.60.0.9")
				mustRelease(t, c.a, p, "10.60.0.9")
				mustRelease(t, c.a, p, "10.60.0.1")
				mustReleasePool(t, c.a, p)
			},
		}
	}
	release := func(point string) crashCase {
		return crashCase{
			point: point,
			setup: func(t *testing.T, c *crashEnv) crashCall {
				p := poolOf(t, c.a)
				mustAddr(t, c.a, p, "", gw)
				x := hostOf(mustAddr(t, c.a, p, "", mac("02:00:00:00:62:01")))
				return crashCall{Call: "releaseaddress", PoolID: p, Address: x}
			},
			after: func(t *testing.T, c *crashEnv, call crashCall) {
				p := call.PoolID
				// Docker does not retry a failed release; a new container
				// comes and must not get a held address; the sweep frees
				// the lost release's address.
				y := hostOf(mustAddr(t, c.a, p, "", mac("02:00:00:00:62:02")))
				if y == call.Address {
					if r := heldBy(t, c, p, y); r.MAC != "02:00:00:00:62:02" {
						t.Fatalf("%s handed out while held: %+v", y, r)
					}
				}
				sweepAll(t, c, bindOnly(y), usesN(1))
				onlyAddrs(t, c, p, "10.60.0.1", y)
				mustRelease(t, c.a, p, call.Address) // dockerd's clean-up repeats it: harmless
				if r := heldBy(t, c, p, y); r.MAC != "02:00:00:00:62:02" || r.tombstone() {
					t.Fatalf("the new container's %s after the sweep: %+v", y, r)
				}
				mustRelease(t, c.a, p, y)
				mustRelease(t, c.a, p, "10.60.0.1")
				mustReleasePool(t, c.a, p)
			},
		}
	}
	releasePool := func(point string) crashCase {
		return crashCase{
			point: point,
			setup: func(t *testing.T, c *crashEnv) crashCall {
				p := poolOf(t, c.a)
				mustAddr(t, c.a, p, "", mac("02:00:00:00:63:01")) // a leftover record
				return crashCall{Call: "releasepool", PoolID: p}
			},
			after: func(t *testing.T, c *crashEnv, call crashCall) {
				// Docker does not retry; the network is gone (uses 0).
				sweepAll(t, c, bindOnly(), usesN(0))
				// The subnet is free again for a new network.
				p := poolOf(t, c.a)
				mustReleasePool(t, c.a, p)
			},
		}
	}
	crashCases = []crashCase{
		pool("requestpool/before-commit"), pool("requestpool/after-commit"),
		join("requestpool/join-before-commit"), join("requestpool/join-after-commit"),
		gateway("requestaddress/gateway-before-commit"), gateway("requestaddress/gateway-after-commit"),
		dynamic("requestaddress/before-commit"), dynamic("requestaddress/after-commit"),
		static("requestaddress/static-before-commit"), static("requestaddress/static-after-commit"),
		release("releaseaddress/before-commit"), release("releaseaddress/after-commit"),
		releasePool("releasepool/before-commit"), releasePool("releasepool/after-commit"),
		releasePool("releasepool/after-addresses"),
	}
}

// TestCrashPoints kills a child process running one IPAM call at each
// fault point of the package (a real SIGKILL, see internal/fault), then
// restarts host "a" on the same store and replays what Docker does next:
// its retry succeeds, no address is handed out twice, and after the sweeps
// and Docker's removals the store is empty (nothing leaked).
func TestCrashPoints(t *testing.T) {
	if os.Getenv(crashChildEnv) != "" {
		t.Skip("in the child")
	}
	// Every fault point of the package is covered.
	var points []string
	files, _ := filepath.Glob("*.go")
	re := regexp.MustCompile(`fault\.Point\("([^"]+)"\)`)
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range re.FindAllStringSubmatch(string(b), -1) {
			points = append(points, m[1])
		}
	}
	for _, p := range points {
		if !slices.ContainsFunc(crashCases, func(c crashCase) bool { return c.point == p }) {
			t.Errorf("fault point %q has no crash case", p)
		}
	}
	t.Logf("%d fault points, %d crash cases", len(points), len(crashCases))

	t.Run("embedded", func(t *testing.T) {
		for _, cc := range crashCases {
			t.Run(cc.point, func(t *testing.T) {
				path := filepath.Join(t.TempDir(), "kv.db")
				runCrash(t, cc, crashCall{Store: "embedded", Path: path})
			})
		}
	})
	t.Run("consul", func(t *testing.T) {
		agent := testenv.StartConsul(t)
		if agent == nil {
			return
		}
		for _, cc := range crashCases {
			t.Run(cc.point, func(t *testing.T) {
				runCrash(t, cc, crashCall{Store: "consul", Addr: agent.Addr, Prefix: "ipam-crash/" + randomID()})
			})
		}
	})
}

func runCrash(t *testing.T, cc crashCase, where crashCall) {
	clk := newClock()
	clk.t = time.Now() // the child writes real times
	var closers []func()
	env := &crashEnv{clk: clk}
	start := func() {
		var stores []kvstore.Store
		newClient := func() kvstore.Store {
			if where.Store == "consul" {
				s := consulClient(t, where.Addr, where.Prefix)
				stores = append(stores, s)
				return s
			}
			s, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: where.Path, Prefix: "test"})
			if err != nil {
				t.Fatalf("open embedded store: %v", err)
			}
			stores = append(stores, s)
			return s
		}
		env.cluster = &cluster{t: t, newClient: newClient, inspect: newClient()}
		env.a = clk.on(env.host("a"))
		env.b = clk.on(env.host("b"))
		closers = append(closers, func() {
			for _, s := range stores {
				s.Close()
			}
		})
	}
	stop := func() {
		for _, f := range closers {
			f()
		}
		closers = nil
	}
	defer stop()
	start()
	call := cc.setup(t, env)
	stop()

	call.Store, call.Path, call.Addr, call.Prefix, call.Node = where.Store, where.Path, where.Addr, where.Prefix, "a"
	spec, _ := json.Marshal(call)
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+string(spec), fault.EnvVar+"="+cc.point)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("child did not die: %v\n%s", err, out)
	}
	if ws := ee.Sys().(syscall.WaitStatus); !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("child ended with %v, not killed at %s:\n%s", ws, cc.point, out)
	}

	start() // the plugin restarts
	cc.after(t, env, call)
	env.empty()
}
