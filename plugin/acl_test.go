package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/consulacl"
	"consul-overlay/discovery"
	"consul-overlay/internal/testenv"
	"consul-overlay/reaper"
)

// aclCluster is one Consul agent with ACLs on and default deny, on the
// first of two test hosts, and its management client. The agent's own
// token is the management token (it must register its node); requests
// without a token get a token that may do nothing (the default token is
// the management one only until the agent is ready: testenv's readiness
// probe writes KV without a token).
type aclCluster struct {
	hosts  []*testenv.Host
	agent  *testenv.ConsulAgent
	admin  *api.Client
	prefix string
}

func newACLCluster(t *testing.T, name string) *aclCluster {
	t.Helper()
	requireNsenter(t)
	const root = "a5c1e3d0-1111-2222-3333-444455556666"
	hosts := testenv.NewUnderlay(t, 2, testenv.UnderlayOptions{})
	agent := testenv.StartConsul(t, testenv.WithNetNS(hosts[0].NS.Path), testenv.WithBindAddr(hosts[0].Addr.String()),
		testenv.WithArgs("-hcl", `acl { enabled = true  default_policy = "deny"  down_policy = "extend-cache"
			tokens { initial_management = "`+root+`"  agent = "`+root+`"  default = "`+root+`" } }`))
	admin, err := api.NewClient(&api.Config{Address: agent.Addr, Token: root, Transport: &http.Transport{DialContext: agent.DialContext}})
	if err != nil {
		t.Fatal(err)
	}
	c := &aclCluster{hosts: hosts, agent: agent, admin: admin, prefix: "co-" + name + "-" + randomID()[:8] + "/"}
	nothing := c.token(t, "nothing", `key_prefix "nothing/" { policy = "read" }`)
	if _, err := admin.Agent().UpdateDefaultACLToken(nothing, nil); err != nil {
		t.Fatal(err)
	}
	// The check that default deny is in force for requests without a token.
	anon, err := api.NewClient(&api.Config{Address: agent.Addr, Transport: &http.Transport{DialContext: agent.DialContext}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := anon.KV().Put(&api.KVPair{Key: c.prefix + "x", Value: []byte("x")}, nil); err == nil {
		t.Fatal("a KV write without a token succeeded: the agent is not default deny")
	}
	return c
}

// token creates a policy with rules and a token holding only it.
func (c *aclCluster) token(t *testing.T, name, rules string) string {
	t.Helper()
	pol, _, err := c.admin.ACL().PolicyCreate(&api.ACLPolicy{Name: name + "-" + randomID()[:8], Rules: rules}, nil)
	if err != nil {
		t.Fatalf("policy %s: %v\n%s", name, err, rules)
	}
	tok, _, err := c.admin.ACL().TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: pol.ID}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return tok.SecretID
}

// keys lists the prefix with the management token.
func (c *aclCluster) keys(t *testing.T) []string {
	t.Helper()
	keys, _, err := c.admin.KV().Keys(c.prefix, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

// TestACLLeastPrivilege: with a token holding exactly the documented
// policy (aclPolicyHCL) on an agent with default deny, two hosts create a
// network, run containers that reach each other across hosts, register
// them on the agent, and tear everything down: only the host records and
// membership markers are left. A service on another node cannot be removed
// from the catalog with that token (the reaper's optional step).
func TestACLLeastPrivilege(t *testing.T) {
	c := newACLCluster(t, "aclok")
	policy := aclPolicy(c.prefix)
	tok := c.token(t, "least", policy)
	t.Logf("policy:\n%s", policy)
	var ps []*pluginProc
	for i, h := range c.hosts {
		// Without NODE_NAME on host0: the node name comes from the agent
		// (agent read).
		env := []string{"CONSUL_HTTP_TOKEN=" + tok}
		p := newPluginProc(t, fmt.Sprintf("host%d", i), h, c.agent.Addr, c.prefix, env...)
		if i == 0 {
			p.setEnv("NODE_NAME", "")
		}
		p.start()
		p.mustWork(t)
		ps = append(ps, p)
	}

	spec := netSpec{subnet4: "10.74.0.0/24", opts: map[string]string{"name": "aclnet"}}
	var nets []*dockerNet
	var ctrs []*container
	for _, p := range ps {
		n, err := p.createNetwork(spec)
		if err != nil {
			t.Fatalf("%s: create network: %v", p.name, err)
		}
		nets = append(nets, n)
		ctrs = append(ctrs, n.runWith(t, map[string]any{
			"SERVICE_NAME": "aclweb",
			"com.docker.network.endpoint.exposedports": []map[string]int{{"Proto": 6, "Port": 80}},
		}))
	}
	eventually(t, 15*time.Second, func() error { return ctrs[0].ping(t, ctrs[1].addr4.Addr(), 1) })
	eventually(t, 15*time.Second, func() error { return ctrs[1].ping(t, ctrs[0].addr4.Addr(), 1) })

	// Both registered on the (shared) agent, with their overlay addresses.
	eventually(t, 10*time.Second, func() error {
		svcs, err := c.admin.Agent().ServicesWithFilter(`Service == "aclweb"`)
		if err != nil {
			return err
		}
		var got []string
		for _, s := range svcs {
			got = append(got, s.Address)
		}
		slices.Sort(got)
		want := []string{ctrs[0].addr4.Addr().String(), ctrs[1].addr4.Addr().String()}
		slices.Sort(want)
		if !slices.Equal(got, want) {
			return fmt.Errorf("aclweb services at %v, want %v", got, want)
		}
		return nil
	})
	// The start-up probe left nothing behind.
	if svcs, err := c.admin.Agent().ServicesWithFilter(fmt.Sprintf(`Service == %q`, consulacl.ProbeServiceName)); err != nil || len(svcs) != 0 {
		t.Errorf("probe services left: %v, %v", svcs, err)
	}

	for i, n := range nets {
		ctrs[i].remove(t)
		if err := n.remove(); err != nil {
			t.Fatalf("remove network on host%d: %v", i, err)
		}
	}
	eventually(t, 10*time.Second, func() error {
		svcs, err := c.admin.Agent().ServicesWithFilter(`Service == "aclweb"`)
		if err != nil {
			return err
		}
		if len(svcs) != 0 {
			return fmt.Errorf("%d aclweb services left after teardown", len(svcs))
		}
		return nil
	})
	for _, k := range c.keys(t) {
		rest := strings.TrimPrefix(k, c.prefix)
		if !strings.HasPrefix(rest, hostsPrefix) && !strings.HasPrefix(rest, "members/") {
			t.Errorf("key left after teardown: %s", k)
		}
	}
	for _, p := range ps {
		b := p.logText(t)
		if strings.Contains(b, "Permission denied") || strings.Contains(b, "permission denied") {
			t.Errorf("plugin %s logged a refusal:\n%s", p.name, tail(b, 30))
		}
	}

	// The reaper's catalog step (the services of a gone host, on another
	// node): node read finds them, service write removes them.
	c.reapCatalog(t, tok, true)
}

// reapCatalog registers a service of a gone host on another node and has
// the reaper's catalog, with token, find and remove it; ok says whether the
// token may (else the refusal is a warning and the service stays).
func (c *aclCluster) reapCatalog(t *testing.T, token string, ok bool) {
	t.Helper()
	const gone = "0123456789abcdef0123456789abcdef"
	sid := "aclweb-gone-" + randomID()[:6]
	if _, err := c.admin.Catalog().Register(&api.CatalogRegistration{
		Node: "gone-node", Address: "192.0.2.99",
		Service: &api.AgentService{ID: sid, Service: "aclweb-gone", Meta: map[string]string{
			discovery.MetaManagedBy: discovery.ManagedByValue, discovery.MetaHostID: gone,
		}},
	}, nil); err != nil {
		t.Fatal(err)
	}
	cl, err := api.NewClient(&api.Config{Address: c.agent.Addr, Token: token, Transport: &http.Transport{DialContext: c.agent.DialContext}})
	if err != nil {
		t.Fatal(err)
	}
	var logs strings.Builder
	cat := newReaperCatalog(reaper.ConsulCatalog{Client: cl, LocalNode: "not-gone-node"}, slog.New(slog.NewTextHandler(&logs, nil)))
	ctx := context.Background()
	svcs, err := cat.HostServices(ctx, "gone-node", gone)
	if err != nil {
		t.Fatalf("reaper catalog: list: %v", err)
	}
	if len(svcs) != 1 || svcs[0].ID != sid {
		t.Fatalf("reaper catalog found %v, want the service %s (the token needs node read)", svcs, sid)
	}
	if err := cat.Deregister(ctx, svcs[0]); err != nil {
		t.Fatalf("reaper catalog: deregister: %v", err)
	}
	left, _, err := c.admin.Catalog().NodeServiceList("gone-node", nil)
	if err != nil {
		t.Fatal(err)
	}
	stays := left != nil && slices.ContainsFunc(left.Services, func(s *api.AgentService) bool { return s.ID == sid })
	switch {
	case ok && stays:
		t.Errorf("service %s still in the catalog after the reaper's deregistration", sid)
	case !ok && !stays:
		t.Errorf("service %s removed with a token that should not remove it", sid)
	case !ok && !strings.Contains(logs.String(), "cannot deregister"):
		t.Errorf("no warning for the refused deregistration: %s", logs.String())
	}
	t.Logf("reaper catalog step with the token: removed=%v; log: %s", !stays, strings.TrimSpace(logs.String()))
}

// TestACLReaperCatalogRefused: a token whose service rule does not cover
// a gone host's service cannot remove it from the catalog: the reaper's
// catalog step logs a warning and goes on.
func TestACLReaperCatalogRefused(t *testing.T) {
	c := newACLCluster(t, "aclreap")
	tok := c.token(t, "narrow", `service_prefix "" { policy = "read" }
service_prefix "web" { policy = "write" }
node_prefix "" { policy = "read" }`)
	c.reapCatalog(t, tok, false)
}

// TestACLMissingPermission: a token lacking one required rule of the
// policy stops the plugin at start with an error, served on the socket and
// logged, that names the missing rule; nothing is written to the store.
// Without the optional node read it starts with a warning naming it.
func TestACLMissingPermission(t *testing.T) {
	c := newACLCluster(t, "aclmiss")
	full := aclPolicy(c.prefix)
	for _, tc := range []struct {
		name, drop, want  string
		noNodeName, warns bool
	}{
		{name: "service", drop: `service_prefix ""`, want: `service_prefix "" { policy = "write" }`},
		{name: "session", drop: `session_prefix ""`, want: `session_prefix "" { policy = "write" }`},
		{name: "agent", drop: `agent_prefix ""`, want: `agent_prefix "" { policy = "read" }`, noNodeName: true},
		{name: "node", drop: `node_prefix ""`, want: `node_prefix "" { policy = "read" }`, warns: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rules := withoutRule(t, full, tc.drop)
			tok := c.token(t, "no-"+tc.name, rules)
			p := newPluginProc(t, "host0", c.hosts[0], c.agent.Addr, c.prefix, "CONSUL_HTTP_TOKEN="+tok)
			if tc.noNodeName {
				p.setEnv("NODE_NAME", "")
			}
			p.start()
			if tc.warns {
				// Optional: the plugin starts, with a warning naming it.
				p.mustWork(t)
				if b := p.logText(t); !strings.Contains(b, "cannot read the catalog's nodes") || !strings.Contains(b, "node_prefix") {
					t.Errorf("no warning naming %s:\n%s", tc.want, tail(b, 20))
				}
				return
			}
			msg, took := p.startError(t)
			if !strings.Contains(msg, tc.want) {
				t.Fatalf("start without %s: %q; want it to name %s", tc.drop, msg, tc.want)
			}
			t.Logf("refused after %s: %s", took.Round(time.Millisecond), msg)
			if b := p.logText(t); !strings.Contains(b, "cannot start") || !strings.Contains(b, strings.ReplaceAll(tc.want, `"`, `\"`)) && !strings.Contains(b, tc.want) {
				t.Errorf("log does not name %s:\n%s", tc.want, tail(b, 10))
			}
			if keys := c.keys(t); len(keys) != 0 {
				t.Errorf("keys written by a refused start: %v", keys)
			}
			// With the agent-read rule missing, NODE_NAME set is enough.
			if tc.noNodeName {
				p.stop(syscall.SIGTERM)
				p.setEnv("NODE_NAME", "host0")
				p.start()
				p.mustWork(t)
			}
		})
	}
}

// withoutRule drops the block of full that starts with head.
func withoutRule(t *testing.T, full, head string) string {
	t.Helper()
	i := strings.Index(full, head)
	if i < 0 {
		t.Fatalf("no %s in the policy", head)
	}
	j := strings.Index(full[i:], "}\n")
	return full[:i] + full[i+j+2:]
}

// logText is the plugin's log so far.
func (p *pluginProc) logText(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(p.logf)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
