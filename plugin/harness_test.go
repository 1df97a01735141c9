package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/testenv"
	"consul-overlay/kvstore"
	"consul-overlay/vxlan"
)

// This file plays dockerd's part for the protocol-level tests: it speaks
// the plugin protocol over each plugin's socket exactly as the engine does
// and does libnetwork's work on the container side (move the interface into
// the container namespace, rename it, set its addresses).

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// requireNsenter fails (under CI) or skips a protocol test that cannot
// run here: it needs root, and nsenter to run commands in the test hosts.
func requireNsenter(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("nsenter"); err != nil {
		testenv.Missing(t, "nsenter", "apt-get install util-linux")
	}
}

// pluginBinary builds the plugin once per test run.
func pluginBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "consul-overlay-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "consul-overlay")
		cmd := exec.Command("go", "build", "-o", binPath, ".")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// pluginProc is one plugin daemon on one test host.
type pluginProc struct {
	t       *testing.T
	name    string
	host    *testenv.Host
	env     []string
	socket  string
	data    string // DATA_DIR
	logf    string
	cmd     *exec.Cmd
	started time.Time
	done    chan struct{}
	client  *http.Client
}

// startPlugin runs the plugin in a test host's network namespace.
// opts change the plugin's environment before its first start (for
// example withoutEnv("NODE_NAME")).
func startPlugin(t *testing.T, name string, host *testenv.Host, consulAddr, prefix string, opts ...func(*pluginProc)) *pluginProc {
	t.Helper()
	p := newPluginProc(t, name, host, consulAddr, prefix)
	for _, o := range opts {
		o(p)
	}
	p.start()
	return p
}

// startPluginEnv is startPlugin with settings added to (or, with the same
// name, replacing) the defaults, as "NAME=value".
func startPluginEnv(t *testing.T, name string, host *testenv.Host, consulAddr, prefix string, env ...string) *pluginProc {
	t.Helper()
	p := newPluginProc(t, name, host, consulAddr, prefix, env...)
	p.start()
	return p
}

// newPluginProc prepares a plugin like startPluginEnv without starting it;
// it is stopped when the test ends.
func newPluginProc(t *testing.T, name string, host *testenv.Host, consulAddr, prefix string, env ...string) *pluginProc {
	t.Helper()
	dir := t.TempDir()
	p := &pluginProc{
		t: t, name: name, host: host,
		socket: filepath.Join(dir, "plugin.sock"),
		data:   filepath.Join(dir, "data"),
		logf:   filepath.Join(dir, "plugin.log"),
	}
	p.env = []string{
		"SOCKET=" + p.socket,
		"DATA_DIR=" + p.data,
		"NODE_NAME=" + name,
		"VTEP_ADDR=" + host.Addr.String(),
		"LOG_LEVEL=debug",
		// No engine here: container metadata comes from driver options.
		"DOCKER_HOST=none",
	}
	if consulAddr != "" {
		p.env = append(p.env, "CONSUL_HTTP_ADDR="+consulAddr, "KV_PREFIX="+prefix)
	}
	// exec uses the last value of a repeated name.
	p.env = append(p.env, env...)
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "SOCKET="); ok {
			p.socket = v
		}
		if v, ok := strings.CutPrefix(kv, "DATA_DIR="); ok {
			p.data = v
		}
	}
	p.client = &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", p.socket)
		}},
	}
	t.Cleanup(func() {
		p.stop(syscall.SIGTERM)
		if t.Failed() {
			b, _ := os.ReadFile(p.logf)
			t.Logf("plugin %s log (tail):\n%s", name, tail(string(b), 60))
		}
	})
	return p
}

// withoutEnv drops a setting from the plugin's environment.
func withoutEnv(name string) func(*pluginProc) {
	return func(p *pluginProc) { p.setEnv(name, "") }
}

// setEnv sets (value != "") or drops (value == "") one setting for the
// next start.
func (p *pluginProc) setEnv(name, value string) {
	env := p.env[:0]
	for _, kv := range p.env {
		if !strings.HasPrefix(kv, name+"=") {
			env = append(env, kv)
		}
	}
	if value != "" {
		env = append(env, name+"="+value)
	}
	p.env = env
}

