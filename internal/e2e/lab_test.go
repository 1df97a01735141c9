//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"consul-overlay/internal/dockertest"
	"consul-overlay/internal/testenv"
	"consul-overlay/vxlan"
)

// cmdTimeout bounds every command the suite runs unless its context has an
// earlier deadline.
const cmdTimeout = 3 * time.Minute

// kvPrefix is where the plugins keep their state (KV_PREFIX left empty).
const kvPrefix = "consul-overlay/"

// theLab is the lab TestMain brought up; nil when that failed.
var theLab *Lab

// Lab is the running lab, as lab/up.sh describes it in $LAB_STATE/env.
type Lab struct {
	Root       string // repository root (lab/ scripts)
	State      string // LAB_STATE
	Data       string // LAB_DATA
	Plugin     string // NAME:TAG of the plugin on both engines
	Label      string // label of everything the lab creates on host A
	Image      string // busybox image on both engines
	ConsulHTTP string // base URL of host A's Consul agent
	// consul is the HTTP client for ConsulHTTP: it dials from host A's
	// network namespace when host A has one (LAB_ENGINE=29).
	consul *http.Client
	// ConsulServer is the Consul server's underlay address, a destination
	// outside the overlay for the outbound scenario.
	ConsulServer netip.Addr
	HTTPPort     int
	A, B         *Host

	// Engine is the engines under test (LAB_ENGINE: "20.10", the machine's
	// own engine as host A; "29", both hosts an engine 29 of the lab's own
	// in a namespace), Firewall dockerd's firewall backend ("" for its
	// default, or "nftables").
	Engine, Firewall string
	// The lab's other namespaces and host A's underlay link, which
	// lab/down.sh removes.
	NSSwitch, NSConsul, LinkA string
}

// Host is one of the lab's Docker hosts.
type Host struct {
	Name   string     // "A" or "B"
	Node   string     // NODE_NAME of its plugin, the name of its Consul agent
	Addr   netip.Addr // underlay address (VTEP), where its Consul agent answers DNS
	NetNS  string     // network namespace name; "" for the host's own
	Socket string     // DOCKER_HOST; "" for the default engine
	// DataNS is the pin of the plugin's data-plane namespace
	// (DATAPLANE_NAMESPACE, lab/up.sh with LAB_DATAPLANE=1), where its
	// networks' bridges, VXLAN devices and endpoint ports are, while the
	// gateway links vxg-<vni> stay in NetNS; "" when they are all in NetNS.
	DataNS string
	// PluginEnv is the plugin's settings that say where its data plane
	// is (DATAPLANE_NAMESPACE, HOST_PID), for its binary run on the host.
	PluginEnv []string
}

func (h *Host) String() string { return "host " + h.Name }

// labState is LAB_STATE as lab/lib.sh sets it for LAB_ENGINE.
func labState() string {
	if s := os.Getenv("LAB_STATE"); s != "" {
		return s
	}
	if os.Getenv("LAB_ENGINE") == "29" {
		if id := os.Getenv("LAB_ID"); id != "" {
			return "/run/consul-overlay-lab-" + id
		}
		return "/run/consul-overlay-lab-29"
	}
	return "/run/consul-overlay-lab"
}

