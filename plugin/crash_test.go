package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/fault"
	"consul-overlay/internal/testenv"
)

// The crash-injection test (issue 11). For every crash point in the
// plugin's source (a fault.Point call, found by reading the source), a
// scenario arms the point on host A, drives Docker's whole lifecycle of a
// network and two containers against A while host B holds a container on
// the same logical network, and lets the plugin die there by SIGKILL. The
// test restarts A unarmed, replays what the engine does after that error
// (each replay says which engine behaviour it models), and checks:
//
//   - after every call: no address held twice, and every address Docker
//     holds is recorded in the store as held by its holder;
//   - the retry succeeds, and a container made by the retry is reachable
//     from host B;
//   - B's container keeps reaching A's first container across the crash
//     and restart (the kernel carries running containers);
//   - once A's containers are gone (the networks still up), the store
//     holds the keys it held before them: an orphan that Docker will never
//     release (an address committed before the crash, an endpoint record
//     that never joined) must be reclaimed by the plugin within
//     reclaimWait;
//   - after everything is removed on both hosts: no key under the prefix
//     (but the documented survivors), no overlay link, no CONSUL-OVERLAY
//     rule, no service the scenario registered.
//
// A second part, kill-9, SIGKILLs A at random moments during 20 attach
// and detach cycles and checks the same invariants.
//
// Run it (as root, with a Consul binary):
//
//	CONSUL_BIN=/work/bin/consul CGO_ENABLED=1 go test -race -count=1 -run Crash -v ./plugin/
//
// One point alone: -run 'Crash/points/createnetwork/after-membership'.

// lifecycleCalls are the calls of the Docker lifecycle, by the prefix of
// their crash points ("<call>/<step>").
var lifecycleCalls = []string{
	"requestpool", "requestaddress", "createnetwork", "createendpoint", "join",
	"leave", "deleteendpoint", "releaseaddress", "deletenetwork", "releasepool",
}

// needsSpecialTrigger lists crash points that the Docker lifecycle below
// cannot reach, each with what would reach it. A listed point that is not
// reached is logged, not failed. Keep it small: every entry is a crash
// window this test does not cover.
var needsSpecialTrigger = map[string]string{
	// Reaping runs on a live host for another host gone past HOST_GRACE
	// (minutes), not in Docker's lifecycle; package reaper's tests
	// interrupt a reap after each step and check that the next pass
	// finishes it.
	"reap/after-cluster":     "a host gone past HOST_GRACE (reaper tests)",
	"reap/after-ipam":        "a host gone past HOST_GRACE (reaper tests)",
	"reap/after-services":    "a host gone past HOST_GRACE (reaper tests)",
	"reap/after-host-record": "a host gone past HOST_GRACE (reaper tests)",
}

// allowedLeftovers are the keys (relative to the prefix) documented to stay
// in the store once every network is removed on every host. Anything else
// under the prefix is a leak.
var allowedLeftovers = []*regexp.Regexp{
	// A host's identity record (issue 11, "Host identity"), claimed by
	// each running plugin: it outlives the networks by design.
	regexp.MustCompile(`^hosts/[^/]+$`),
	// A host's membership proof (package cluster keeps it by design, as
	// the proof at restart that the store is the host's).
	regexp.MustCompile(`^members/[^/]+$`),
}

// crashPluginEnv is added to every plugin the crash test starts. Orphans
// that Docker never releases (an address committed before a crash in
// RequestAddress, an endpoint record that never joined) are reclaimed by
// the plugin after a grace period; a setting that shortens that period
// for tests belongs here.
var crashPluginEnv = []string{"IPAM_GRACE=2s"}

// reclaimedByEngine lists crash points whose leftovers only the Docker
// engine's word can reclaim: the plugin asks the engine (whose ID it
// pinned) which networks exist, in the background, and this harness runs
// the plugins without an engine (DOCKER_HOST=none). For these points the
// test still checks that Docker's retry succeeds and that no address is
// held twice, and logs what is left instead of failing on it; the
// reclaiming itself is proven where an engine answers (the driver's
// PruneNetworks and IPAM's SweepPools tests).
var reclaimedByEngine = map[string]string{
	"createnetwork/after-membership": "the binding of a Docker network ID the engine never got goes when the engine says it has no such network (PruneNetworks)",
	"createnetwork/after-kernel":     "the binding of a Docker network ID the engine never got goes when the engine says it has no such network (PruneNetworks)",
	"requestpool/after-commit":       "a pool hold the engine never got goes when no network of the engine uses the pool (SweepPools)",
	"requestpool/join-after-commit":  "a pool hold the engine never got goes when no network of the engine uses the pool (SweepPools)",
}

// reclaimWait bounds how long the final checks wait for the plugins to
// reclaim orphans and for deregistrations to land.
const reclaimWait = 20 * time.Second

// maxAttempts bounds how often the test retries one Docker operation.
const maxAttempts = 8

// armPhase is when host A's plugin is restarted with the point armed.
type armPhase int

const (
	// armAtStart: before `docker network create` on A, so the point fires
	// the first time any call reaches it.
	armAtStart armPhase = iota
	// armAtSecondRun: after A's first container runs (B pinging it
	// throughout), before the second `docker run` on A. The point fires
	// while a container of A is live, and reaches the container path of
	// RequestAddress.
	armAtSecondRun
	// armAtNetworkRemove: after every container is gone, before `docker
	// network rm` on A (reaches the gateway path of ReleaseAddress).
	armAtNetworkRemove
)

func (p armPhase) String() string {
	return [...]string{"armed-at-start", "armed-at-second-run", "armed-at-network-rm"}[p]
}

// phasesFor returns the arm phases of a point: each reaches the point on
// another path of its call. Points of the container calls fire while
// another container of A is live: CreateEndpoint and Join are armed at the
// second run; Leave, DeleteEndpoint and ReleaseAddress, armed at start,
// are first reached by the third container's removal.
func phasesFor(point string) []armPhase {
	call, _, _ := strings.Cut(point, "/")
	switch call {
	case "requestaddress":
		return []armPhase{armAtStart, armAtSecondRun} // the gateway, then a container
	case "releaseaddress":
		return []armPhase{armAtStart, armAtNetworkRemove} // a container, then the gateway
	case "createendpoint", "join":
		return []armPhase{armAtSecondRun}
	}
	return []armPhase{armAtStart}
}

