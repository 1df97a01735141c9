package testenv

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Time limits of the agent's lifecycle.
const (
	consulReadyTimeout = 30 * time.Second
	consulStopGrace    = 5 * time.Second
	consulStartTries   = 3
	consulLogTailLines = 60
)

// ConsulAgent is a `consul agent -dev` owned by one test. Its HTTP API is at
// Addr (plain http). Tests build their own API clients against Addr; an
// agent inside a network namespace is reached with DialContext.
//
// Start and Stop must be called from the test's goroutine (they may call
// t.Fatal); the exported fields never change after StartConsul returns.
type ConsulAgent struct {
	// Addr is host:port of the HTTP API.
	Addr string
	// DNSAddr is host:port of the DNS interface (UDP and TCP).
	DNSAddr string
	// SerfLANAddr is host:port of the Serf LAN listener, the address other
	// agents pass to -retry-join.
	SerfLANAddr string
	// NodeName is the agent's unique -node name.
	NodeName string
	// LogPath is the file that collects the agent's stdout and stderr
	// across restarts.
	LogPath string
	// HTTPSAddr is host:port of the HTTPS API, and CAFile the PEM file of
	// the authority that signed its certificate (for 127.0.0.1 and
	// localhost); both empty unless WithHTTPS.
	HTTPSAddr, CAFile string

	t     testing.TB
	bin   string
	args  []string
	netns string

	mu     sync.Mutex // guards cmd and exited
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has been reaped
}

type consulOptions struct {
	bind      string
	netns     string
	nodeName  string
	retryJoin []string
	extra     []string
	https     bool
}

// ConsulOption changes how StartConsul runs the agent.
type ConsulOption func(*consulOptions)

// WithBindAddr sets the address the agent binds every listener to (-bind
// and -client). Default 127.0.0.1.
func WithBindAddr(addr string) ConsulOption {
	return func(o *consulOptions) { o.bind = addr }
}

// WithNetNS runs the agent inside the network namespace at path (for
// example /run/netns/<name>), started with `nsenter --net=<path>`. The
// namespace must already have the bind address up (in a fresh namespace,
// at least `ip link set lo up`). Port availability is not pre-checked
// there: a fresh namespace has no listeners.
func WithNetNS(path string) ConsulOption {
	return func(o *consulOptions) { o.netns = path }
}

// WithNodeName overrides the generated unique node name.
func WithNodeName(name string) ConsulOption {
	return func(o *consulOptions) { o.nodeName = name }
}

// WithRetryJoin adds a -retry-join flag per address (another agent's
// SerfLANAddr).
func WithRetryJoin(addrs ...string) ConsulOption {
	return func(o *consulOptions) { o.retryJoin = append(o.retryJoin, addrs...) }
}

// WithHTTPS also serves the HTTP API over TLS (HTTPSAddr), with a
// certificate for 127.0.0.1 signed by an authority of the test's own
// (CAFile).
func WithHTTPS() ConsulOption {
	return func(o *consulOptions) { o.https = true }
}

// WithArgs appends raw arguments to the agent's command line.
func WithArgs(args ...string) ConsulOption {
	return func(o *consulOptions) { o.extra = append(o.extra, args...) }
}

