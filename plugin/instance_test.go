package main

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/hostid"
	"consul-overlay/internal/testenv"
	"consul-overlay/ipam"
	"consul-overlay/kvstore"
)

// startError is the reason a plugin that could not start answers driver
// calls with, and how long after its launch it answered. A plugin that did
// start fails the test.
func (p *pluginProc) startError(t *testing.T) (string, time.Duration) {
	t.Helper()
	err := p.call("/NetworkDriver.DeleteNetwork", map[string]any{"NetworkID": randomID()}, nil)
	took := time.Since(p.started)
	if err == nil {
		t.Fatalf("plugin %s started; want a failed start", p.name)
	}
	if !strings.Contains(err.Error(), "could not start") {
		t.Fatalf("plugin %s: %v; want the start-up failure", p.name, err)
	}
	return err.Error(), took
}

// mustWork fails the test unless the plugin serves driver calls.
func (p *pluginProc) mustWork(t *testing.T) {
	t.Helper()
	if err := p.call("/NetworkDriver.DeleteNetwork", map[string]any{"NetworkID": randomID()}, nil); err != nil {
		t.Fatalf("plugin %s does not work: %v", p.name, err)
	}
}

func (p *pluginProc) pid() int { return p.cmd.Process.Pid }

// stopWithin signals SIGTERM and fails unless the process is gone in d.
func (p *pluginProc) stopWithin(t *testing.T, d time.Duration) {
	t.Helper()
	start := time.Now()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(d):
		t.Fatalf("plugin %s still running %s after SIGTERM", p.name, d)
	}
	t.Logf("plugin %s ended %s after SIGTERM", p.name, time.Since(start).Round(time.Millisecond))
}

// TestInstanceSameDataDir: a second instance on a running one's DATA_DIR
// fails within seconds naming the first one's pid, ends on SIGTERM, and
// leaves the first one working; a third on the first one's socket exits
// without taking the socket.
func TestInstanceSameDataDir(t *testing.T) {
	requireNsenter(t)
	hosts := testenv.NewUnderlay(t, 2, testenv.UnderlayOptions{})
	a := startPlugin(t, "host0", hosts[0], "", "")
	a.mustWork(t)

	// Another namespace, so only DATA_DIR is shared.
	b := startPluginEnv(t, "host0-again", hosts[1], "", "", "DATA_DIR="+a.data)
	msg, took := b.startError(t)
	if !strings.Contains(msg, fmt.Sprintf("pid %d", a.pid())) || !strings.Contains(msg, "DATA_DIR") {
		t.Fatalf("second instance on DATA_DIR %s: %q; want the first one's pid %d named", a.data, msg, a.pid())
	}
	if took > 5*time.Second {
		t.Fatalf("second instance answered its failure after %s, want within seconds", took)
	}
	t.Logf("second instance on the same DATA_DIR refused after %s: %s", took.Round(time.Millisecond), msg)
	b.stopWithin(t, 3*time.Second)
	a.mustWork(t)
	n, err := a.createNetwork(netSpec{subnet4: "10.71.0.0/24"})
	if err != nil {
		t.Fatalf("first instance after the refused second: %v", err)
	}
	if err := n.remove(); err != nil {
		t.Fatal(err)
	}

	// Same socket (and DATA_DIR): it must not unlink the live socket.
	c := startPluginEnv(t, "host0-socket", hosts[0], "", "", "DATA_DIR="+a.data, "SOCKET="+a.socket)
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
		t.Fatal("instance on a live socket still running after 10s")
	}
	log, _ := os.ReadFile(c.logf)
	if !strings.Contains(string(log), fmt.Sprintf("pid %d", a.pid())) {
		t.Fatalf("instance on a live socket: log does not name pid %d:\n%s", a.pid(), tail(string(log), 10))
	}
	a.mustWork(t)
}