func TestCrash(t *testing.T) {
	requireNsenter(t)
	points := findFaultPoints(t)
	env := newCrashEnv(t)

	t.Run("points", func(t *testing.T) {
		if len(points) == 0 {
			msg := "no fault.Point(\"<call>/<step>\") in the module's source: no crash point to test"
			if testenv.InCI() {
				t.Fatal(msg + "; CI=true forbids a test that cannot fail")
			}
			t.Skip(msg)
		}
		t.Logf("%d crash points found: %s", len(points), strings.Join(points, " "))
		var tested, reached, special, scenarios int
		for _, point := range points {
			t.Run(point, func(t *testing.T) {
				tested++
				call, _, _ := strings.Cut(point, "/")
				if !slices.Contains(lifecycleCalls, call) {
					t.Logf("point %s: %q is not one of the lifecycle's calls %v", point, call, lifecycleCalls)
				}
				got := false
				// First with A creating the logical network and removing
				// it last; if no phase reaches the point there, with A
				// joining B's network and leaving while B stays.
				for _, bFirst := range []bool{false, true} {
					for _, ph := range phasesFor(point) {
						sc := scenario{point: point, arm: ph, bFirst: bFirst}
						t.Run(sc.name(), func(t *testing.T) {
							scenarios++
							runScenario(t, env, sc, &got)
						})
					}
					if got {
						break
					}
				}
				switch {
				case got:
					reached++
				case needsSpecialTrigger[point] != "":
					special++
					t.Logf("point %s not reached by the lifecycle: %s", point, needsSpecialTrigger[point])
				default:
					t.Errorf("point %s was never reached by Docker's lifecycle (A first or B first); make it reachable or list it in needsSpecialTrigger", point)
				}
			})
		}
		t.Logf("crash points: %d found, %d tested, %d reached and replayed, %d need a special trigger; %d scenarios run", len(points), tested, reached, special, scenarios)
	})

	t.Run("kill-9", func(t *testing.T) {
		runKill9(t, env)
	})

	// The plugin killed after Join answered and before its join record
	// was written, restarted before the engine moved the interface: the
	// container that runs is registered all the same, and its endpoint is
	// not taken for an orphan.
	t.Run("kill-9-after-join", func(t *testing.T) {
		r := newCrashRun(t, env, scenario{})
		n := r.networkCreate()
		r.bUp()
		r.killAfterJoin = true
		c := r.containerRun(n, netip.Addr{})
		if len(r.crashes) != 1 {
			t.Fatalf("crashes: %v, want the kill after Join", r.crashes)
		}
		r.reachFromB(c)
		r.containerStop(c)
		r.bDown()
		r.networkRemove(n)
		r.checkClean()
	})
}

// findFaultPoints returns the crash points of the module's source. A
// point the test cannot arm fails the test.
func findFaultPoints(t *testing.T) []string {
	t.Helper()
	root, err := testenv.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	names, sites, problems, err := scanFaultPoints(root)
	if err != nil {
		t.Fatalf("scan the module for fault points: %v", err)
	}
	for _, p := range problems {
		t.Error(p)
	}
	for _, name := range names {
		if s := sites[name]; len(s) > 1 {
			// Legal, but only the first site reached in a run is tested.
			t.Logf("fault point %s is placed %d times (%s)", name, len(s), strings.Join(s, ", "))
		}
	}
	return names
}

var pointName = regexp.MustCompile(`^[a-z0-9]+/[a-z0-9-]+$`)

// scanFaultPoints parses every non-test Go file under root for crash
// points and returns their names, sorted and unique, with where each is
// placed. A point is a call of fault.Point (under whatever name the file
// imports the package) with a string literal, or a call with a string
// literal of a wrapper: a function or method of the same package that
// passes one of its parameters to fault.Point (driver's d.point(name)).
// Any other argument is a problem: the test could not arm the point.
func scanFaultPoints(root string) (names []string, sites map[string][]string, problems []string, err error) {
	const faultPath = "consul-overlay/internal/fault"
	fset := token.NewFileSet()
	pkgs := map[string][]*ast.File{} // by directory
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			n := d.Name()
			if p != root && (strings.HasPrefix(n, ".") || strings.HasPrefix(n, "_") || n == "testdata" || n == "vendor") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, p, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		pkgs[filepath.Dir(p)] = append(pkgs[filepath.Dir(p)], f)
		return nil
	})
	if err != nil {
		return nil, nil, nil, err
	}
	sites = map[string][]string{}
	site := func(n ast.Node) string {
		pos := fset.Position(n.Pos())
		rel, _ := filepath.Rel(root, pos.Filename)
		return fmt.Sprintf("%s:%d", rel, pos.Line)
	}
	// record takes the name argument of a point call.
	record := func(call *ast.CallExpr, arg ast.Expr, what string) {
		lit, ok := arg.(*ast.BasicLit)
		if !ok || lit.Kind != token.STRING {
			problems = append(problems, fmt.Sprintf("%s: %s without a string literal name: the crash test cannot find and arm it", site(call), what))
			return
		}
		name, err := strconv.Unquote(lit.Value)
		if err != nil || !pointName.MatchString(name) {
			problems = append(problems, fmt.Sprintf("%s: fault point name %s is not \"<call>/<step>\" in lower case", site(call), lit.Value))
			return
		}
		sites[name] = append(sites[name], site(call))
	}
	// calledName is the function or method name a call calls.
	calledName := func(call *ast.CallExpr) string {
		switch f := call.Fun.(type) {
		case *ast.Ident:
			return f.Name
		case *ast.SelectorExpr:
			return f.Sel.Name
		}
		return ""
	}
	dirs := make([]string, 0, len(pkgs))
	for d := range pkgs {
		dirs = append(dirs, d)
	}
	slices.Sort(dirs)
	for _, dir := range dirs {
		wrappers := map[string]int{} // name → index of the point name parameter
		for _, f := range pkgs[dir] {
			local := ""
			for _, imp := range f.Imports {
				if ip, _ := strconv.Unquote(imp.Path.Value); ip == faultPath {
					local = "fault"
					if imp.Name != nil {
						local = imp.Name.Name
					}
				}
			}
			if local == "" {
				continue
			}
			isPoint := func(call *ast.CallExpr) bool {
				sel, ok := call.Fun.(*ast.SelectorExpr)
				if !ok || sel.Sel.Name != "Point" {
					return false
				}
				x, ok := sel.X.(*ast.Ident)
				return ok && x.Name == local
			}
			for _, decl := range f.Decls {
				fn, ok := decl.(*ast.FuncDecl)
				if !ok || fn.Body == nil {
					continue
				}
				var params []string
				for _, fld := range fn.Type.Params.List {
					for _, id := range fld.Names {
						params = append(params, id.Name)
					}
				}
				ast.Inspect(fn.Body, func(m ast.Node) bool {
					call, ok := m.(*ast.CallExpr)
					if !ok || !isPoint(call) {
						return true
					}
					var arg ast.Expr
					if len(call.Args) == 1 {
						arg = call.Args[0]
					}
					if id, ok := arg.(*ast.Ident); ok {
						if i := slices.Index(params, id.Name); i >= 0 {
							wrappers[fn.Name.Name] = i
							return true
						}
					}
					record(call, arg, "fault.Point")
					return true
				})
			}
		}
		if len(wrappers) == 0 {
			continue
		}
		for _, f := range pkgs[dir] {
			ast.Inspect(f, func(n ast.Node) bool {
				call, ok := n.(*ast.CallExpr)
				if !ok {
					return true
				}
				name := calledName(call)
				i, ok := wrappers[name]
				if !ok || i >= len(call.Args) {
					return true
				}
				record(call, call.Args[i], "crash point wrapper "+name)
				return true
			})
		}
	}
	for name := range sites {
		names = append(names, name)
	}
	slices.Sort(names)
	return names, sites, problems, nil
}