func (p *pluginProc) start() {
	p.t.Helper()
	p.launch()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		var caps map[string]any
		if err := p.call("/NetworkDriver.GetCapabilities", nil, &caps); err == nil {
			return
		}
		select {
		case <-p.done:
			b, _ := os.ReadFile(p.logf)
			p.t.Fatalf("plugin %s exited at start:\n%s", p.name, tail(string(b), 40))
		case <-time.After(50 * time.Millisecond):
		}
	}
	p.t.Fatalf("plugin %s did not answer on %s within 10s", p.name, p.socket)
}

// launch starts the process without waiting for it to answer.
func (p *pluginProc) launch() {
	p.t.Helper()
	f, err := os.OpenFile(p.logf, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		p.t.Fatal(err)
	}
	cmd := exec.Command("nsenter", "--net="+p.host.NS.Path, pluginBinary(p.t))
	cmd.Env = append(os.Environ(), p.env...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		p.t.Fatalf("start plugin %s: %v", p.name, err)
	}
	p.cmd, p.started = cmd, time.Now()
	p.done = make(chan struct{})
	go func() { cmd.Wait(); f.Close(); close(p.done) }()
}

// stop signals the plugin and waits for it.
func (p *pluginProc) stop(sig syscall.Signal) {
	if p.cmd == nil || p.cmd.Process == nil {
		return
	}
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// call speaks the plugin protocol: POST with a JSON body (none for nil),
// the engine's Accept header, and {"Err"}/{"Error"} errors.
func (p *pluginProc) call(method string, req, resp any) error {
	var body io.Reader = http.NoBody
	if req != nil {
		b, err := json.Marshal(req)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	hreq, err := http.NewRequest(http.MethodPost, "http://plugin.moby.localhost"+method, body)
	if err != nil {
		return err
	}
	hreq.Header.Set("Accept", "application/vnd.docker.plugins.v1.2+json")
	hres, err := p.client.Do(hreq)
	if err != nil {
		return err
	}
	defer hres.Body.Close()
	raw, _ := io.ReadAll(hres.Body)
	var e struct{ Err, Error string }
	_ = json.Unmarshal(raw, &e)
	if hres.StatusCode != http.StatusOK || e.Err != "" || e.Error != "" {
		msg := e.Err + e.Error
		if msg == "" {
			msg = string(raw)
		}
		return fmt.Errorf("%s: %s", method, msg)
	}
	if resp != nil {
		return json.Unmarshal(raw, resp)
	}
	return nil
}

func (p *pluginProc) must(method string, req, resp any) {
	p.t.Helper()
	if err := p.call(method, req, resp); err != nil {
		p.t.Fatal(err)
	}
}

func randomID() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// dockerNet is one Docker network on one host, as dockerd would hold it.
type dockerNet struct {
	p            *pluginProc
	id           string
	space        string
	pool4, pool6 string // pool IDs
	subnet4, gw4 string
	subnet6, gw6 string
	// beforeJoin, if set, runs between CreateEndpoint and Join.
	beforeJoin func()
}

type netSpec struct {
	subnet4, subnet6 string
	opts             map[string]string
	space            string // "" = the plugin's local default space
	// foreign: the addresses come from another IPAM driver (Docker's
	// default), so only CreateNetwork reaches the plugin.
	foreign bool
}

// createNetwork runs `docker network create` against one plugin: IPAM
// pool and gateway, then CreateNetwork; on failure it releases what it took.
func (p *pluginProc) createNetwork(spec netSpec) (*dockerNet, error) {
	var spaces struct{ LocalDefaultAddressSpace, GlobalDefaultAddressSpace string }
	if err := p.call("/IpamDriver.GetDefaultAddressSpaces", nil, &spaces); err != nil {
		return nil, err
	}
	n := &dockerNet{p: p, id: randomID(), space: spec.space}
	if n.space == "" {
		n.space = spaces.LocalDefaultAddressSpace
	}
	var undo []func()
	fail := func(err error) (*dockerNet, error) {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
		return nil, err
	}
	reqPool := func(subnet string, v6 bool) (id, pool, gw string, err error) {
		var pr struct {
			PoolID, Pool string
			Data         map[string]string
		}
		if err = p.call("/IpamDriver.RequestPool", map[string]any{"AddressSpace": n.space, "Pool": subnet, "V6": v6}, &pr); err != nil {
			return
		}
		undo = append(undo, func() { _ = p.call("/IpamDriver.ReleasePool", map[string]any{"PoolID": pr.PoolID}, nil) })
		var ar struct{ Address string }
		if err = p.call("/IpamDriver.RequestAddress", map[string]any{"PoolID": pr.PoolID, "Options": map[string]string{"RequestAddressType": "com.docker.network.gateway"}}, &ar); err != nil {
			return
		}
		gwip, _, _ := strings.Cut(ar.Address, "/")
		undo = append(undo, func() {
			_ = p.call("/IpamDriver.ReleaseAddress", map[string]any{"PoolID": pr.PoolID, "Address": gwip}, nil)
		})
		return pr.PoolID, pr.Pool, ar.Address, nil
	}
	var err error
	if spec.foreign {
		n.subnet4 = spec.subnet4
		n.gw4 = strings.TrimSuffix(spec.subnet4, "0/24") + "1/24"
	} else if n.pool4, n.subnet4, n.gw4, err = reqPool(spec.subnet4, false); err != nil {
		return fail(err)
	}
	v4data := []map[string]any{{"AddressSpace": n.space, "Pool": n.subnet4, "Gateway": n.gw4}}
	var v6data []map[string]any
	if spec.subnet6 != "" {
		if n.pool6, n.subnet6, n.gw6, err = reqPool(spec.subnet6, true); err != nil {
			return fail(err)
		}
		v6data = []map[string]any{{"AddressSpace": n.space, "Pool": n.subnet6, "Gateway": n.gw6}}
	}
	generic := map[string]string{}
	for k, v := range spec.opts {
		generic[k] = v
	}
	req := map[string]any{
		"NetworkID": n.id,
		"Options": map[string]any{
			"com.docker.network.generic":     generic,
			"com.docker.network.enable_ipv6": spec.subnet6 != "",
			"com.docker.network.enable_ipv4": true,
		},
		"IPv4Data": v4data,
		"IPv6Data": v6data,
	}
	if err := p.call("/NetworkDriver.CreateNetwork", req, nil); err != nil {
		return fail(err)
	}
	return n, nil
}

// remove runs `docker network rm`.
func (n *dockerNet) remove() error {
	p := n.p
	if err := p.call("/NetworkDriver.DeleteNetwork", map[string]any{"NetworkID": n.id}, nil); err != nil {
		return err
	}
	for _, x := range [][2]string{{n.pool4, n.gw4}, {n.pool6, n.gw6}} {
		if x[0] == "" {
			continue
		}
		ip, _, _ := strings.Cut(x[1], "/")
		if err := p.call("/IpamDriver.ReleaseAddress", map[string]any{"PoolID": x[0], "Address": ip}, nil); err != nil {
			return err
		}
		if err := p.call("/IpamDriver.ReleasePool", map[string]any{"PoolID": x[0]}, nil); err != nil {
			return err
		}
	}
	return nil
}

// container is one container's endpoint on a network.
type container struct {
	n     *dockerNet
	ns    *testenv.NetNS
	eid   string
	src   string // the interface name the plugin returned
	addr4 netip.Prefix
	addr6 netip.Prefix
	mac   string
}

// run starts a container on the network: addresses from IPAM, then
// CreateEndpoint and Join, then libnetwork's part in the namespace.
func (n *dockerNet) run(t *testing.T) *container {
	t.Helper()
	c, err := n.tryRun(t)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (n *dockerNet) tryRun(t *testing.T) (*container, error) {
	return n.tryRunWith(t, nil)
}

// runWith starts a container whose endpoint carries options, as Docker
// passes driver options and exposed ports in CreateEndpoint and Join.
func (n *dockerNet) runWith(t *testing.T, epOpts map[string]any) *container {
	t.Helper()
	c, err := n.tryRunWith(t, epOpts)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (n *dockerNet) tryRunWith(t *testing.T, epOpts map[string]any) (*container, error) {
	p := n.p
	if epOpts == nil {
		epOpts = map[string]any{}
	}
	c := &container{n: n, eid: randomID(), ns: testenv.NewNetNS(t)}
	// Like Docker: an IPAM that requires a MAC gets a random one with each
	// endpoint address request, and the driver gets it in CreateEndpoint.
	var caps struct{ RequiresMACAddress bool }
	if err := p.call("/IpamDriver.GetCapabilities", nil, &caps); err != nil {
		return nil, err
	}
	opts := map[string]string{}
	if caps.RequiresMACAddress {
		mac := make([]byte, 6)
		_, _ = rand.Read(mac)
		mac[0] = mac[0]&0xfe | 0x02
		c.mac = net.HardwareAddr(mac).String()
		opts["com.docker.network.endpoint.macaddress"] = c.mac
	}
	var ar struct{ Address string }
	if err := p.call("/IpamDriver.RequestAddress", map[string]any{"PoolID": n.pool4, "Options": opts}, &ar); err != nil {
		return nil, err
	}
	c.addr4 = netip.MustParsePrefix(ar.Address)
	iface := map[string]string{"Address": ar.Address, "MacAddress": c.mac}
	if n.pool6 != "" {
		var ar6 struct{ Address string }
		if err := p.call("/IpamDriver.RequestAddress", map[string]any{"PoolID": n.pool6, "Options": opts}, &ar6); err != nil {
			return nil, err
		}
		c.addr6 = netip.MustParsePrefix(ar6.Address)
		iface["AddressIPv6"] = ar6.Address
	}
	var cr struct{ Interface *struct{ MacAddress string } }
	if err := p.call("/NetworkDriver.CreateEndpoint", map[string]any{"NetworkID": n.id, "EndpointID": c.eid, "Interface": iface, "Options": epOpts}, &cr); err != nil {
		return nil, err
	}
	if cr.Interface != nil {
		if c.mac != "" {
			return nil, fmt.Errorf("CreateEndpoint answered MAC %s though Docker gave %s (Docker refuses that)", cr.Interface.MacAddress, c.mac)
		}
		c.mac = cr.Interface.MacAddress
	}
	if n.beforeJoin != nil {
		n.beforeJoin()
	}
	var jr struct {
		InterfaceName struct{ SrcName, DstPrefix string }
		Gateway       string
	}
	if err := p.call("/NetworkDriver.Join", map[string]any{"NetworkID": n.id, "EndpointID": c.eid, "SandboxKey": c.ns.Path, "Options": epOpts}, &jr); err != nil {
		return nil, err
	}
	c.src = jr.InterfaceName.SrcName
	addrs := []netip.Prefix{c.addr4}
	if c.addr6.IsValid() {
		addrs = append(addrs, c.addr6)
	}
	if err := testenv.MoveAndConfigure(n.p.host.NS, c.ns, c.src, jr.InterfaceName.DstPrefix+"0", addrs); err != nil {
		return nil, fmt.Errorf("configure container interface %s: %w", c.src, err)
	}
	return c, nil
}

// remove stops the container: Leave, the interface back to the host under
// its source name, DeleteEndpoint, then the addresses back to IPAM.
func (c *container) remove(t *testing.T) {
	t.Helper()
	p := c.n.p
	p.must("/NetworkDriver.Leave", map[string]any{"NetworkID": c.n.id, "EndpointID": c.eid}, nil)
	if err := testenv.MoveBack(c.ns, c.n.p.host.NS, "eth0", c.src); err != nil {
		t.Logf("move %s back: %v", c.src, err)
	}
	p.must("/NetworkDriver.DeleteEndpoint", map[string]any{"NetworkID": c.n.id, "EndpointID": c.eid}, nil)
	p.must("/IpamDriver.ReleaseAddress", map[string]any{"PoolID": c.n.pool4, "Address": c.addr4.Addr().String()}, nil)
	if c.addr6.IsValid() {
		p.must("/IpamDriver.ReleaseAddress", map[string]any{"PoolID": c.n.pool6, "Address": c.addr6.Addr().String()}, nil)
	}
}

// ping sends count pings from the container and reports whether all came back.
func (c *container) ping(t *testing.T, dst netip.Addr, count int) error {
	t.Helper()
	args := []string{"ping", "-n", "-q", "-c", fmt.Sprint(count), "-i", "0.2", "-W", "2"}
	if dst.Is6() {
		args = append(args, "-6")
	}
	args = append(args, dst.String())
	out, err := c.ns.Run(t, args...)
	if err != nil {
		return fmt.Errorf("ping %s from %s: %v\n%s", dst, c.addr4.Addr(), err, out)
	}
	return nil
}

// eventually retries fn until it succeeds or the timeout passes.
func eventually(t *testing.T, timeout time.Duration, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for {
		if err = fn(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// kvKeys lists every key under a prefix, straight from Consul, but the
// host records (<prefix>hosts/<id>, claimed by each running plugin) and
// the membership proofs (<prefix>members/<id>: package cluster keeps them
// by design, as the proof at restart that the store is the host's).
func kvKeys(t *testing.T, agent *testenv.ConsulAgent, prefix string) []string {
	t.Helper()
	c, err := api.NewClient(&api.Config{Address: agent.Addr, Transport: &http.Transport{DialContext: agent.DialContext}})
	if err != nil {
		t.Fatal(err)
	}
	keys, _, err := c.KV().Keys(prefix, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	for i, k := range keys {
		keys[i] = stableKey(k)
	}
	if strings.Contains(prefix, "/hosts/") || strings.Contains(prefix, "/members/") {
		return keys // asked for them
	}
	return slices.DeleteFunc(keys, func(k string) bool {
		return strings.Contains(k, "/hosts/") || strings.Contains(k, "/members/")
	})
}

// stampName matches a stamp's nonce (kvstore/stamp.go): a new one at
// every write of its record.
var stampName = regexp.MustCompile(`(/config\.v(/peers/[^/]+)?@/)[0-9a-f]{16}$`)

// stableKey is k with a stamp's nonce as "*", so that a stamp is the same
// key from one write of its record to the next: lists of keys compare as
// the records they stamp do.
func stableKey(k string) string {
	return stampName.ReplaceAllString(k, "${1}*")
}

// stateKeys is kvKeys without the host records (hosts/<id>), which stay
// while their plugins run: what must be gone once every network is.
func stateKeys(t *testing.T, agent *testenv.ConsulAgent, prefix string) []string {
	t.Helper()
	var out []string
	for _, k := range kvKeys(t, agent, prefix) {
		if !strings.HasPrefix(k, prefix+hostsPrefix) {
			out = append(out, k)
		}
	}
	return out
}

// ourLinks lists the links consul-overlay owns in a host's namespace.
func ourLinks(t *testing.T, h *testenv.Host) []string {
	t.Helper()
	out, err := h.NS.Run(t, "ip", "-o", "link", "show")
	if err != nil {
		t.Fatalf("ip link: %v", err)
	}
	var links []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if strings.HasPrefix(name, "vx") {
			links = append(links, name)
		}
	}
	return links
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// ownerMarkOf is the alias and rule comment of the plugin instance that
// runs with this KV prefix on this Consul address (see ownerTag).
func ownerMarkOf(t *testing.T, prefix, consulAddr string) string {
	t.Helper()
	env := map[string]string{"CONSUL_HTTP_ADDR": consulAddr, "KV_PREFIX": prefix}
	ccfg, _, err := kvstore.ConsulConfigFromEnv(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	return vxlan.OwnerMark(ownerTag(ccfg.Prefix, ccfg.Address))
}