// StartConsul starts a Consul dev agent on free ports, waits until it has
// elected itself leader and accepts KV writes, and stops it when the test
// ends. A missing consul binary is reported through Missing.
func StartConsul(t testing.TB, opts ...ConsulOption) *ConsulAgent {
	t.Helper()
	o := consulOptions{bind: "127.0.0.1"}
	for _, opt := range opts {
		opt(&o)
	}
	bin, err := consulBinary()
	if err != nil {
		Missing(t, "consul binary", "run `make consul`, put consul on PATH or set CONSUL_BIN: "+err.Error())
		return nil
	}
	if o.netns != "" {
		if _, err := exec.LookPath("nsenter"); err != nil {
			Missing(t, "nsenter", "install util-linux")
			return nil
		}
	}
	if o.nodeName == "" {
		o.nodeName = "testenv-" + randomHex(6)
	}

	dir := t.TempDir()
	a := &ConsulAgent{
		NodeName: o.nodeName,
		LogPath:  filepath.Join(dir, "consul.log"),
		t:        t,
		bin:      bin,
		netns:    o.netns,
	}
	var certFile, keyFile string
	if o.https {
		var err error
		if a.CAFile, certFile, keyFile, err = writeTestCerts(dir); err != nil {
			t.Fatalf("start consul agent: certificates: %v", err)
		}
	}
	t.Cleanup(func() {
		a.stop()
		if t.Failed() {
			a.logTail()
		}
	})

	var lastErr error
	for try := 1; try <= consulStartTries; try++ {
		ports, err := pickPorts(o.bind, o.netns == "")
		if err != nil {
			t.Fatalf("start consul agent: %v", err)
		}
		a.configure(o, ports)
		if o.https {
			a.HTTPSAddr = net.JoinHostPort(o.bind, strconv.Itoa(ports.https))
			a.args = append(a.args, "-https-port", strconv.Itoa(ports.https), "-hcl",
				fmt.Sprintf(`tls { https { ca_file = %q  cert_file = %q  key_file = %q } }`, a.CAFile, certFile, keyFile))
		}
		lastErr = a.start()
		if lastErr == nil {
			return a
		}
		// Most likely another process took one of the ports between the
		// check and the agent's bind; try again with new ones.
		a.stop()
		t.Logf("start consul agent %s (try %d/%d): %v", a.NodeName, try, consulStartTries, lastErr)
	}
	a.logTail()
	t.Fatalf("start consul agent %s: %v", a.NodeName, lastErr)
	return nil
}

// Stop stops the agent (SIGTERM, SIGKILL after a grace period) and waits
// for it to exit. Stopping a stopped agent does nothing.
func (a *ConsulAgent) Stop() {
	a.t.Helper()
	a.stop()
}

// Start restarts a stopped agent on the same ports and node name and waits
// until it is ready. Dev mode keeps no data across restarts. Starting a
// running agent does nothing.
func (a *ConsulAgent) Start() {
	a.t.Helper()
	a.mu.Lock()
	running := a.cmd != nil
	a.mu.Unlock()
	if running {
		return
	}
	if err := a.start(); err != nil {
		a.stop()
		a.logTail()
		a.t.Fatalf("restart consul agent %s: %v", a.NodeName, err)
	}
}

// DialContext dials addr from the agent's network namespace (or the
// current one without WithNetNS). Use it as an http.Transport's
// DialContext to reach an agent running in another namespace.
func (a *ConsulAgent) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	if a.netns == "" {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	return DialIn(ctx, a.netns, network, addr)
}

type consulPorts struct {
	http, dns, server, serfLAN, serfWAN, grpc, grpcTLS, https int
}

func (a *ConsulAgent) configure(o consulOptions, p consulPorts) {
	a.Addr = net.JoinHostPort(o.bind, strconv.Itoa(p.http))
	a.DNSAddr = net.JoinHostPort(o.bind, strconv.Itoa(p.dns))
	a.SerfLANAddr = net.JoinHostPort(o.bind, strconv.Itoa(p.serfLAN))
	args := []string{
		"agent", "-dev",
		"-node", o.nodeName,
		"-bind", o.bind,
		"-client", o.bind,
		"-http-port", strconv.Itoa(p.http),
		"-dns-port", strconv.Itoa(p.dns),
		"-server-port", strconv.Itoa(p.server),
		"-serf-lan-port", strconv.Itoa(p.serfLAN),
		"-serf-wan-port", strconv.Itoa(p.serfWAN),
		"-grpc-port", strconv.Itoa(p.grpc),
		"-grpc-tls-port", strconv.Itoa(p.grpcTLS),
		"-log-level", "info",
	}
	for _, j := range o.retryJoin {
		args = append(args, "-retry-join", j)
	}
	a.args = append(args, o.extra...)
}