// TestCrashPointScan: the scanner finds points under any import name, in
// any package and through a package's wrapper of fault.Point, and only
// real calls of the fault package's Point.
func TestCrashPointScan(t *testing.T) {
	root := t.TempDir()
	files := map[string]string{
		"go.mod": "module consul-overlay\n",
		"driver/a.go": `package driver

// Mentions of fault.Point("doc/comment") in comments do not count.
import "consul-overlay/internal/fault"

func A() {
	fault.Point("createnetwork/after-membership")
	defer fault.Point("createnetwork/after-kernel")
	fault.Point("createnetwork/after-membership")
}

type D struct{}

// point is a wrapper: its calls with a literal are points.
func (d *D) point(name string) { fault.Point(name) }
`,
		"driver/c.go": `package driver

func (d *D) Delete() {
	d.point("deletenetwork/after-leave")
}
`,
		"other/e.go": `package other

type x struct{}

func (x) point(string) {}

// Not a wrapper of this package: not a point.
func E() { x{}.point("other/not-a-point") }
`,
		"ipam/b.go": `package ipam

import f "consul-overlay/internal/fault"

type other struct{}

func (other) Point(string) {}

func B(name string) {
	f.Point("requestaddress/after-commit")
	f.Point(name + "/x")
	f.Point("Bad Name")
	var fault other
	fault.Point("not/a-point")
}
`,
		"driver/a_test.go": "package driver\n\nimport \"consul-overlay/internal/fault\"\n\nfunc T() { fault.Point(\"test/only\") }\n",
		"testdata/c.go":    "package x\n\nimport \"consul-overlay/internal/fault\"\n\nfunc C() { fault.Point(\"testdata/only\") }\n",
		"noimport/d.go":    "package noimport\n\nfunc D() { fault.Point(\"no/import\") }\n",
	}
	for name, body := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	names, sites, problems, err := scanFaultPoints(root)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"createnetwork/after-kernel", "createnetwork/after-membership", "deletenetwork/after-leave", "requestaddress/after-commit"}
	if !slices.Equal(names, want) {
		t.Errorf("points %v, want %v", names, want)
	}
	if s := sites["createnetwork/after-membership"]; len(s) != 2 || s[0] != filepath.Join("driver", "a.go")+":7" {
		t.Errorf("sites of createnetwork/after-membership: %v", s)
	}
	if len(problems) != 2 {
		t.Errorf("problems %q, want the non-literal and the bad name", problems)
	}
}

// crashEnv is what every scenario shares: two test hosts with a Consul
// agent each (a server on host0, a client on host1 joined to it). Each
// scenario has its own KV prefix, plugins and data directories.
type crashEnv struct {
	hosts   []*testenv.Host
	agents  []*testenv.ConsulAgent
	clients []*api.Client
	seq     int
}

func newCrashEnv(t *testing.T) *crashEnv {
	t.Helper()
	hosts, server, client := agentPerHost(t)
	e := &crashEnv{hosts: hosts, agents: []*testenv.ConsulAgent{server, client}}
	for _, a := range e.agents {
		e.clients = append(e.clients, consulClient(t, a))
	}
	return e
}

// scenario is one armed run of the lifecycle.
type scenario struct {
	point  string // "" arms nothing
	arm    armPhase
	bFirst bool // B creates the logical network first and removes it last
}

func (s scenario) name() string {
	if s.bFirst {
		return s.arm.String() + "+b-first"
	}
	return s.arm.String()
}

// hold is an address that Docker holds (as the engine's state would say).
type hold struct {
	host, kind string // kind: "gateway" or "endpoint"
	addr       netip.Addr
	mac        string
}

// crashRun plays dockerd on both hosts for one scenario. Host A is the one
// that crashes; B never does.
type crashRun struct {
	t      *testing.T
	env    *crashEnv
	sc     scenario
	prefix string
	name   string // the logical network's name
	subnet string
	static netip.Addr // the address of `docker run --ip`
	epOpts map[string]any

	a, b   *pluginProc
	bn     *dockerNet
	bc     *container
	armed  bool
	holds  map[string]hold // by host and address
	kv     *api.KV
	before map[string]bool // services on the agents before the scenario

	crashes []string // the calls during or after which A died
	reached *bool    // set when A dies: the armed point was reached
	kill9   *killer  // random kills, or nil
	// killAfterJoin: the next Join's answer is followed by a kill -9 of A
	// and a restart that restores its state before the engine moves the
	// interface into the container.
	killAfterJoin bool
}

// killer SIGKILLs A at random moments: with probability prob, a call on A
// arms a timer of up to maxDelay that kills the process during the call;
// if the call answers first, half the time A is killed just after it.
type killer struct {
	rng      *mrand.Rand
	prob     float64
	maxDelay time.Duration
	kills    int
}