// loadLab reads $LAB_STATE/env (lab/up.sh writes it).
func loadLab(root string) (*Lab, error) {
	state := labState()
	f, err := os.Open(filepath.Join(state, "env"))
	if err != nil {
		return nil, fmt.Errorf("read the lab's description: %w", err)
	}
	defer f.Close()
	env := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			env[k] = v
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	var errs []error
	addr := func(k string) netip.Addr {
		a, err := netip.ParseAddr(env[k])
		if err != nil {
			errs = append(errs, fmt.Errorf("%s=%q: %w", k, env[k], err))
		}
		return a
	}
	port, err := strconv.Atoi(env["LAB_HTTP_PORT"])
	if err != nil {
		errs = append(errs, fmt.Errorf("LAB_HTTP_PORT=%q: %w", env["LAB_HTTP_PORT"], err))
	}
	l := &Lab{
		Root:         root,
		State:        env["LAB_STATE"],
		Data:         env["LAB_DATA"],
		Plugin:       env["LAB_PLUGIN"],
		Label:        env["LAB_LABEL"],
		Image:        env["LAB_BUSYBOX"],
		ConsulHTTP:   fmt.Sprintf("http://127.0.0.1:%d", port),
		ConsulServer: addr("LAB_ADDR_CONSUL"),
		HTTPPort:     port,
		A: &Host{Name: "A", Node: env["LAB_NODE_A"], Addr: addr("LAB_ADDR_A"),
			NetNS: env["LAB_NS_A"], Socket: env["LAB_DOCKER_A"]},
		B: &Host{Name: "B", Node: env["LAB_NODE_B"], Addr: addr("LAB_ADDR_B"),
			NetNS: env["LAB_NS_B"], Socket: env["LAB_DOCKER_B"]},
		Engine:   env["LAB_ENGINE"],
		Firewall: env["LAB_FIREWALL"],
		NSSwitch: env["LAB_NS_SWITCH"],
		NSConsul: env["LAB_NS_CONSUL"],
		LinkA:    env["LAB_LINK_A"],
	}
	l.consul = http.DefaultClient
	if l.A.NetNS != "" {
		nsPath := "/run/netns/" + l.A.NetNS
		l.consul = &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return testenv.DialIn(ctx, nsPath, network, addr)
			},
		}}
	}
	if (l.A.NetNS == "") != (l.A.Socket == "") {
		errs = append(errs, fmt.Errorf("LAB_NS_A=%q but LAB_DOCKER_A=%q", l.A.NetNS, l.A.Socket))
	}
	for k, v := range map[string]string{"LAB_STATE": l.State, "LAB_PLUGIN": l.Plugin, "LAB_LABEL": l.Label,
		"LAB_BUSYBOX": l.Image, "LAB_NS_B": l.B.NetNS, "LAB_DOCKER_B": l.B.Socket, "LAB_ENGINE": l.Engine,
		"LAB_NS_SWITCH": l.NSSwitch, "LAB_NS_CONSUL": l.NSConsul, "LAB_LINK_A": l.LinkA} {
		if v == "" {
			errs = append(errs, fmt.Errorf("%s missing", k))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("the lab's description %s: %w", f.Name(), err)
	}
	return l, nil
}

// dataplaneDir is where the plugin pins its data-plane namespaces
// (plugin/dataplane.go), in this machine's mount namespace.
const dataplaneDir = "/run/consul-overlay"

// readDataplane sets each host's DataNS and PluginEnv from its plugin's
// settings, and checks them against LAB_DATAPLANE (lab/up.sh installs the
// plugin with DATAPLANE_NAMESPACE and HOST_PID when it is 1), so that the
// suite never checks one layout on a lab left up in the other.
func (l *Lab) readDataplane(ctx context.Context) error {
	want := os.Getenv("LAB_DATAPLANE") == "1"
	var errs []error
	for _, h := range l.Hosts() {
		out, err := h.Docker(ctx, "plugin", "inspect", "-f", "{{json .Settings.Env}}", l.Plugin)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: the plugin's settings: %w", h, err))
			continue
		}
		var env []string
		if err := json.Unmarshal([]byte(out), &env); err != nil {
			errs = append(errs, fmt.Errorf("%s: the plugin's settings: %w: %s", h, err, out))
			continue
		}
		ns := ""
		h.PluginEnv = nil
		for _, kv := range env {
			k, v, _ := strings.Cut(kv, "=")
			switch k {
			case "DATAPLANE_NAMESPACE":
				ns = v
				h.PluginEnv = append(h.PluginEnv, kv)
			case "HOST_PID":
				h.PluginEnv = append(h.PluginEnv, kv)
			}
		}
		switch {
		case ns == "" || ns == "false":
			if want {
				errs = append(errs, fmt.Errorf("%s: LAB_DATAPLANE=1 but the plugin has no DATAPLANE_NAMESPACE (a lab left up without it? lab/down.sh)", h))
			}
		case ns == "true" || strings.Contains(ns, "/"):
			errs = append(errs, fmt.Errorf("%s: the plugin has DATAPLANE_NAMESPACE=%s, want the name lab/up.sh gives", h, ns))
		default:
			if !want {
				errs = append(errs, fmt.Errorf("%s: the plugin has DATAPLANE_NAMESPACE=%s but LAB_DATAPLANE is not 1 (a lab left up with it? lab/down.sh)", h, ns))
			}
			h.DataNS = filepath.Join(dataplaneDir, ns)
		}
	}
	return errors.Join(errs...)
}

