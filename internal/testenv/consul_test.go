package testenv

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// kvClient talks to an agent through its own dialer, without keep-alive so
// nothing lingers after the test.
func kvClient(a *ConsulAgent) *http.Client {
	return &http.Client{
		Timeout:   3 * time.Second,
		Transport: &http.Transport{DialContext: a.DialContext, DisableKeepAlives: true},
	}
}

func kvPut(t *testing.T, a *ConsulAgent, key, value string) error {
	t.Helper()
	req, err := http.NewRequest(http.MethodPut, "http://"+a.Addr+"/v1/kv/"+key, strings.NewReader(value))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := kvClient(a).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || strings.TrimSpace(string(b)) != "true" {
		t.Fatalf("put %s on %s: %s %s", key, a.Addr, resp.Status, b)
	}
	return nil
}

// kvGet returns the raw value of key, "" with found=false when absent.
func kvGet(t *testing.T, a *ConsulAgent, key string) (value string, found bool, err error) {
	t.Helper()
	resp, err := kvClient(a).Get("http://" + a.Addr + "/v1/kv/" + key + "?raw")
	if err != nil {
		return "", false, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	switch resp.StatusCode {
	case http.StatusOK:
		return string(b), true, nil
	case http.StatusNotFound:
		return "", false, nil
	}
	t.Fatalf("get %s on %s: %s %s", key, a.Addr, resp.Status, b)
	return "", false, nil
}

func TestStartConsulTwoAgentsStopStart(t *testing.T) {
	// StartConsul may call t.Fatal, so both start on the test goroutine;
	// concurrent port picking is covered by TestPickPortsDistinctUnderConcurrency.
	a, b := StartConsul(t), StartConsul(t)
	if a.Addr == b.Addr || a.DNSAddr == b.DNSAddr || a.SerfLANAddr == b.SerfLANAddr || a.NodeName == b.NodeName {
		t.Fatalf("agents share an address or name: %+v / %+v", a, b)
	}

	if err := kvPut(t, a, "k", "on-a"); err != nil {
		t.Fatalf("put on a: %v", err)
	}
	if v, ok, err := kvGet(t, a, "k"); err != nil || !ok || v != "on-a" {
		t.Fatalf("get k from a = %q, %v, %v; want on-a", v, ok, err)
	}
	if _, ok, err := kvGet(t, b, "k"); err != nil || ok {
		t.Fatalf("agent b sees agent a's key (found=%v, err=%v)", ok, err)
	}

	a.Stop()
	if _, _, err := kvGet(t, a, "k"); err == nil {
		t.Fatalf("agent a still answers at %s after Stop", a.Addr)
	}
	a.Stop() // idempotent
	// b is unaffected.
	if err := kvPut(t, b, "k", "on-b"); err != nil {
		t.Fatalf("put on b while a is stopped: %v", err)
	}

	addr := a.Addr
	a.Start()
	if a.Addr != addr {
		t.Fatalf("restart moved the agent from %s to %s", addr, a.Addr)
	}
	if _, ok, err := kvGet(t, a, "k"); err != nil || ok {
		t.Fatalf("after restart get k = found %v, err %v; want absent (dev mode keeps no data)", ok, err)
	}
	if err := kvPut(t, a, "k", "again"); err != nil {
		t.Fatalf("put after restart: %v", err)
	}
	a.Start() // running: no-op

	if fi, err := os.Stat(a.LogPath); err != nil || fi.Size() == 0 {
		t.Fatalf("agent log %s missing or empty: %v", a.LogPath, err)
	}
	log, _ := os.ReadFile(a.LogPath)
	if n := strings.Count(string(log), "==== "); n != 2 {
		t.Fatalf("agent log records %d starts, want 2", n)
	}
}

func TestPickPortsDistinctUnderConcurrency(t *testing.T) {
	const n = 8
	seen := make(chan int, n*8)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p, err := pickPorts("127.0.0.1", true)
			if err != nil {
				errs <- err
				return
			}
			for _, port := range []int{p.http, p.dns, p.server, p.serfLAN, p.serfWAN, p.grpc, p.grpcTLS, p.https} {
				seen <- port
			}
		}()
	}
	wg.Wait()
	close(seen)
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	dup := map[int]bool{}
	for p := range seen {
		if dup[p] {
			t.Fatalf("port %d handed out twice", p)
		}
		if p < portMin || p >= portMax {
			t.Fatalf("port %d outside [%d, %d)", p, portMin, portMax)
		}
		dup[p] = true
	}
	if len(dup) != n*8 {
		t.Fatalf("got %d ports, want %d", len(dup), n*8)
	}
}

func TestConsulBinary(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "consul")
	if err := os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(dir, "plain")
	if err := os.WriteFile(plain, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		env     string
		want    string
		wantErr bool
	}{
		{name: "CONSUL_BIN wins", env: exe, want: exe},
		{name: "CONSUL_BIN missing file", env: filepath.Join(dir, "nope"), wantErr: true},
		{name: "CONSUL_BIN not executable", env: plain, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("CONSUL_BIN", tt.env)
			got, err := consulBinary()
			if tt.wantErr {
				if err == nil || !strings.Contains(err.Error(), "CONSUL_BIN") {
					t.Fatalf("consulBinary() = %q, %v; want an error naming CONSUL_BIN", got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("consulBinary() = %q, %v; want %q", got, err, tt.want)
			}
		})
	}

	t.Run("module root bin", func(t *testing.T) {
		t.Setenv("CONSUL_BIN", "")
		root, err := ModuleRoot()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
			t.Fatalf("ModuleRoot() = %s without go.mod: %v", root, err)
		}
		want := filepath.Join(root, "bin", "consul")
		if isExecutable(want) != nil {
			// Not built: the PATH lookup is what is left.
			want, _ = exec.LookPath("consul")
		}
		if got, _ := consulBinary(); got != want {
			t.Fatalf("consulBinary() = %q; want %q", got, want)
		}
	})
}

func TestStartConsulInNetNS(t *testing.T) {
	RequireRoot(t)
	if _, err := exec.LookPath("ip"); err != nil {
		Missing(t, "ip (iproute2)", "apt-get install iproute2")
	}
	name := "tenv-" + randomHex(4)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("ip -n %s link set lo up: %v: %s", name, err, out)
	}

	a := StartConsul(t, WithNetNS("/run/netns/"+name), WithNodeName("ns-"+name))

	// Reachable through the namespace dialer, and it is the agent we named.
	resp, err := kvClient(a).Get("http://" + a.Addr + "/v1/agent/self")
	if err != nil {
		t.Fatalf("agent/self in netns %s: %v", name, err)
	}
	defer resp.Body.Close()
	var self struct{ Config struct{ NodeName string } }
	if err := json.NewDecoder(resp.Body).Decode(&self); err != nil {
		t.Fatalf("decode agent/self: %v", err)
	}
	if self.Config.NodeName != "ns-"+name {
		t.Fatalf("agent in netns reports node %q, want %q", self.Config.NodeName, "ns-"+name)
	}

	// Not reachable from the test's own namespace: its listener lives only
	// in the other one.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var d net.Dialer
	if c, err := d.DialContext(ctx, "tcp", a.Addr); err == nil {
		c.Close()
		t.Fatalf("agent's %s is reachable from the host namespace", a.Addr)
	}
}