func newCrashRun(t *testing.T, env *crashEnv, sc scenario) *crashRun {
	t.Helper()
	env.seq++
	r := &crashRun{
		t: t, env: env, sc: sc,
		prefix: "co-crash-" + randomID()[:8] + "/",
		name:   fmt.Sprintf("crash%d", env.seq),
		subnet: "10.77.0.0/24",
		static: netip.MustParseAddr("10.77.0.200"),
		epOpts: map[string]any{
			"SERVICE_NAME": "crash",
			"com.docker.network.endpoint.exposedports": []map[string]int{{"Proto": 6, "Port": 80}},
		},
		holds:  map[string]hold{},
		kv:     env.clients[0].KV(),
		before: map[string]bool{},
	}
	for _, c := range env.clients {
		svcs, err := c.Agent().Services()
		if err != nil {
			t.Fatal(err)
		}
		for id := range svcs {
			r.before[id] = true
		}
	}
	// Registered first, so it runs last, after the plugins are stopped: a
	// failed scenario must not leave objects that fail the next one.
	t.Cleanup(func() {
		if t.Failed() {
			r.scrub()
		}
	})
	r.a = startPlugin(t, "host0", env.hosts[0], env.agents[0].Addr, r.prefix)
	r.b = startPlugin(t, "host1", env.hosts[1], env.agents[1].Addr, r.prefix)
	if len(crashPluginEnv) > 0 {
		for _, p := range []*pluginProc{r.a, r.b} {
			p.stop(syscall.SIGTERM)
			p.env = append(p.env, crashPluginEnv...)
			p.start()
		}
	}
	return r
}

// runScenario runs one armed lifecycle; it sets *reached when the armed
// point was reached (even if the scenario then fails).
func runScenario(t *testing.T, env *crashEnv, sc scenario, reached *bool) {
	r := newCrashRun(t, env, sc)
	r.reached = reached
	start := time.Now()
	r.lifecycle()
	if len(r.crashes) > 0 {
		verdict := "the retry succeeded and nothing leaked"
		if t.Failed() {
			verdict = "invariants broken (above)"
		}
		t.Logf("%s reached: plugin killed during %s; restarted and replayed: %s (%s)", sc.point, strings.Join(r.crashes, ", "), verdict, time.Since(start).Round(time.Millisecond))
	} else {
		t.Logf("%s not reached in this order and phase (%s)", sc.point, time.Since(start).Round(time.Millisecond))
	}
}

// lifecycle: network create on both hosts, three containers on A (the
// first pinged from B throughout, the third with a static address), all
// stopped, network rm on both.
func (r *crashRun) lifecycle() {
	t := r.t
	if r.sc.bFirst {
		r.bUp()
	}
	if r.sc.arm == armAtStart {
		r.arm()
	}
	n := r.networkCreate()
	if !r.sc.bFirst {
		r.bUp()
	}
	base := r.keySet()
	c1 := r.containerRun(n, netip.Addr{})
	r.reachFromB(c1)
	// From here until c1 stops, B's container pings c1 without a pause:
	// whatever happens to A's plugin, a running container keeps its path.
	ping := startBackgroundPing(t, r.bc, c1.addr4.Addr())
	if r.sc.arm == armAtSecondRun {
		r.arm()
	}
	c2 := r.containerRun(n, netip.Addr{})
	r.reachFromB(c2)
	c3 := r.containerRun(n, r.static) // docker run --ip
	r.reachFromB(c3)
	r.containerStop(c3)
	r.containerStop(c2)
	ping.stopAndCheck(t, "B's container to A's running container "+c1.addr4.Addr().String())
	r.containerStop(c1)
	r.checkNoOrphans(base, "A's containers were removed")
	if !r.sc.bFirst {
		r.bDown()
	}
	if r.sc.arm == armAtNetworkRemove {
		r.arm()
	}
	r.networkRemove(n)
	if r.sc.bFirst {
		r.bDown()
	}
	r.checkClean()
}

// arm restarts A with the scenario's point armed.
func (r *crashRun) arm() {
	if r.sc.point == "" {
		return
	}
	r.a.stop(syscall.SIGTERM)
	r.a.env = append(r.a.env, fault.EnvVar+"="+r.sc.point)
	r.a.start()
	r.armed = true
}

// restartA starts A again, unarmed, after it died.
func (r *crashRun) restartA() {
	env := r.a.env[:0]
	for _, kv := range r.a.env {
		if !strings.HasPrefix(kv, fault.EnvVar+"=") {
			env = append(env, kv)
		}
	}
	r.a.env = env
	r.armed = false
	if tr, ok := r.a.client.Transport.(*http.Transport); ok {
		tr.CloseIdleConnections()
	}
	r.a.start()
}

// try makes one call on A. It reports false when A was killed during the
// call (it has been restarted then); a real error from a living plugin
// fails the test. If A was killed just after a successful call, it is
// restarted and the call counts as done.
func (r *crashRun) try(method string, req, resp any) bool {
	r.t.Helper()
	ok, err := r.attempt(method, req, resp)
	if err != nil {
		r.t.Fatalf("%s on host A: %v (the plugin is alive: a real error, not a crash)", method, err)
	}
	return ok
}

// attempt is try that returns the error of a living plugin instead of
// failing the test.
func (r *crashRun) attempt(method string, req, resp any) (bool, error) {
	t := r.t
	t.Helper()
	a := r.a
	var timer *time.Timer
	k := r.kill9
	if k != nil && k.rng.Float64() < k.prob {
		proc := a.cmd.Process
		timer = time.AfterFunc(time.Duration(k.rng.Int64N(int64(k.maxDelay))), func() { _ = proc.Signal(syscall.SIGKILL) })
	}
	err := a.call(method, req, resp)
	killed := timer != nil && !timer.Stop()
	if timer != nil && !killed && k.rng.Float64() < 0.5 {
		// The call answered before the kill's moment: half of those are
		// killed just after the answer instead, so a plugin whose calls
		// are fast is still killed (after its write, before anything
		// that follows it).
		_ = a.cmd.Process.Signal(syscall.SIGKILL)
		killed = true
	}
	if err == nil && !killed {
		return true, nil
	}
	select {
	case <-a.done:
	case <-time.After(3 * time.Second):
		return false, err
	}
	ws, _ := a.cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("plugin A ended with %v during %s (call error: %v), want SIGKILL", a.cmd.ProcessState, method, err)
	}
	what := strings.TrimPrefix(method, "/")
	if err == nil {
		what += " (after it answered)"
	}
	r.crashes = append(r.crashes, what)
	if r.reached != nil {
		*r.reached = true
	}
	if r.kill9 != nil {
		r.kill9.kills++
	}
	if r.sc.point != "" && !r.armed {
		t.Fatalf("plugin A was SIGKILLed during %s with no point armed", method)
	}
	r.restartA()
	return err == nil, nil
}

// retry makes a call on A until it succeeds. It models the engine
// replaying the same request: its plugin client retries a failed
// connection for 30 s (the restarted plugin answers within that), and
// the user runs `docker rm` or `docker network rm` again after an error.
func (r *crashRun) retry(method string, req, resp any) {
	r.t.Helper()
	for range maxAttempts {
		if r.try(method, req, resp) {
			return
		}
	}
	r.t.Fatalf("%s on host A did not succeed in %d attempts", method, maxAttempts)
}

