package harness

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"consul-overlay/internal/testenv"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// Build compiles the plugin daemon (the module's ./plugin) once per process
// into a temporary directory and returns its path. CGO is off, as in
// `make build`.
func Build(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		root, err := testenv.ModuleRoot()
		if err != nil {
			buildErr = err
			return
		}
		dir, err := os.MkdirTemp("", "consul-overlay-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "consul-overlay")
		cmd := exec.Command("go", "build", "-trimpath", "-o", binPath, "./plugin")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./plugin: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// PluginOptions configure one plugin daemon.
type PluginOptions struct {
	// ConsulAddr is the Consul HTTP address (CONSUL_HTTP_ADDR); "" runs the
	// plugin on its embedded store.
	ConsulAddr string
	// Prefix is the KV prefix (KV_PREFIX).
	Prefix string
	// LogLevel is LOG_LEVEL; "" means debug, as the tests want it.
	LogLevel string
	// Env holds extra KEY=VALUE settings.
	Env []string
}

// Plugin is one plugin daemon on one test host.
type Plugin struct {
	Name    string
	Host    *testenv.Host
	Socket  string
	LogPath string

	t      testing.TB
	bin    string
	env    []string
	client *http.Client

	mu      sync.Mutex // guards cmd, done, started
	cmd     *exec.Cmd
	done    chan struct{}
	started time.Time
}

// StartPlugin runs the plugin binary bin in a test host's network
// namespace, waits until it answers on its socket, and stops it (SIGTERM)
// when the test ends.
func StartPlugin(t testing.TB, bin, name string, host *testenv.Host, o PluginOptions) *Plugin {
	t.Helper()
	dir := t.TempDir()
	p := &Plugin{
		Name: name, Host: host, t: t, bin: bin,
		Socket:  filepath.Join(dir, "plugin.sock"),
		LogPath: filepath.Join(dir, "plugin.log"),
	}
	if o.LogLevel == "" {
		o.LogLevel = "debug"
	}
	p.env = []string{
		"SOCKET=" + p.Socket,
		"DATA_DIR=" + filepath.Join(dir, "data"),
		"NODE_NAME=" + name,
		"VTEP_ADDR=" + host.Addr.String(),
		"LOG_LEVEL=" + o.LogLevel,
		// No engine knows these containers: asked, the machine's own
		// engine would have the plugin reclaim them as stale.
		"DOCKER_HOST=none",
	}
	if o.ConsulAddr != "" {
		p.env = append(p.env, "CONSUL_HTTP_ADDR="+o.ConsulAddr, "KV_PREFIX="+o.Prefix)
	}
	p.env = append(p.env, o.Env...)
	p.client = &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", p.Socket)
			},
			MaxIdleConnsPerHost: 4,
		},
	}
	p.Start()
	t.Cleanup(func() {
		p.Stop(syscall.SIGTERM)
		if t.Failed() {
			t.Logf("plugin %s log (tail):\n%s", name, Tail(p.Log(), 60))
		}
	})
	return p
}

// Start starts the daemon (again, after Stop) and waits up to 10 s for it
// to answer GetCapabilities. It must be called from the test's goroutine.
func (p *Plugin) Start() {
	p.t.Helper()
	f, err := os.OpenFile(p.LogPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		p.t.Fatal(err)
	}
	// nsenter execs the daemon in place: the child's PID is the daemon's.
	cmd := exec.Command("nsenter", "--net="+p.Host.NS.Path, "--", p.bin)
	cmd.Env = append(os.Environ(), p.env...)
	cmd.Stdout, cmd.Stderr = f, f
	started := time.Now()
	if err := cmd.Start(); err != nil {
		f.Close()
		p.t.Fatalf("start plugin %s: %v", p.Name, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); f.Close(); close(done) }()
	p.mu.Lock()
	p.cmd, p.done, p.started = cmd, done, started
	p.mu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		var caps map[string]any
		if err := p.Call("/NetworkDriver.GetCapabilities", nil, &caps); err == nil {
			return
		}
		select {
		case <-done:
			p.t.Fatalf("plugin %s exited at start:\n%s", p.Name, Tail(p.Log(), 40))
		case <-time.After(5 * time.Millisecond):
		}
	}
	p.t.Fatalf("plugin %s did not answer on %s within 10s", p.Name, p.Socket)
}

// Started is when the current daemon process was started.
func (p *Plugin) Started() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.started
}

// Pid is the daemon's process ID (0 when it is not running).
func (p *Plugin) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.cmd.Process == nil {
		return 0
	}
	select {
	case <-p.done:
		return 0
	default:
	}
	return p.cmd.Process.Pid
}

// Stop signals the daemon and waits for it (SIGKILL after 10 s).
func (p *Plugin) Stop(sig syscall.Signal) {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return
	}
	select {
	case <-done:
		return
	default:
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

// Log returns the daemon's log so far (all its runs).
func (p *Plugin) Log() string {
	b, _ := os.ReadFile(p.LogPath)
	return string(b)
}

// Call speaks the plugin protocol: POST with a JSON body (none for nil),
// the engine's Accept header, and {"Err"}/{"Error"} errors.
func (p *Plugin) Call(method string, req, resp any) error {
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
		return fmt.Errorf("%s on %s: %s", method, p.Name, msg)
	}
	if resp != nil {
		return json.Unmarshal(raw, resp)
	}
	return nil
}

// requiresMAC asks the IPAM driver whether Docker would send a MAC with
// each address request.
func (p *Plugin) requiresMAC() (bool, error) {
	var caps struct{ RequiresMACAddress bool }
	if err := p.Call("/IpamDriver.GetCapabilities", nil, &caps); err != nil {
		return false, err
	}
	return caps.RequiresMACAddress, nil
}

// Tail returns the last n lines of s.
func Tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