// start launches the process and waits for readiness. On error the caller
// stops the agent.
func (a *ConsulAgent) start() error {
	logf, err := os.OpenFile(a.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open agent log: %w", err)
	}
	defer logf.Close() // the child keeps its own descriptor
	fmt.Fprintf(logf, "==== %s: %s %s\n", time.Now().Format(time.RFC3339Nano), a.bin, strings.Join(a.args, " "))

	var cmd *exec.Cmd
	if a.netns != "" {
		// nsenter execs the agent after setns, so cmd.Process is the agent.
		cmd = exec.Command("nsenter", append([]string{"--net=" + a.netns, "--", a.bin}, a.args...)...)
	} else {
		cmd = exec.Command(a.bin, a.args...)
	}
	cmd.Dir = filepath.Dir(a.LogPath)
	cmd.Stdout = logf
	cmd.Stderr = logf
	// Own process group so a terminal's ^C does not reach it first, and
	// killed with the test binary if that dies without running cleanups
	// (a test timeout panics past them).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := startOnSpawnThread(cmd); err != nil {
		return fmt.Errorf("exec %s: %w", cmd.Path, err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	a.mu.Lock()
	a.cmd, a.exited = cmd, exited
	a.mu.Unlock()
	return a.waitReady(exited)
}

func (a *ConsulAgent) stop() {
	a.mu.Lock()
	cmd, exited := a.cmd, a.exited
	a.cmd, a.exited = nil, nil
	a.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(consulStopGrace):
		_ = cmd.Process.Kill()
		<-exited
	}
}