// do is retry followed by the address check.
func (r *crashRun) do(method string, req, resp any) {
	r.t.Helper()
	r.retry(method, req, resp)
	r.checkAddrs(method)
}

// releaseAddress gives an address of A back to IPAM (retried as retry
// says) and checks what is still held.
func (r *crashRun) releaseAddress(poolID string, a netip.Addr) {
	r.t.Helper()
	r.retry("/IpamDriver.ReleaseAddress", map[string]any{"PoolID": poolID, "Address": a.String()}, nil)
	r.release("A", a)
	r.checkAddrs("ReleaseAddress " + a.String())
}

// networkCreate runs `docker network create -d consul-overlay --ipam-driver
// consul-overlay --subnet S -o name=N` on A until it succeeds, as the user
// runs it again after an error.
func (r *crashRun) networkCreate() *dockerNet {
	r.t.Helper()
	for range maxAttempts {
		if n := r.tryNetworkCreate(); n != nil {
			return n
		}
	}
	r.t.Fatalf("docker network create on host A failed %d times", maxAttempts)
	return nil
}

func (r *crashRun) tryNetworkCreate() *dockerNet {
	var spaces struct{ LocalDefaultAddressSpace, GlobalDefaultAddressSpace string }
	if !r.try("/IpamDriver.GetDefaultAddressSpaces", nil, &spaces) {
		return nil
	}
	// A new network ID on each attempt: a new `docker network create`.
	n := &dockerNet{p: r.a, id: randomID(), space: spaces.LocalDefaultAddressSpace}
	var pr struct {
		PoolID, Pool string
		Data         map[string]string
	}
	if !r.try("/IpamDriver.RequestPool", map[string]any{"AddressSpace": n.space, "Pool": r.subnet, "V6": false}, &pr) {
		// The engine never got a pool ID: it has nothing to release.
		return nil
	}
	r.checkAddrs("RequestPool")
	n.pool4, n.subnet4 = pr.PoolID, pr.Pool
	var ar struct{ Address string }
	if !r.try("/IpamDriver.RequestAddress", map[string]any{"PoolID": n.pool4, "Options": map[string]string{"RequestAddressType": "com.docker.network.gateway"}}, &ar) {
		// libnetwork's ipamAllocateVersion releases the pool when the
		// gateway request fails.
		r.do("/IpamDriver.ReleasePool", map[string]any{"PoolID": n.pool4}, nil)
		return nil
	}
	n.gw4 = ar.Address
	gw := netip.MustParsePrefix(ar.Address).Addr()
	r.hold("A", "gateway", gw, "")
	r.checkAddrs("RequestAddress(gateway)")
	req := map[string]any{
		"NetworkID": n.id,
		"Options": map[string]any{
			"com.docker.network.generic":     map[string]string{"name": r.name},
			"com.docker.network.enable_ipv6": false,
			"com.docker.network.enable_ipv4": true,
		},
		"IPv4Data": []map[string]any{{"AddressSpace": n.space, "Pool": n.subnet4, "Gateway": n.gw4}},
	}
	if !r.try("/NetworkDriver.CreateNetwork", req, nil) {
		// libnetwork's NewNetwork: a failed CreateNetwork runs the
		// deferred ipamRelease (ReleaseAddress of the gateway, then
		// ReleasePool); no DeleteNetwork, since the create failed.
		r.releaseAddress(n.pool4, gw)
		r.do("/IpamDriver.ReleasePool", map[string]any{"PoolID": n.pool4}, nil)
		return nil
	}
	r.checkAddrs("CreateNetwork")
	return n
}

// networkRemove runs `docker network rm` on A. Each call is retried on a
// crash: the user runs `docker network rm` again after its error
// (DeleteNetwork), and the engine's plugin client retries the connection
// (ReleaseAddress and ReleasePool, whose errors it would only log).
func (r *crashRun) networkRemove(n *dockerNet) {
	r.do("/NetworkDriver.DeleteNetwork", map[string]any{"NetworkID": n.id}, nil)
	gw := netip.MustParsePrefix(n.gw4).Addr()
	r.releaseAddress(n.pool4, gw)
	r.do("/IpamDriver.ReleasePool", map[string]any{"PoolID": n.pool4}, nil)
}

// containerRun runs `docker run --network N` on A (with --ip static if
// static is valid) until it succeeds, as the user runs it again after an
// error (a new endpoint each time).
func (r *crashRun) containerRun(n *dockerNet, static netip.Addr) *container {
	r.t.Helper()
	c := &container{n: n, ns: testenv.NewNetNS(r.t)}
	crashes := len(r.crashes)
	deadline := time.Now().Add(reclaimWait)
	for attempt := 1; ; attempt++ {
		ok, err := r.tryContainerRun(c, static)
		if ok {
			return c
		}
		if err != nil {
			// Only `docker run --ip` after a crash of its own run may be
			// refused for a while: the crashed attempt's orphan holds the
			// address until the plugin reclaims it. The user runs it again.
			if !static.IsValid() || len(r.crashes) == crashes || time.Now().After(deadline) {
				r.t.Fatalf("docker run on host A: /IpamDriver.RequestAddress: %v (the plugin is alive: a real error, not a crash)", err)
			}
			r.t.Logf("docker run --ip %s after the crash refused (%v); running it again", static, err)
			time.Sleep(500 * time.Millisecond)
			continue
		}
		if attempt >= maxAttempts {
			r.t.Fatalf("docker run on host A failed %d times", maxAttempts)
		}
	}
}