// Hosts are both hosts, A first.
func (l *Lab) Hosts() []*Host { return []*Host{l.A, l.B} }

// Other is the host that is not h.
func (l *Lab) Other(h *Host) *Host {
	if h == l.A {
		return l.B
	}
	return l.A
}

// run runs name with args (with env added) and returns its standard
// output without surrounding white space. The error carries the command line
// and its standard error.
func run(ctx context.Context, env []string, name string, args ...string) (string, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cmdTimeout)
		defer cancel()
	}
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	// A killed command's children (docker compose's plugin process) must
	// not keep the pipes open.
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	out := strings.TrimSpace(stdout.String())
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = out
		}
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, msg)
	}
	return out, nil
}

// Docker runs the docker CLI against the host's engine.
func (h *Host) Docker(ctx context.Context, args ...string) (string, error) {
	return run(ctx, h.dockerEnv(), "docker", args...)
}

func (h *Host) dockerEnv() []string {
	if h.Socket == "" {
		return nil
	}
	return []string{"DOCKER_HOST=" + h.Socket}
}

// Compose runs `docker compose` against the host's engine with the compose
// file file and the variables env, and returns standard output and error
// together (compose reports progress on standard error).
func (h *Host) Compose(ctx context.Context, file string, env []string, args ...string) (string, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cmdTimeout)
		defer cancel()
	}
	full := append([]string{"compose", "-f", file, "--progress", "plain"}, args...)
	cmd := exec.CommandContext(ctx, "docker", full...)
	cmd.Env = append(append(os.Environ(), h.dockerEnv()...), env...)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: docker %s: %w: %s", h, strings.Join(full, " "), err, out)
	}
	return string(out), nil
}

// Run runs a command in the host's network namespace (nsenter --net).
func (h *Host) Run(ctx context.Context, name string, args ...string) (string, error) {
	if h.NetNS == "" {
		return run(ctx, nil, name, args...)
	}
	return run(ctx, nil, "nsenter", append([]string{"--net=/run/netns/" + h.NetNS, name}, args...)...)
}

// RunData runs a command in the namespace of the host's bridges, VXLAN
// devices and endpoint ports: the data-plane namespace if the plugin has
// one, the host's otherwise.
func (h *Host) RunData(ctx context.Context, name string, args ...string) (string, error) {
	if h.DataNS == "" {
		return h.Run(ctx, name, args...)
	}
	return run(ctx, nil, "nsenter", append([]string{"--net=" + h.DataNS, name}, args...)...)
}

// GatewayLink is the link of network vni on h that carries its gateway
// and the well-known addresses, and that the host's rules name: the
// bridge, or with a data-plane namespace the gateway link vxg-<vni> in the
// host's namespace.
func (h *Host) GatewayLink(vni uint32) string {
	if h.DataNS == "" {
		return vxlan.BridgeName(vni)
	}
	return vxlan.GatewayName(vni)
}

// Get fetches url from the host's network namespace (busybox wget; its -T
// option crashes in busybox 1.35, hence timeout).
func (h *Host) Get(ctx context.Context, url string) (string, error) {
	return h.Run(ctx, "timeout", "5", "busybox", "wget", "-q", "-O", "-", url)
}

// InContainer runs a command in a running container of the host.
func (h *Host) InContainer(ctx context.Context, container string, cmd ...string) (string, error) {
	return h.Docker(ctx, append([]string{"exec", container}, cmd...)...)
}

// ContainerGet fetches url from inside container, within 5 s.
func (h *Host) ContainerGet(ctx context.Context, container, url string) (string, error) {
	return h.InContainer(ctx, container, "busybox", "timeout", "5", "wget", "-q", "-O", "-", url)
}

// linkPrefixes are the name prefixes of the plugin's links: those of
// dockertest.LinkPrefixes and, with a data-plane namespace, the gateway
// link vxg-<vni> and its peer vxp-<vni>.
var linkPrefixes = slices.Concat(dockertest.LinkPrefixes, []string{"vxg-", "vxp-"})