// TestInstanceSameNamespace: in one network namespace, a second instance
// on the same store and KV prefix (its own DATA_DIR) fails naming the
// first; one with another prefix starts and works.
func TestInstanceSameNamespace(t *testing.T) {
	requireNsenter(t)
	hosts := testenv.NewUnderlay(t, 1, testenv.UnderlayOptions{})
	agent := testenv.StartConsul(t, testenv.WithNetNS(hosts[0].NS.Path), testenv.WithBindAddr(hosts[0].Addr.String()))
	prefix := "co-inst-" + randomID()[:8] + "/"
	a := startPlugin(t, "host0", hosts[0], agent.Addr, prefix)
	a.mustWork(t)

	b := startPlugin(t, "host0-b", hosts[0], agent.Addr, prefix)
	msg, took := b.startError(t)
	if !strings.Contains(msg, fmt.Sprintf("pid %d", a.pid())) || !strings.Contains(msg, prefix) || !strings.Contains(msg, a.data) {
		t.Fatalf("second instance with prefix %s: %q; want the first one's pid %d, the prefix and its DATA_DIR", prefix, msg, a.pid())
	}
	t.Logf("second instance on the same prefix refused after %s: %s", took.Round(time.Millisecond), msg)
	b.stopWithin(t, 3*time.Second)

	c := startPlugin(t, "host0-c", hosts[0], agent.Addr, "co-inst-other-"+randomID()[:8]+"/")
	c.mustWork(t)
	var pool struct{ PoolID string }
	c.must("/IpamDriver.RequestPool", map[string]any{"AddressSpace": ipam.LocalAddressSpace, "Pool": "10.72.0.0/24"}, &pool)
	c.must("/IpamDriver.ReleasePool", map[string]any{"PoolID": pool.PoolID}, nil)
	a.mustWork(t)
}

// kvDump is every key under prefix with its value, flags and session, as
// Consul has it.
func kvDump(t *testing.T, agent *testenv.ConsulAgent, prefix string) string {
	t.Helper()
	c, err := api.NewClient(&api.Config{Address: agent.Addr, Transport: &http.Transport{DialContext: agent.DialContext}})
	if err != nil {
		t.Fatal(err)
	}
	kvps, _, err := c.KV().List(prefix, &api.QueryOptions{RequireConsistent: true})
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, p := range kvps {
		fmt.Fprintf(&b, "%s modify=%d lock=%d flags=%d session=%q value=%q\n", p.Key, p.ModifyIndex, p.LockIndex, p.Flags, p.Session, p.Value)
	}
	return b.String()
}

// hostRecordOf reads hosts/<id> from Consul.
func hostRecordOf(t *testing.T, agent *testenv.ConsulAgent, prefix, id string) (hostRecord, string) {
	t.Helper()
	c, err := api.NewClient(&api.Config{Address: agent.Addr, Transport: &http.Transport{DialContext: agent.DialContext}})
	if err != nil {
		t.Fatal(err)
	}
	p, _, err := c.KV().Get(prefix+hostsPrefix+id, nil)
	if err != nil || p == nil {
		t.Fatalf("host record %s%s%s: %v, %v", prefix, hostsPrefix, id, p, err)
	}
	var rec hostRecord
	if err := kvstore.Decode(p.Value, &rec); err != nil {
		t.Fatal(err)
	}
	return rec, p.Session
}

func readHostID(t *testing.T, dataDir string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dataDir, hostid.IDFile))
	if err != nil {
		t.Fatal(err)
	}
	id := strings.TrimSpace(string(b))
	if !hostid.Valid(id) {
		t.Fatalf("host-id %q is not an identity", id)
	}
	return id
}