// tryContainerRun is one `docker run`. It reports false when A was killed
// (the engine has rolled back what it knew), and returns the error of a
// living plugin refusing the address request.
func (r *crashRun) tryContainerRun(c *container, static netip.Addr) (bool, error) {
	t, n := r.t, c.n
	c.eid, c.mac, c.src = randomID(), "", ""
	var caps struct{ RequiresMACAddress bool }
	if !r.try("/IpamDriver.GetCapabilities", nil, &caps) {
		return false, nil
	}
	opts := map[string]string{}
	if caps.RequiresMACAddress {
		// The engine makes a random MAC per endpoint and passes it to an
		// IPAM that requires one.
		mac := make([]byte, 6)
		_, _ = rand.Read(mac)
		mac[0] = mac[0]&0xfe | 0x02
		c.mac = net.HardwareAddr(mac).String()
		opts["com.docker.network.endpoint.macaddress"] = c.mac
	}
	areq := map[string]any{"PoolID": n.pool4, "Options": opts}
	if static.IsValid() {
		areq["Address"] = static.String()
	}
	var ar struct{ Address string }
	if ok, err := r.attempt("/IpamDriver.RequestAddress", areq, &ar); !ok {
		// The address never reached the engine: nothing to release.
		// Whatever the plugin committed is an orphan it must reclaim.
		return false, err
	}
	c.addr4 = netip.MustParsePrefix(ar.Address)
	if static.IsValid() && c.addr4.Addr() != static {
		t.Fatalf("docker run --ip %s got %s", static, c.addr4)
	}
	r.hold("A", "endpoint", c.addr4.Addr(), c.mac)
	r.checkAddrs("RequestAddress")
	undo := func() {
		r.do("/NetworkDriver.DeleteEndpoint", map[string]any{"NetworkID": n.id, "EndpointID": c.eid}, nil)
		r.releaseAddress(n.pool4, c.addr4.Addr())
	}
	iface := map[string]string{"Address": ar.Address, "MacAddress": c.mac}
	var cr struct{ Interface *struct{ MacAddress string } }
	if !r.try("/NetworkDriver.CreateEndpoint", map[string]any{"NetworkID": n.id, "EndpointID": c.eid, "Interface": iface, "Options": r.epOpts}, &cr) {
		// The engine rolls a failed CreateEndpoint back with
		// DeleteEndpoint and releases the endpoint's address.
		undo()
		return false, nil
	}
	if cr.Interface != nil && c.mac == "" {
		c.mac = cr.Interface.MacAddress
	}
	r.checkAddrs("CreateEndpoint")
	var jr struct {
		InterfaceName struct{ SrcName, DstPrefix string }
	}
	if !r.try("/NetworkDriver.Join", map[string]any{"NetworkID": n.id, "EndpointID": c.eid, "SandboxKey": c.ns.Path, "Options": r.epOpts}, &jr) {
		// sbJoin returns a failed Join before it sets its Leave-on-error
		// rollback; the failed start then deletes the endpoint
		// (DeleteEndpoint) and releases its address.
		undo()
		return false, nil
	}
	r.checkAddrs("Join")
	if r.killAfterJoin {
		r.killAfterJoin = false
		r.a.stop(syscall.SIGKILL)
		r.crashes = append(r.crashes, "NetworkDriver.Join (after it answered, before the interface moved)")
		// The kill came before the join record's write and the service's
		// registration, both in the background (here they usually land
		// first: they go as they would have).
		for k := range r.keySet() {
			if strings.HasPrefix(k, "joins/") && strings.HasSuffix(k, "/"+c.eid) {
				if _, err := r.kv.Delete(r.prefix+k, nil); err != nil {
					t.Fatal(err)
				}
			}
		}
		svcs, err := r.env.clients[0].Agent().ServicesWithFilter(fmt.Sprintf("Meta[\"endpoint-id\"] == %q", c.eid))
		if err != nil {
			t.Fatal(err)
		}
		for id := range svcs {
			if err := r.env.clients[0].Agent().ServiceDeregister(id); err != nil {
				t.Fatal(err)
			}
		}
		r.restartA()
		r.a.mustWork(t) // restored: the kernel read without the container
	}
	c.src = jr.InterfaceName.SrcName
	if err := testenv.MoveAndConfigure(n.p.host.NS, c.ns, c.src, jr.InterfaceName.DstPrefix+"0", []netip.Prefix{c.addr4}); err != nil {
		t.Fatalf("configure container interface %s: %v", c.src, err)
	}
	return true, nil
}

// containerStop runs `docker rm -f` on A: Leave, the interface back to the
// host, DeleteEndpoint, ReleaseAddress. The engine only logs a failed
// Leave, DeleteEndpoint or ReleaseAddress; its plugin client retries a
// failed connection, which reaches the restarted plugin, so each call is
// replayed as is. (dockerd's start-up cleanup replays DeleteEndpoint the
// same way.)
func (r *crashRun) containerStop(c *container) {
	r.do("/NetworkDriver.Leave", map[string]any{"NetworkID": c.n.id, "EndpointID": c.eid}, nil)
	if err := testenv.MoveBack(c.ns, c.n.p.host.NS, "eth0", c.src); err != nil {
		r.t.Logf("move %s back: %v", c.src, err)
	}
	r.do("/NetworkDriver.DeleteEndpoint", map[string]any{"NetworkID": c.n.id, "EndpointID": c.eid}, nil)
	r.releaseAddress(c.n.pool4, c.addr4.Addr())
}

// bUp creates the network on B and runs B's container there.
func (r *crashRun) bUp() {
	t := r.t
	n, err := r.b.createNetwork(netSpec{subnet4: r.subnet, opts: map[string]string{"name": r.name}})
	if err != nil {
		t.Fatalf("host B: docker network create: %v", err)
	}
	r.bn = n
	r.hold("B", "gateway", netip.MustParsePrefix(n.gw4).Addr(), "")
	r.checkAddrs("host B: network create")
	r.bc = n.runWith(t, r.epOpts)
	r.hold("B", "endpoint", r.bc.addr4.Addr(), r.bc.mac)
	r.checkAddrs("host B: docker run")
	// B's join record is written in the background: wait for it, or a
	// later keySet may take it for an orphan of A's (a run under load did).
	eventually(t, 10*time.Second, func() error {
		for k := range r.keySet() {
			if strings.HasPrefix(k, "joins/") && strings.HasSuffix(k, "/"+r.bc.eid) {
				return nil
			}
		}
		return fmt.Errorf("host B: no join record of endpoint %s yet", r.bc.eid[:12])
	})
}

// bDown stops B's container and removes the network on B.
func (r *crashRun) bDown() {
	r.bc.remove(r.t)
	r.release("B", r.bc.addr4.Addr())
	r.checkAddrs("host B: docker rm")
	if err := r.bn.remove(); err != nil {
		r.t.Fatalf("host B: docker network rm: %v", err)
	}
	r.release("B", netip.MustParsePrefix(r.bn.gw4).Addr())
	r.checkAddrs("host B: network rm")
}