// Links lists the links of the host's namespace whose names start with one
// of linkPrefixes, with the name of their master ("" for none).
func (h *Host) Links(ctx context.Context) (map[string]string, error) {
	out, err := h.Run(ctx, "ip", "-o", "link", "show")
	if err != nil {
		return nil, err
	}
	return parseLinks(out), nil
}

// DataLinks lists the links of the namespace of the host's bridges (see
// RunData) as Links does.
func (h *Host) DataLinks(ctx context.Context) (map[string]string, error) {
	out, err := h.RunData(ctx, "ip", "-o", "link", "show")
	if err != nil {
		return nil, err
	}
	return parseLinks(out), nil
}

// AllLinks lists the links of both namespaces (Links and DataLinks; one
// when the host has no data-plane namespace): for the checks that nothing
// of a network is left anywhere.
func (h *Host) AllLinks(ctx context.Context) (map[string]string, error) {
	links, err := h.Links(ctx)
	if err != nil || h.DataNS == "" {
		return links, err
	}
	data, err := h.DataLinks(ctx)
	if err != nil {
		return nil, err
	}
	for n, m := range data {
		if _, dup := links[n]; dup {
			return nil, fmt.Errorf("%s: link %s in both its namespace and the data-plane namespace %s", h, n, h.DataNS)
		}
		links[n] = m
	}
	return links, nil
}

// parseLinks reads `ip -o link show`: the links named with one of
// linkPrefixes, with their master's name.
func parseLinks(out string) map[string]string {
	links := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		// "12: vxh-0123456789@if11: <...> mtu 1450 qdisc noqueue master vxbr-1000 state UP ..."
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if !slices.ContainsFunc(linkPrefixes, func(p string) bool { return strings.HasPrefix(name, p) }) {
			continue
		}
		master := ""
		if i := slices.Index(f, "master"); i >= 0 && i+1 < len(f) {
			master = f[i+1]
		}
		links[name] = master
	}
	return links
}

// RulesMentioning returns the host's iptables-save and ip6tables-save lines
// that name one of the links, and those of `nft list ruleset` when nft is
// installed (dockerd's nftables backend writes there, not to iptables).
func (h *Host) RulesMentioning(ctx context.Context, links []string) ([]string, error) {
	var found []string
	cmds := [][]string{{"iptables-save"}, {"ip6tables-save"}}
	if _, err := exec.LookPath("nft"); err == nil {
		cmds = append(cmds, []string{"nft", "list", "ruleset"})
	}
	for _, argv := range cmds {
		cmd := strings.Join(argv, " ")
		out, err := h.Run(ctx, argv[0], argv[1:]...)
		if err != nil {
			return nil, err
		}
		for _, line := range strings.Split(out, "\n") {
			f := strings.FieldsFunc(line, func(r rune) bool { return r == ' ' || r == '\t' || r == '"' })
			for _, l := range links {
				if slices.Contains(f, l) {
					found = append(found, cmd+": "+line)
					break
				}
			}
		}
	}
	return found, nil
}

// ContainerAddr is the container's IPv4 address and endpoint ID on network.
func (h *Host) ContainerAddr(ctx context.Context, container, network string) (netip.Addr, string, error) {
	out, err := h.Docker(ctx, "inspect", "-f",
		fmt.Sprintf(`{{with index .NetworkSettings.Networks %q}}{{.IPAddress}} {{.EndpointID}}{{end}}`, network), container)
	if err != nil {
		return netip.Addr{}, "", err
	}
	ip, id, _ := strings.Cut(out, " ")
	a, err := netip.ParseAddr(ip)
	if err != nil || id == "" {
		return netip.Addr{}, "", fmt.Errorf("%s: container %s on network %s: address %q, endpoint %q", h, container, network, ip, id)
	}
	return a, id, nil
}

// consulGet decodes the JSON answer of GET path from host A's Consul agent
// into v. A 404 is errNotFound.
func (l *Lab) consulGet(ctx context.Context, path string, v any) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, l.ConsulHTTP+path, nil)
	if err != nil {
		return err
	}
	resp, err := l.consul.Do(req)
	if err != nil {
		return fmt.Errorf("consul GET %s: %w", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("consul GET %s: %w", path, err)
	}
	if resp.StatusCode == http.StatusNotFound {
		return errNotFound
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("consul GET %s: %s: %s", path, resp.Status, bytes.TrimSpace(body))
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("consul GET %s: %w", path, err)
	}
	return nil
}

