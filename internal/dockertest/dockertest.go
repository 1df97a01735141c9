package dockertest

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"consul-overlay/internal/testenv"
)

// BusyboxImage is the tests' container image, built by `make busybox-image`.
const BusyboxImage = "consul-overlay-test/busybox:latest"

// LinkPrefixes are the name prefixes of the host links consul-overlay
// creates: VXLAN devices, bridges and the two ends of container veths.
var LinkPrefixes = []string{"vx-", "vxbr-", "vxh-", "vxc-"}

// DockerdLogs are where the tests look for the dockerd log, which holds the
// plugins' output: the engine started by hand and the one .ci/run starts.
// DOCKERD_LOG, when set, is looked at first.
var DockerdLogs = []string{"/tmp/dockerd.log", "/tmp/ci-dockerd.log"}

// The engine under test is the docker CLI's: the machine's engine, or the
// one DOCKER_HOST names. `make dockertest ENGINE=29` (scripts/dockertest.sh)
// runs the suite inside the network namespace of an engine 29 of its own,
// with DOCKER_HOST at that engine's socket and DOCKERD_LOG at its log, so
// that the host links, the firewall rules, the loopback and the routes the
// tests look at are that engine's host's.

// EngineSettings are the `docker plugin set` arguments that point the
// plugin's docker-sock mount at the directory of the engine under test's
// socket: none for the default engine (config.json's /var/run), and
// docker-sock.source=DIR when DOCKER_HOST is unix://DIR/docker.sock.
func EngineSettings() ([]string, error) {
	host := os.Getenv("DOCKER_HOST")
	if host == "" {
		return nil, nil
	}
	sock, ok := strings.CutPrefix(host, "unix://")
	if !ok || filepath.Base(sock) != "docker.sock" {
		return nil, fmt.Errorf("DOCKER_HOST=%s: the plugin mounts the directory of a socket named docker.sock, want unix://DIR/docker.sock", host)
	}
	return []string{"docker-sock.source=" + filepath.Dir(sock)}, nil
}

// Require stops the test unless it runs as root with a Docker engine that
// answers `docker info`, and with make on PATH. Under CI=true it fails.
func Require(t testing.TB) {
	t.Helper()
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("docker"); err != nil {
		testenv.Missing(t, "docker CLI", "apt-get install docker.io")
	}
	if _, err := exec.LookPath("make"); err != nil {
		testenv.Missing(t, "make", "apt-get install make")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := Docker(ctx, "info", "--format", "{{.ServerVersion}}"); err != nil {
		testenv.Missing(t, "a running Docker engine", "start dockerd: dockerd >/tmp/dockerd.log 2>&1 &")
	}
}

// Docker runs the docker CLI and returns its standard output without
// surrounding white space. A failure's error carries the command line and
// standard error.
func Docker(ctx context.Context, args ...string) (string, error) {
	return run(ctx, "", nil, "docker", args...)
}

// run runs name with args in dir (the working directory when empty), with
// env added to the environment.
func run(ctx context.Context, dir string, env []string, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = strings.TrimSpace(stdout.String())
		}
		return strings.TrimSpace(stdout.String()), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, msg)
	}
	return strings.TrimSpace(stdout.String()), nil
}

// RepoRoot is the directory of the module's go.mod.
func RepoRoot() (string, error) { return testenv.ModuleRoot() }

// BuildPlugin runs `make plugin` in root for ref (NAME:TAG): it builds
// bin/consul-overlay and creates the plugin, disabled, replacing one of the
// same name. buildDir is the scratch directory for the rootfs (BUILD_DIR of
// scripts/plugin.sh); vars are more make variables (PLUGIN_DATAPLANE=1).
func BuildPlugin(ctx context.Context, root, ref, buildDir string, vars ...string) error {
	name, tag, ok := strings.Cut(ref, ":")
	if !ok {
		return fmt.Errorf("plugin reference %q: want NAME:TAG", ref)
	}
	_, err := run(ctx, root, []string{"BUILD_DIR=" + buildDir}, "make", append([]string{"--no-print-directory",
		"plugin", "PLUGIN_NAME=" + name, "PLUGIN_TAG=" + tag}, vars...)...)
	return err
}