// reachFromB checks that B's container reaches c, and that c is
// registered on A's agent (so "no service left" means something).
func (r *crashRun) reachFromB(c *container) {
	r.t.Helper()
	eventually(r.t, 10*time.Second, func() error { return r.bc.ping(r.t, c.addr4.Addr(), 1) })
	eventually(r.t, 10*time.Second, func() error {
		svcs, err := r.env.clients[0].Agent().ServicesWithFilter(fmt.Sprintf("Meta[\"endpoint-id\"] == %q", c.eid))
		if err != nil {
			return err
		}
		if len(svcs) != 1 {
			return fmt.Errorf("endpoint %s has %d services on host0's agent, want 1", c.eid[:12], len(svcs))
		}
		return nil
	})
}

func (r *crashRun) hold(host, kind string, a netip.Addr, mac string) {
	r.holds[host+" "+a.String()] = hold{host: host, kind: kind, addr: a, mac: mac}
}

func (r *crashRun) release(host string, a netip.Addr) { delete(r.holds, host+" "+a.String()) }

// checkAddrs checks, after a step, what Docker holds against the store:
// no address held by two endpoints (or by an endpoint and the gateway),
// and every held address recorded, with the holder's MAC for an endpoint.
// A missing record means the address can be handed out again.
func (r *crashRun) checkAddrs(step string) {
	t := r.t
	t.Helper()
	pairs, _, err := r.kv.List(r.prefix+"ipam/", nil)
	if err != nil {
		t.Fatalf("after %s: list ipam records: %v", step, err)
	}
	recs := map[netip.Addr]map[string]any{}
	for _, p := range pairs {
		if !strings.Contains(p.Key, "/addr/") {
			continue
		}
		a, err := netip.ParseAddr(path.Base(p.Key))
		if err != nil {
			continue
		}
		var v map[string]any
		if err := json.Unmarshal(p.Value, &v); err != nil {
			t.Errorf("after %s: address record %s: %v", step, p.Key, err)
			continue
		}
		recs[a] = v
	}
	endpoints := map[netip.Addr]hold{}
	gateways := map[netip.Addr]bool{}
	for _, h := range r.holds {
		if h.kind == "gateway" {
			gateways[h.addr] = true
		}
	}
	for _, h := range r.holds {
		if h.kind == "endpoint" {
			if o, dup := endpoints[h.addr]; dup {
				t.Errorf("after %s: address %s held twice: by an endpoint on host %s and one on host %s", step, h.addr, o.host, h.host)
			}
			endpoints[h.addr] = h
			if gateways[h.addr] {
				t.Errorf("after %s: endpoint address %s on host %s is the gateway", step, h.addr, h.host)
			}
		}
		rec, ok := recs[h.addr]
		if !ok {
			t.Errorf("after %s: address %s (%s on host %s) is not recorded in the store: it can be handed out again", step, h.addr, h.kind, h.host)
			continue
		}
		if k, ok := rec["kind"].(string); ok && k != h.kind {
			t.Errorf("after %s: address %s is held as %s on host %s but recorded as %s: %v", step, h.addr, h.kind, h.host, k, rec)
		}
		if m, ok := rec["mac"].(string); ok && h.kind == "endpoint" && h.mac != "" && !strings.EqualFold(m, h.mac) {
			t.Errorf("after %s: address %s of the endpoint with MAC %s on host %s is recorded for MAC %s: another holder", step, h.addr, h.mac, h.host, m)
		}
	}
}

// mayAppear are keys (relative to the prefix) that may appear once the
// first container ran and stay after the last one left while the network
// lives: state of the network, not of a container.
var mayAppear = []*regexp.Regexp{
	regexp.MustCompile(`^ipam/[^/]+/pool/[^/]+/next$`), // the pool's allocation cursor
}

// keySet lists the keys under the prefix, relative to it. (One client
// for every poll: kvKeys makes a client per call, and the agent refuses a
// client with too many open connections.)
func (r *crashRun) keySet() map[string]bool {
	keys, _, err := r.kv.Keys(r.prefix, "", nil)
	if err != nil {
		r.t.Fatalf("list keys under %s: %v", r.prefix, err)
	}
	ks := map[string]bool{}
	for _, k := range keys {
		ks[stableKey(strings.TrimPrefix(k, r.prefix))] = true
	}
	return ks
}