var errNotFound = errors.New("not found")

// KVKeys lists every key under the plugins' prefix, without the prefix.
func (l *Lab) KVKeys(ctx context.Context) ([]string, error) {
	var keys []string
	err := l.consulGet(ctx, "/v1/kv/"+kvPrefix+"?keys", &keys)
	if errors.Is(err, errNotFound) {
		return nil, nil
	}
	for i := range keys {
		// A stamp's nonce (kvstore/stamp.go) as "*": a stamp is the same
		// key from one write of its record to the next.
		keys[i] = stampNonce.ReplaceAllString(strings.TrimPrefix(keys[i], kvPrefix), "${1}*")
	}
	slices.Sort(keys)
	return keys, err
}

// stampNonce matches a stamp's nonce, a new one at every write of its
// record.
var stampNonce = regexp.MustCompile(`(/config\.v(/peers/[^/]+)?@/)[0-9a-f]{16}$`)

// kvEntry is a KV pair as the Consul HTTP API returns it.
type kvEntry struct {
	Key   string
	Value []byte // base64 in JSON
}

// Endpoint is what the suite reads of an endpoint record in KV.
type Endpoint struct {
	Key  string // KV key without the prefix
	ID   string `json:"id"`
	Node string `json:"node"`
	IPv4 string `json:"ipv4"`
	Net  string `json:"network_key"`
}

// Endpoints returns the endpoint records of the logical network key (all
// networks when key is ""), sorted by key.
func (l *Lab) Endpoints(ctx context.Context, key string) ([]Endpoint, error) {
	var entries []kvEntry
	err := l.consulGet(ctx, "/v1/kv/"+kvPrefix+"networks/?recurse", &entries)
	if errors.Is(err, errNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var eps []Endpoint
	for _, e := range entries {
		k := strings.TrimPrefix(e.Key, kvPrefix)
		parts := strings.Split(k, "/") // networks/<key>/endpoints/<id>
		if len(parts) != 4 || parts[2] != "endpoints" || (key != "" && parts[1] != key) {
			continue
		}
		var rec struct {
			Data Endpoint `json:"data"`
		}
		if err := json.Unmarshal(e.Value, &rec); err != nil {
			return nil, fmt.Errorf("endpoint record %s: %w: %s", k, err, e.Value)
		}
		rec.Data.Key = k
		eps = append(eps, rec.Data)
	}
	slices.SortFunc(eps, func(a, b Endpoint) int { return strings.Compare(a.Key, b.Key) })
	return eps, nil
}

// NetworkVNI is the VNI of the logical network key from its KV record.
func (l *Lab) NetworkVNI(ctx context.Context, key string) (uint32, error) {
	var entries []kvEntry
	if err := l.consulGet(ctx, "/v1/kv/"+kvPrefix+"networks/"+key+"/config", &entries); err != nil {
		return 0, fmt.Errorf("network record %s: %w", key, err)
	}
	var rec struct {
		Data struct {
			VNI uint32 `json:"vni"`
		} `json:"data"`
	}
	if len(entries) != 1 {
		return 0, fmt.Errorf("network record %s: %d entries", key, len(entries))
	}
	if err := json.Unmarshal(entries[0].Value, &rec); err != nil || rec.Data.VNI == 0 {
		return 0, fmt.Errorf("network record %s: no VNI (%v): %s", key, err, entries[0].Value)
	}
	return rec.Data.VNI, nil
}

// Instance is a service instance in the Consul catalog.
type Instance struct {
	Node           string
	ServiceID      string
	ServiceName    string
	ServiceAddress string
}

func (i Instance) String() string {
	return fmt.Sprintf("%s/%s(%s)@%s", i.Node, i.ServiceName, i.ServiceID, i.ServiceAddress)
}

// Instances lists the instances of every service in the catalog but
// Consul's own and the plugins' liveness checks (consul-overlay-host, one
// per plugin while it runs), sorted.
func (l *Lab) Instances(ctx context.Context) ([]Instance, error) {
	var services map[string][]string
	if err := l.consulGet(ctx, "/v1/catalog/services", &services); err != nil {
		return nil, err
	}
	var all []Instance
	for name := range services {
		if name == "consul" || name == "consul-overlay-host" {
			continue
		}
		var inst []Instance
		if err := l.consulGet(ctx, "/v1/catalog/service/"+name, &inst); err != nil {
			return nil, err
		}
		all = append(all, inst...)
	}
	slices.SortFunc(all, func(a, b Instance) int { return strings.Compare(a.String(), b.String()) })
	return all, nil
}

// Script runs a lab script (lab/NAME) with args, its output going to the
// test's standard output as it comes (one stream with the test's log, so
// the two do not interleave mid-line).
func (l *Lab) Script(ctx context.Context, name string, args ...string) error {
	return runScript(ctx, l.Root, name, args...)
}

func runScript(ctx context.Context, root, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, filepath.Join(root, "lab", name), args...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stdout
	cmd.Dir = root
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("lab/%s %s: %w", name, strings.Join(args, " "), err)
	}
	return nil
}