// waitReady polls until the agent knows a leader and a KV write succeeds,
// the agent exits, or consulReadyTimeout passes.
func (a *ConsulAgent) waitReady(exited <-chan struct{}) error {
	client := &http.Client{
		Timeout: 2 * time.Second,
		Transport: &http.Transport{
			DialContext: a.DialContext,
			// No idle connections left behind: callers count goroutines.
			DisableKeepAlives: true,
		},
	}
	base := "http://" + a.Addr
	probe := base + "/v1/kv/testenv/ready-" + a.NodeName
	deadline := time.Now().Add(consulReadyTimeout)
	var lastErr error = errors.New("no answer yet")
	for {
		select {
		case <-exited:
			return fmt.Errorf("agent exited before it was ready (last check: %v)", lastErr)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("agent not ready after %s: %v", consulReadyTimeout, lastErr)
		}
		lastErr = func() error {
			body, err := httpDo(client, http.MethodGet, base+"/v1/status/leader", nil)
			if err != nil {
				return err
			}
			if leader := strings.Trim(strings.TrimSpace(string(body)), `"`); leader == "" {
				return errors.New("no leader elected")
			}
			body, err = httpDo(client, http.MethodPut, probe, strings.NewReader("ok"))
			if err != nil {
				return err
			}
			if strings.TrimSpace(string(body)) != "true" {
				return fmt.Errorf("kv write answered %q", body)
			}
			_, err = httpDo(client, http.MethodDelete, probe, nil)
			return err
		}()
		if lastErr == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func httpDo(c *http.Client, method, url string, body io.Reader) ([]byte, error) {
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s %s: %s: %s", method, url, resp.Status, bytes.TrimSpace(b))
	}
	return b, nil
}

// logTail prints the end of the agent's log to the test log.
func (a *ConsulAgent) logTail() {
	b, err := os.ReadFile(a.LogPath)
	if err != nil {
		a.t.Logf("consul agent %s log: %v", a.NodeName, err)
		return
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > consulLogTailLines {
		lines = lines[len(lines)-consulLogTailLines:]
	}
	a.t.Logf("consul agent %s: last %d lines of %s:\n%s", a.NodeName, len(lines), a.LogPath, strings.Join(lines, "\n"))
}

// consulBinary finds the agent: $CONSUL_BIN, <module root>/bin/consul, then
// PATH.
func consulBinary() (string, error) {
	if p := os.Getenv("CONSUL_BIN"); p != "" {
		if err := isExecutable(p); err != nil {
			return "", fmt.Errorf("CONSUL_BIN=%s: %w", p, err)
		}
		return p, nil
	}
	if root, err := ModuleRoot(); err == nil {
		p := filepath.Join(root, "bin", "consul")
		if isExecutable(p) == nil {
			return p, nil
		}
	}
	return exec.LookPath("consul")
}

func isExecutable(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if fi.IsDir() || fi.Mode()&0o111 == 0 {
		return fmt.Errorf("%s is not an executable file", p)
	}
	return nil
}

// ModuleRoot walks up from the working directory (a test runs in its
// package's directory) to the directory holding go.mod.
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// Ports are drawn at random below the kernel's ephemeral range, so that
// outgoing connections never sit on them, and remembered for the life of
// the process so that agents of parallel tests never share one. Other
// processes are caught by the bind check and by StartConsul's retry.
const (
	portMin = 10000
	portMax = 32000
)

var (
	portsMu   sync.Mutex
	portsUsed = map[int]bool{}
)

func pickPorts(bind string, check bool) (consulPorts, error) {
	portsMu.Lock()
	defer portsMu.Unlock()
	var got []int
	for tries := 0; len(got) < 8; tries++ {
		if tries > 1000 {
			return consulPorts{}, errors.New("no free ports found")
		}
		n, err := rand.Int(rand.Reader, big.NewInt(portMax-portMin))
		if err != nil {
			return consulPorts{}, err
		}
		p := portMin + int(n.Int64())
		if portsUsed[p] || (check && !portFree(bind, p)) {
			continue
		}
		portsUsed[p] = true
		got = append(got, p)
	}
	return consulPorts{
		http: got[0], dns: got[1], server: got[2], serfLAN: got[3],
		serfWAN: got[4], grpc: got[5], grpcTLS: got[6], https: got[7],
	}, nil
}

// portFree reports whether both TCP and UDP can bind bind:port now (DNS and
// Serf use both).
func portFree(bind string, port int) bool {
	addr := net.JoinHostPort(bind, strconv.Itoa(port))
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	l.Close()
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return false
	}
	pc.Close()
	return true
}

// DialIn dials from the network namespace at nsPath: the socket is
// created on a thread inside it (a socket stays in the namespace it was
// created in), which then goes back (doIn). Going back matters beyond
// reuse: when the goroutine ran on the process's main thread, which the
// runtime never discards, /proc/PID/ns/net would show the namespace for
// the whole process, and the lab's teardown kills every process it finds
// there.
func DialIn(ctx context.Context, nsPath, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := doIn(nsPath, nsPath, func() error {
		var d net.Dialer
		var err error
		conn, err = d.DialContext(ctx, network, addr)
		return err
	})
	if err != nil && conn != nil {
		conn.Close() // dialled, but the thread could not go back
		conn = nil
	}
	return conn, err
}

// The kernel sends Pdeathsig when the *thread* that forked the child exits,
// and Go discards threads whose goroutine ends while locked to them (as
// DialIn and namespace helpers do). Agents are therefore forked from
// one thread that stays locked, and alive, for the life of the process.
var spawner struct {
	once sync.Once
	reqs chan func()
}

func startOnSpawnThread(cmd *exec.Cmd) error {
	spawner.once.Do(func() {
		spawner.reqs = make(chan func())
		go func() {
			runtime.LockOSThread() // never unlocked: this thread must not exit
			for f := range spawner.reqs {
				f()
			}
		}()
	})
	errc := make(chan error, 1)
	spawner.reqs <- func() { errc <- cmd.Start() }
	return <-errc
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}