// checkNoOrphans waits until the store holds the keys it held before A's
// first container (base) again: the containers are gone, the networks stay,
// so any other key is a leaked address or endpoint record (an orphan the
// plugin must reclaim after its grace period), and a vanished key is state
// that a replay removed from under a live holder.
func (r *crashRun) checkNoOrphans(base map[string]bool, when string) {
	t := r.t
	t.Helper()
	var extra, gone []string
	deadline := time.Now().Add(reclaimWait)
	for {
		extra, gone = nil, nil
		now := r.keySet()
		for k := range now {
			if !base[k] && !slices.ContainsFunc(mayAppear, func(re *regexp.Regexp) bool { return re.MatchString(k) }) {
				extra = append(extra, k)
			}
		}
		for k := range base {
			if !now[k] {
				gone = append(gone, k)
			}
		}
		if len(extra)+len(gone) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	slices.Sort(extra)
	slices.Sort(gone)
	if len(extra) > 0 {
		if why := reclaimedByEngine[r.sc.point]; why != "" {
			t.Logf("left for the engine-backed sweep (%s) after %s: %v", why, when, extra)
		} else {
			t.Errorf("keys made since A's first container are still there %s after %s (orphans never reclaimed): %v", reclaimWait, when, extra)
		}
	}
	if len(gone) > 0 {
		t.Errorf("keys of the live networks and B's container vanished by the time %s: %v", when, gone)
	}
}

// checkClean waits until nothing the scenario made is left: keys under the
// prefix (but allowedLeftovers), overlay links and firewall rules on either
// host, services on either agent.
func (r *crashRun) checkClean() {
	t := r.t
	t.Helper()
	if len(r.holds) != 0 {
		t.Errorf("the test still holds addresses after removal: %v", r.holds)
	}
	var last []string
	deadline := time.Now().Add(reclaimWait)
	for {
		last = r.leftovers()
		if len(last) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if len(last) > 0 {
		if why := reclaimedByEngine[r.sc.point]; why != "" {
			t.Logf("left for the engine-backed sweep (%s):\n  %s", why, strings.Join(last, "\n  "))
			r.scrub()
			return
		}
		t.Errorf("left over %s after every network was removed on both hosts:\n  %s", reclaimWait, strings.Join(last, "\n  "))
	}
}

func (r *crashRun) leftovers() []string {
	t := r.t
	var out []string
	for k := range r.keySet() {
		if !slices.ContainsFunc(allowedLeftovers, func(re *regexp.Regexp) bool { return re.MatchString(k) }) {
			out = append(out, "key "+r.prefix+k)
		}
	}
	for i, h := range r.env.hosts {
		for _, l := range ourLinks(t, h) {
			out = append(out, fmt.Sprintf("host%d link %s", i, l))
		}
		for _, rule := range firewallRules(t, h) {
			out = append(out, fmt.Sprintf("host%d rule %s", i, rule))
		}
	}
	return append(out, r.newServices()...)
}

// newServices lists the plugin's services on both agents that were not
// there before the scenario.
func (r *crashRun) newServices() []string {
	var out []string
	for i, c := range r.env.clients {
		svcs, err := c.Agent().Services()
		if err != nil {
			r.t.Fatal(err)
		}
		for id, s := range svcs {
			if !r.before[id] && s.Meta["managed-by"] == "consul-overlay" {
				out = append(out, fmt.Sprintf("service %s (%s) on host%d's agent", id, s.Service, i))
			}
		}
	}
	return out
}

// firewallRules lists the interface rules in a host's CONSUL-OVERLAY
// chains (the chains themselves and the jump from FORWARD may stay).
func firewallRules(t *testing.T, h *testenv.Host) []string {
	t.Helper()
	var out []string
	for _, bin := range []string{"iptables", "ip6tables"} {
		if _, err := exec.LookPath(bin); err != nil {
			continue
		}
		s, err := h.NS.Run(t, bin, "-w", "-t", "filter", "-S")
		if err != nil {
			continue // a table the kernel lacks
		}
		for _, line := range strings.Split(s, "\n") {
			if strings.HasPrefix(line, "-A CONSUL-OVERLAY") && (strings.Contains(line, " -i ") || strings.Contains(line, " -o ")) {
				out = append(out, bin+" "+line)
			}
		}
	}
	return out
}

// scrub removes what a failed scenario left on the hosts and agents, so
// the next scenario starts clean. It runs in a cleanup, when the test's
// context is already cancelled.
func (r *crashRun) scrub() {
	run := func(h *testenv.Host, args ...string) string {
		out, _ := h.NS.Command(context.Background(), args...).CombinedOutput()
		return string(out)
	}
	for _, h := range r.env.hosts {
		for _, line := range strings.Split(run(h, "ip", "-o", "link", "show"), "\n") {
			if f := strings.Fields(line); len(f) >= 2 {
				name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
				if strings.HasPrefix(name, "vx") {
					run(h, "ip", "link", "del", name)
				}
			}
		}
		for _, bin := range []string{"iptables", "ip6tables"} {
			for _, line := range strings.Split(run(h, bin, "-w", "-t", "filter", "-S"), "\n") {
				if f := strings.Fields(line); len(f) == 2 && f[0] == "-N" && strings.HasPrefix(f[1], "CONSUL-OVERLAY") {
					run(h, bin, "-w", "-t", "filter", "-F", f[1])
				}
			}
		}
	}
	for _, c := range r.env.clients {
		svcs, err := c.Agent().Services()
		if err != nil {
			continue
		}
		for id := range svcs {
			if !r.before[id] {
				_ = c.Agent().ServiceDeregister(id)
			}
		}
	}
}

// backgroundPing pings from a container until stopped.
type backgroundPing struct {
	cmd  *exec.Cmd
	out  bytes.Buffer
	done chan struct{}
}

func startBackgroundPing(t *testing.T, from *container, dst netip.Addr) *backgroundPing {
	t.Helper()
	p := &backgroundPing{done: make(chan struct{})}
	p.cmd = from.ns.Command(t.Context(), "ping", "-n", "-q", "-i", "0.1", "-W", "1", dst.String())
	p.cmd.Stdout, p.cmd.Stderr = &p.out, &p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	return p
}

var pingStats = regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)

// stopAndCheck stops the ping (SIGINT, so it prints its statistics; nsenter
// execs it, so the signal reaches ping) and fails the test if more than
// the one packet in flight at the stop was lost.
func (p *backgroundPing) stopAndCheck(t *testing.T, what string) {
	t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
	m := pingStats.FindStringSubmatch(p.out.String())
	if m == nil {
		t.Errorf("%s: no ping statistics:\n%s", what, p.out.String())
		return
	}
	sent, _ := strconv.Atoi(m[1])
	recv, _ := strconv.Atoi(m[2])
	if sent-recv > 1 || sent == 0 {
		t.Errorf("%s: %d of %d pings lost while A's plugin was driven (and crashed)", what, sent-recv, sent)
		return
	}
	t.Logf("%s: %d/%d pings answered", what, recv, sent)
}

// runKill9 SIGKILLs A at random moments (during a call or just after it)
// while 20 containers are attached to and detached from A's network, B's
// container pinging A's long-lived container throughout; then the same
// invariants as the armed scenarios.
func runKill9(t *testing.T, env *crashEnv) {
	r := newCrashRun(t, env, scenario{})
	n := r.networkCreate()
	r.bUp()
	c0 := r.containerRun(n, netip.Addr{})
	r.reachFromB(c0)
	ping := startBackgroundPing(t, r.bc, c0.addr4.Addr())
	base := r.keySet()
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("CRASH_SEED"); v != "" {
		var err error
		if seed, err = strconv.ParseUint(v, 10, 64); err != nil {
			t.Fatalf("CRASH_SEED=%q: %v", v, err)
		}
	}
	t.Logf("kill-9 seed %d (CRASH_SEED=%d repeats the choices; the timing still varies)", seed, seed)
	r.kill9 = &killer{rng: mrand.New(mrand.NewPCG(seed, seed>>1)), prob: 0.2, maxDelay: 25 * time.Millisecond}
	const cycles = 20
	start := time.Now()
	for i := range cycles {
		static := netip.Addr{}
		if i%2 == 1 {
			static = r.static // every other one with docker run --ip
		}
		c := r.containerRun(n, static)
		r.reachFromB(c)
		r.containerStop(c)
	}
	kills := r.kill9.kills
	r.kill9 = nil
	t.Logf("%d attach/detach cycles with %d kill -9 of A's plugin in %s; killed during or after: %s",
		cycles, kills, time.Since(start).Round(time.Millisecond), strings.Join(r.crashes, ", "))
	r.checkNoOrphans(base, "the 20 cycles ended")
	ping.stopAndCheck(t, "B's container to A's long-lived container "+c0.addr4.Addr().String())
	if kills == 0 {
		t.Errorf("no kill happened in %d cycles: the test tested nothing", cycles)
	}
	r.containerStop(c0)
	r.bDown()
	r.networkRemove(n)
	r.checkClean()
}