// --- the scenario summary ---

// result is one scenario's outcome for the summary.
type result struct {
	name   string
	status string // PASS, FAIL, SKIP
	took   time.Duration
	note   string
}

var (
	resultsMu sync.Mutex
	results   []result
)

func record(r result) {
	resultsMu.Lock()
	defer resultsMu.Unlock()
	results = append(results, r)
}

func printSummary(w io.Writer) {
	resultsMu.Lock()
	defer resultsMu.Unlock()
	fmt.Fprintln(w, "e2e: summary")
	for _, r := range results {
		line := fmt.Sprintf("e2e: %s %s %s", r.status, r.name, r.took.Round(100*time.Millisecond))
		if r.note != "" {
			line += " (" + r.note + ")"
		}
		fmt.Fprintln(w, line)
	}
}

// --- TestMain ---

const owner = "e2e"

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "e2e: needs root (sudo make e2e)")
		return 1
	}
	for _, bin := range []string{"docker", "nsenter", "ip", "busybox", "iptables-save"} {
		if _, err := exec.LookPath(bin); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: %s not found: run lab/prereqs.sh\n", bin)
			return 1
		}
	}
	root, err := dockertest.RepoRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}

	var downOnce sync.Once
	down := func() {
		downOnce.Do(func() {
			if os.Getenv("E2E_KEEP_LAB") != "" {
				fmt.Fprintln(os.Stderr, "e2e: E2E_KEEP_LAB set: the lab stays up (lab/down.sh tears it down)")
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			if err := runScript(ctx, root, "down.sh", "--owner", owner); err != nil {
				fmt.Fprintln(os.Stderr, "e2e:", err)
			}
		})
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s := <-sigs
		fmt.Fprintf(os.Stderr, "e2e: %v: tearing the lab down\n", s)
		down()
		printSummary(os.Stdout)
		os.Exit(1)
	}()

	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	if os.Getenv("E2E_KEEP_LAB") == "" {
		// The suite tears its lab down when it ends: one still up is what
		// a killed run left, whose Consul data and engines' networks would
		// come back into this run. (down.sh leaves a lab of another owner
		// up, and says so; it is quiet about a lab that is down.)
		err = runScript(ctx, root, "down.sh", "--owner", owner)
	}
	if err == nil {
		err = runScript(ctx, root, "up.sh", "--owner", owner)
	}
	cancel()
	if err == nil {
		theLab, err = loadLab(root)
	}
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		err = theLab.readDataplane(ctx)
		cancel()
		for _, h := range theLab.Hosts() {
			if h.DataNS != "" {
				fmt.Fprintf(os.Stderr, "e2e: %s: data plane in %s (%s)\n", h, h.DataNS, strings.Join(h.PluginEnv, " "))
			}
		}
	}
	up := result{name: "lab-up", status: "PASS", took: time.Since(start)}
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: bringing the lab up:", err)
		up.status, up.note = "FAIL", err.Error()
	}
	record(up)
	code := 1
	if err == nil {
		code = m.Run()
	}
	down()
	printSummary(os.Stdout)
	return code
}