// TestHostIdentity: hosts sharing one agent and no NODE_NAME get distinct
// identities that persist across restarts (clean and kill -9); a third
// host started with a copy of a live host's host-id is refused naming that
// host, and the store is byte-identical before and after.
func TestHostIdentity(t *testing.T) {
	requireNsenter(t)
	hosts := testenv.NewUnderlay(t, 3, testenv.UnderlayOptions{})
	agent := testenv.StartConsul(t, testenv.WithNetNS(hosts[0].NS.Path), testenv.WithBindAddr(hosts[0].Addr.String()))
	prefix := "co-id-" + randomID()[:8] + "/"
	// No NODE_NAME: both take the shared agent's node name.
	a := startPluginEnv(t, "host0", hosts[0], agent.Addr, prefix, "NODE_NAME=")
	b := startPluginEnv(t, "host1", hosts[1], agent.Addr, prefix, "NODE_NAME=")
	a.mustWork(t)
	b.mustWork(t)
	idA, idB := readHostID(t, a.data), readHostID(t, b.data)
	if idA == idB {
		t.Fatalf("two hosts on one agent share the identity %s", idA)
	}
	recA, sessA := hostRecordOf(t, agent, prefix, idA)
	recB, _ := hostRecordOf(t, agent, prefix, idB)
	if recA.Node != agent.NodeName || recB.Node != agent.NodeName {
		t.Fatalf("node names %q, %q; want both the shared agent's %q", recA.Node, recB.Node, agent.NodeName)
	}
	if recA.ID != idA || recA.VTEP != hosts[0].Addr || recA.PID != a.pid() || sessA == "" {
		t.Fatalf("host record of host0 = %+v (session %q); want id %s, vtep %s, pid %d, held", recA, sessA, idA, hosts[0].Addr, a.pid())
	}

	t.Run("copied identity refused", func(t *testing.T) {
		before := kvDump(t, agent, prefix)
		data := filepath.Join(t.TempDir(), "data")
		if err := os.MkdirAll(data, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(data, hostid.IDFile), []byte(idA+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		c := startPluginEnv(t, "host2", hosts[2], agent.Addr, prefix, "DATA_DIR="+data)
		msg, took := c.startError(t)
		for _, want := range []string{idA, recA.Node, hosts[0].Addr.String(), filepath.Join(data, hostid.IDFile), "Remove"} {
			if !strings.Contains(msg, want) {
				t.Fatalf("copied identity: %q; want it to name %q", msg, want)
			}
		}
		t.Logf("copied identity refused after %s: %s", took.Round(time.Millisecond), msg)
		c.stopWithin(t, 3*time.Second)
		if after := kvDump(t, agent, prefix); after != before {
			t.Fatalf("the refused host changed the store:\nbefore:\n%s\nafter:\n%s", before, after)
		}
		if _, s := hostRecordOf(t, agent, prefix, idA); s != sessA {
			t.Fatalf("host0's record is held by %q, want its session %q", s, sessA)
		}
		a.mustWork(t)
	})

	t.Run("persists across restarts", func(t *testing.T) {
		for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
			old := a.pid()
			a.stop(sig)
			if sig == syscall.SIGTERM {
				if rec, s := hostRecordOf(t, agent, prefix, idA); s != "" || rec.PID != old {
					t.Fatalf("after a clean stop the record is %+v held by %q, want pid %d and no session", rec, s, old)
				}
			}
			a.start()
			a.mustWork(t)
			if id := readHostID(t, a.data); id != idA {
				t.Fatalf("after %v and restart host-id is %s, want %s", sig, id, idA)
			}
			rec, s := hostRecordOf(t, agent, prefix, idA)
			if rec.PID != a.pid() || s == "" || s == sessA {
				t.Fatalf("after %v and restart the record is %+v held by %q; want pid %d and a new session", sig, rec, s, a.pid())
			}
			sessA = s
		}
		keys := kvKeys(t, agent, prefix+hostsPrefix)
		slices.Sort(keys)
		want := []string{prefix + hostsPrefix + idA, prefix + hostsPrefix + idB}
		slices.Sort(want)
		if !slices.Equal(keys, want) {
			t.Fatalf("host records %v, want %v", keys, want)
		}
	})
}

// TestStartWithoutReadPermission: restarted with a token that may not
// touch the prefix, the plugin refuses to start, naming the permission,
// before it reconciles anything: the running container keeps its
// interface and the host its overlay devices.
func TestStartWithoutReadPermission(t *testing.T) {
	requireNsenter(t)
	const root = "11111111-2222-3333-4444-555555555555"
	hosts := testenv.NewUnderlay(t, 1, testenv.UnderlayOptions{})
	agent := testenv.StartConsul(t, testenv.WithNetNS(hosts[0].NS.Path), testenv.WithBindAddr(hosts[0].Addr.String()),
		testenv.WithArgs("-hcl", `acl { enabled = true  default_policy = "allow"  tokens { initial_management = "`+root+`" } }`))
	prefix := "co-acl-" + randomID()[:8] + "/"
	a := startPlugin(t, "host0", hosts[0], agent.Addr, prefix)
	n, err := a.createNetwork(netSpec{subnet4: "10.73.0.0/24", opts: map[string]string{"name": "acl"}})
	if err != nil {
		t.Fatal(err)
	}
	c1, c2 := n.run(t), n.run(t)
	eventually(t, 10*time.Second, func() error { return c1.ping(t, c2.addr4.Addr(), 1) })
	links := ourLinks(t, hosts[0])

	admin, err := api.NewClient(&api.Config{Address: agent.Addr, Token: root, Transport: &http.Transport{DialContext: agent.DialContext}})
	if err != nil {
		t.Fatal(err)
	}
	pol, _, err := admin.ACL().PolicyCreate(&api.ACLPolicy{
		Name:  "deny-" + randomID()[:8],
		Rules: `key_prefix "` + prefix + `" { policy = "deny" }`,
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, _, err := admin.ACL().TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: pol.ID}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	a.stop(syscall.SIGTERM)
	a.env = append(a.env, "CONSUL_HTTP_TOKEN="+tok.SecretID)
	a.start()
	msg, took := a.startError(t)
	if !strings.Contains(msg, `key_prefix "`+prefix+`"`) || !strings.Contains(msg, "permission denied") {
		t.Fatalf("start with a denied token: %q; want it to name key_prefix %q and permission denied", msg, prefix)
	}
	t.Logf("start with a token denied the prefix refused after %s: %s", took.Round(time.Millisecond), msg)
	time.Sleep(time.Second)
	if got := ourLinks(t, hosts[0]); !slices.Equal(got, links) {
		t.Fatalf("links after the refused start: %v, want %v", got, links)
	}
	if err := c1.ping(t, c2.addr4.Addr(), 3); err != nil {
		t.Fatalf("containers lost connectivity after a refused start: %v", err)
	}
}

// TestSIGTERMDuringStart: a plugin stuck at start (its Consul address
// answers nothing) ends promptly on SIGTERM.
func TestSIGTERMDuringStart(t *testing.T) {
	requireNsenter(t)
	hosts := testenv.NewUnderlay(t, 1, testenv.UnderlayOptions{})
	// 192.0.2.200 is on the underlay's subnet but nobody has it: connects
	// hang until the store's timeout.
	p := newPluginProc(t, "host0", hosts[0], "192.0.2.200:8500", "co-term/")
	p.launch()
	time.Sleep(1500 * time.Millisecond)
	select {
	case <-p.done:
		b, _ := os.ReadFile(p.logf)
		t.Fatalf("plugin exited before the signal:\n%s", tail(string(b), 20))
	default:
	}
	p.stopWithin(t, 3*time.Second)
}

// TestVTEPChangeRepublished: without VTEP_ADDR the plugin follows the
// default route's source address; a change is in its host record within a
// second.
func TestVTEPChangeRepublished(t *testing.T) {
	requireNsenter(t)
	hosts := testenv.NewUnderlay(t, 1, testenv.UnderlayOptions{})
	h := hosts[0]
	h.NS.MustRun(t, "ip", "addr", "add", "192.0.2.101/24", "dev", h.Link)
	h.NS.MustRun(t, "ip", "route", "add", "default", "via", "192.0.2.254", "dev", h.Link, "src", h.Addr.String())
	agent := testenv.StartConsul(t, testenv.WithNetNS(h.NS.Path), testenv.WithBindAddr(h.Addr.String()))
	prefix := "co-vtep-" + randomID()[:8] + "/"
	p := startPluginEnv(t, "host0", h, agent.Addr, prefix, "VTEP_ADDR=")
	p.mustWork(t)
	id := readHostID(t, p.data)
	if rec, _ := hostRecordOf(t, agent, prefix, id); rec.VTEP != h.Addr {
		t.Fatalf("host record vtep %s, want the default route's source %s", rec.VTEP, h.Addr)
	}
	start := time.Now()
	h.NS.MustRun(t, "ip", "route", "replace", "default", "via", "192.0.2.254", "dev", h.Link, "src", "192.0.2.101")
	eventually(t, 5*time.Second, func() error {
		if rec, _ := hostRecordOf(t, agent, prefix, id); rec.VTEP.String() != "192.0.2.101" {
			return fmt.Errorf("host record vtep %s, want 192.0.2.101", rec.VTEP)
		}
		return nil
	})
	took := time.Since(start)
	t.Logf("new underlay address in the host record after %s", took.Round(time.Millisecond))
	if took > time.Second {
		t.Fatalf("host record updated %s after the change, want within 1s", took)
	}
}

// TestHostRecordNamesAgentNode: a plugin whose NODE_NAME differs from its
// Consul agent's node name writes the agent's name in its host record:
// its services are registered there, and a reaper deregisters them there
// once the host is gone (reaper testServicesUnderAgentNode).
func TestHostRecordNamesAgentNode(t *testing.T) {
	requireNsenter(t)
	hosts := testenv.NewUnderlay(t, 1, testenv.UnderlayOptions{})
	agent := testenv.StartConsul(t, testenv.WithNetNS(hosts[0].NS.Path), testenv.WithBindAddr(hosts[0].Addr.String()))
	prefix := "co-agentnode-" + randomID()[:8] + "/"
	a := startPluginEnv(t, "host0", hosts[0], agent.Addr, prefix, "NODE_NAME=web-1")
	a.mustWork(t)
	rec, _ := hostRecordOf(t, agent, prefix, readHostID(t, a.data))
	if rec.Node != "web-1" || rec.AgentNode != agent.NodeName {
		t.Fatalf("host record node %q, agent node %q; want web-1 and the agent's %q", rec.Node, rec.AgentNode, agent.NodeName)
	}
}