// EnginePID is the pid of the engine under test: the one in DOCKERD_PIDFILE
// (scripts/dockertest.sh sets it for its engine), else the machine's
// engine's /var/run/docker.pid.
func EnginePID() (int, error) {
	f := cmp.Or(os.Getenv("DOCKERD_PIDFILE"), "/var/run/docker.pid")
	b, err := os.ReadFile(f)
	if err != nil {
		return 0, fmt.Errorf("the engine's pid (set DOCKERD_PIDFILE): %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("the engine's pid in %s: %w", f, err)
	}
	return pid, nil
}

// BuildBusybox runs `make busybox-image` in root; quick when the image exists.
func BuildBusybox(ctx context.Context, root string) error {
	_, err := run(ctx, root, nil, "make", "--no-print-directory", "busybox-image")
	return err
}

// CreateContainer creates (does not start) a container of BusyboxImage
// running sleep, named prefix plus a unique suffix, with extra `docker
// create` arguments, and removes it when the test ends.
func CreateContainer(t testing.TB, prefix string, args ...string) (id, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	name = UniqueName(prefix)
	args = append(append([]string{"create", "--name", name}, args...), BusyboxImage, "sleep", "300")
	id, err := Docker(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := Docker(ctx, "rm", "-f", id); err != nil {
			t.Logf("cleanup: %v", err)
		}
	})
	return id, name
}

// UniqueName is prefix followed by 8 random hex digits.
func UniqueName(prefix string) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return prefix + hex.EncodeToString(b)
}

// PluginLog returns the lines the plugin with this full ID wrote, from the
// dockerd log (DOCKERD_LOG, then DockerdLogs), or a note saying why there
// are none.
func PluginLog(pluginID string) string {
	logs := DockerdLogs
	if p := os.Getenv("DOCKERD_LOG"); p != "" {
		logs = append([]string{p}, logs...)
	}
	var out strings.Builder
	for _, path := range logs {
		f, err := os.Open(path)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
		for sc.Scan() {
			if line := sc.Text(); strings.Contains(line, pluginID) {
				out.WriteString(line)
				out.WriteByte('\n')
			}
		}
		f.Close()
		if out.Len() > 0 {
			return fmt.Sprintf("(from %s)\n%s", path, out.String())
		}
	}
	return fmt.Sprintf("no lines of plugin %s in %s (set DOCKERD_LOG to the dockerd log)", pluginID, strings.Join(logs, ", "))
}

// HostLinks lists the names of the links in the host namespace that start
// with one of LinkPrefixes.
func HostLinks(ctx context.Context) (map[string]bool, error) {
	out, err := run(ctx, "", nil, "ip", "-o", "link", "show")
	if err != nil {
		return nil, err
	}
	links := map[string]bool{}
	for _, name := range linkNames(out) {
		for _, p := range LinkPrefixes {
			if strings.HasPrefix(name, p) {
				links[name] = true
			}
		}
	}
	return links, nil
}

// linkNames are the link names in `ip -o link show` output, in its order.
func linkNames(out string) []string {
	var names []string
	for _, line := range strings.Split(out, "\n") {
		// "12: vxbr-1000: <BROADCAST,...>" or "13: vxh-ab@if12: ..."
		if f := strings.Fields(line); len(f) > 1 {
			name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
			names = append(names, name)
		}
	}
	return names
}

// RulesMentioning returns the lines of iptables-save and ip6tables-save of
// the host that name one of the links (as -i/-o arguments or anywhere else).
func RulesMentioning(ctx context.Context, links []string) ([]string, error) {
	var found []string
	for _, cmd := range []string{"iptables-save", "ip6tables-save"} {
		out, err := run(ctx, "", nil, cmd)
		if err != nil {
			return nil, err
		}
		for _, line := range strings.Split(out, "\n") {
			for _, l := range links {
				if containsWord(line, l) {
					found = append(found, cmd+": "+line)
					break
				}
			}
		}
	}
	return found, nil
}

// containsWord reports whether line contains w delimited by white space,
// quotes or the ends of the line.
func containsWord(line, w string) bool {
	for _, f := range strings.FieldsFunc(line, func(r rune) bool { return r == ' ' || r == '\t' || r == '"' }) {
		if f == w {
			return true
		}
	}
	return false
}

// Eventually calls f until it succeeds or within has passed, and returns
// f's last error. Each call of f should bound itself (ping -W, a context).
func Eventually(ctx context.Context, within time.Duration, f func(context.Context) error) error {
	deadline := time.Now().Add(within)
	for {
		err := f(ctx)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return errors.Join(err, ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}
