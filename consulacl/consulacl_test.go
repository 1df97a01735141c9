package consulacl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/testenv"
	"consul-overlay/kvstore"
)

// TestDenied: what the probes take for a refusal.
func TestDenied(t *testing.T) {
	for _, tc := range []struct {
		err              error
		denied, unreachd bool
	}{
		{api.StatusError{Code: 403, Body: "Permission denied"}, true, false},
		{fmt.Errorf("x: %w", kvstore.ErrPermissionDenied), true, false},
		{errors.New(`Unexpected response code: 403 (ACL not found)`), true, false},
		{api.StatusError{Code: 500, Body: "rpc error"}, false, true},
		{api.StatusError{Code: 429, Body: "slow down"}, false, true},
		{errors.New("dial tcp 192.0.2.1:14033: connect: connection refused"), false, true},
		{nil, false, true},
	} {
		if got := Denied(tc.err); got != tc.denied {
			t.Errorf("Denied(%v) = %v, want %v", tc.err, got, tc.denied)
		}
		if tc.err != nil {
			if got := Unreachable(tc.err); got != tc.unreachd {
				t.Errorf("Unreachable(%v) = %v, want %v", tc.err, got, tc.unreachd)
			}
		}
	}
	e := &PermissionError{Op: "register services", Rule: RuleServiceWrite, Err: errors.New("403")}
	if !errors.Is(e, kvstore.ErrPermissionDenied) || !Denied(e) || !strings.Contains(e.Error(), `service_prefix "" { policy = "write" }`) {
		t.Errorf("PermissionError: %v", e)
	}
}

// aclAgent is a Consul agent with ACLs on and default deny, and its
// management client.
type aclAgent struct {
	agent *testenv.ConsulAgent
	admin *api.Client
}

func startACLAgent(t *testing.T) *aclAgent {
	t.Helper()
	const root = "b6d2f4e1-1111-2222-3333-444455556666"
	agent := testenv.StartConsul(t, testenv.WithArgs("-hcl", `acl { enabled = true  default_policy = "deny"  down_policy = "extend-cache"
		tokens { initial_management = "`+root+`"  agent = "`+root+`"  default = "`+root+`" } }`))
	admin, err := api.NewClient(&api.Config{Address: agent.Addr, Token: root, Transport: &http.Transport{DialContext: agent.DialContext}})
	if err != nil {
		t.Fatal(err)
	}
	a := &aclAgent{agent: agent, admin: admin}
	// Requests without a token may do nothing from now on.
	nothing := a.token(t, "nothing", `key_prefix "nothing/" { policy = "read" }`)
	if _, err := admin.Agent().UpdateDefaultACLToken(nothing, nil); err != nil {
		t.Fatal(err)
	}
	return a
}

// token creates a policy with rules and a token holding only it.
func (a *aclAgent) token(t *testing.T, name, rules string) string {
	t.Helper()
	pol, _, err := a.admin.ACL().PolicyCreate(&api.ACLPolicy{Name: name + "-" + strings.ReplaceAll(t.Name(), "/", "-"), Rules: rules}, nil)
	if err != nil {
		t.Fatalf("policy %s: %v\n%s", name, err, rules)
	}
	tok, _, err := a.admin.ACL().TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: pol.ID}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return tok.SecretID
}

func (a *aclAgent) client(t *testing.T, token string) *api.Client {
	t.Helper()
	c, err := api.NewClient(&api.Config{Address: a.agent.Addr, Token: token, Transport: &http.Transport{DialContext: a.agent.DialContext}})
	if err != nil {
		t.Fatal(err)
	}
	return c
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

// TestCheckACL: against an agent with default deny, the full policy
// passes every probe and the probes leave nothing behind (no key, no
// service, no session); a policy without one rule fails exactly that
// probe with a PermissionError naming the rule, and the others still
// pass.
func TestCheckACL(t *testing.T) {
	a := startACLAgent(t)
	const prefix = "co-acltest/"
	full := Policy(prefix)
	opts := Options{KeyPrefix: prefix, AgentRead: true, HostID: "0123456789abcdef0123456789abcdef"}
	all := []string{PermKeyWrite, PermAgentRead, PermSessionWrite, PermServiceWrite, PermNodeRead}

	t.Run("full policy", func(t *testing.T) {
		rs := Check(context.Background(), a.client(t, a.token(t, "full", full)), opts)
		var got []string
		for _, r := range rs {
			got = append(got, r.Perm)
			if r.Err != nil || r.Cleanup != nil {
				t.Errorf("%s: err %v, cleanup %v", r.Perm, r.Err, r.Cleanup)
			}
		}
		if strings.Join(got, ",") != strings.Join(all, ",") {
			t.Errorf("probes %v, want %v", got, all)
		}
		keys, _, err := a.admin.KV().Keys(prefix, "", nil)
		if err != nil || len(keys) != 0 {
			t.Errorf("keys under %s after the probes: %v (%v)", prefix, keys, err)
		}
		svcs, err := a.admin.Agent().ServicesWithFilter(fmt.Sprintf("Service == %q", ProbeServiceName))
		if err != nil || len(svcs) != 0 {
			t.Errorf("probe services left: %v (%v)", svcs, err)
		}
		sess, _, err := a.admin.Session().List(nil)
		if err != nil || len(sess) != 0 {
			t.Errorf("sessions left: %v (%v)", sess, err)
		}
	})

	for _, tc := range []struct {
		drop, perm, rule string
		optional         bool
	}{
		{drop: `key_prefix "` + prefix + `"`, perm: PermKeyWrite, rule: `key_prefix "` + prefix + `" { policy = "write" }`},
		{drop: `agent_prefix ""`, perm: PermAgentRead, rule: RuleAgentRead},
		{drop: `session_prefix ""`, perm: PermSessionWrite, rule: RuleSessionWrite},
		{drop: `service_prefix ""`, perm: PermServiceWrite, rule: RuleServiceWrite},
		{drop: `node_prefix ""`, perm: PermNodeRead, rule: RuleNodeRead, optional: true},
	} {
		t.Run("without "+tc.perm, func(t *testing.T) {
			tok := a.token(t, "no", withoutRule(t, full, tc.drop))
			rs := Check(context.Background(), a.client(t, tok), opts)
			if len(rs) != len(all) {
				t.Fatalf("%d probes ran, want %d (a refusal does not stop the others): %+v", len(rs), len(all), rs)
			}
			for _, r := range rs {
				if r.Perm != tc.perm {
					if r.Err != nil {
						t.Errorf("%s refused too: %v", r.Perm, r.Err)
					}
					continue
				}
				var pe *PermissionError
				if !errors.As(r.Err, &pe) || !Denied(r.Err) || pe.Rule != tc.rule || r.Rule != tc.rule || !strings.Contains(r.Err.Error(), tc.rule) {
					t.Errorf("%s: err %v (rule %q), want a PermissionError naming %s", r.Perm, r.Err, r.Rule, tc.rule)
				}
				if r.Optional != tc.optional {
					t.Errorf("%s: optional %v, want %v", r.Perm, r.Optional, tc.optional)
				}
				t.Logf("%s: %v", r.Perm, r.Err)
			}
		})
	}

	t.Run("read-only key rule", func(t *testing.T) {
		tok := a.token(t, "kvread", strings.Replace(full, `key_prefix "`+prefix+`" {
  policy = "write"`, `key_prefix "`+prefix+`" {
  policy = "read"`, 1))
		rs := Check(context.Background(), a.client(t, tok), Options{KeyPrefix: prefix, HostID: "x"})
		if len(rs) == 0 || rs[0].Perm != PermKeyWrite || !Denied(rs[0].Err) {
			t.Errorf("key write with a read rule: %+v", rs)
		}
	})
}

// TestCheckUnreachable: with no agent at the address, the first probe
// fails as unreachable and no other probe runs.
func TestCheckUnreachable(t *testing.T) {
	c, err := api.NewClient(&api.Config{Address: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	rs := Check(context.Background(), c, Options{KeyPrefix: "x/", AgentRead: true, HostID: "x"})
	if len(rs) != 1 || rs[0].Err == nil || Denied(rs[0].Err) || !Unreachable(rs[0].Err) {
		t.Errorf("results %+v, want one unreachable", rs)
	}
}

// TestServiceProbeUnansweredRemoved: a probe registration the agent does
// not answer in time may have been taken all the same (a slow agent under
// load): the probe removes it anyway, or the probe service stays in the
// agent and its catalog, where nothing else would remove it.
func TestServiceProbeUnansweredRemoved(t *testing.T) {
	agent, client := newFakeAgent(t, 300*time.Millisecond, 0) // taken, answered too late
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	r := serviceWrite(ctx, client, "consul-overlay-probe-h1", "h1")
	if r.Err == nil {
		t.Fatal("an unanswered probe registration reported no error")
	}
	reg, deregistered := agent.seen()
	if reg == nil {
		t.Fatal("the probe never reached the agent")
	}
	if deregistered != "consul-overlay-probe-h1" {
		t.Errorf("probe service whose registration got no answer not removed (deregistered %q): %v", deregistered, r.Err)
	}
}

// fakeAgent answers the agent's service register and deregister after
// the given delays, and records what it was sent.
type fakeAgent struct {
	mu           sync.Mutex
	reg          *api.AgentServiceRegistration
	deregistered string
}

func newFakeAgent(t *testing.T, registerDelay, deregisterDelay time.Duration) (*fakeAgent, *api.Client) {
	t.Helper()
	f := &fakeAgent{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/v1/agent/service/register":
			var reg api.AgentServiceRegistration
			_ = json.NewDecoder(r.Body).Decode(&reg)
			f.mu.Lock()
			f.reg = &reg
			f.mu.Unlock()
			time.Sleep(registerDelay)
		case strings.HasPrefix(r.URL.Path, "/v1/agent/service/deregister/"):
			time.Sleep(deregisterDelay)
			f.mu.Lock()
			f.deregistered = strings.TrimPrefix(r.URL.Path, "/v1/agent/service/deregister/")
			f.mu.Unlock()
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	client, err := api.NewClient(&api.Config{Address: strings.TrimPrefix(srv.URL, "http://")})
	if err != nil {
		t.Fatal(err)
	}
	return f, client
}

// seen is the registration received (nil: none) and the service ID
// deregistered.
func (f *fakeAgent) seen() (*api.AgentServiceRegistration, string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reg, f.deregistered
}

// TestServiceProbeRemovedAfterSlowRegistration: the registration is
// answered just before the probe's time is up, and the removal takes
// longer than what is left of it. The probe service is removed all the
// same, and it carries a check that makes the agent remove it should the
// removal fail (a doctor run on a loaded host left it registered).
func TestServiceProbeRemovedAfterSlowRegistration(t *testing.T) {
	agent, client := newFakeAgent(t, 80*time.Millisecond, 100*time.Millisecond)
	ctx, cancel := context.WithTimeout(t.Context(), 150*time.Millisecond)
	defer cancel()
	r := serviceWrite(ctx, client, "consul-overlay-probe-h1", "h1")
	if r.Err != nil || r.Cleanup != nil {
		t.Errorf("probe: error %v, cleanup %v; want neither", r.Err, r.Cleanup)
	}
	reg, deregistered := agent.seen()
	if deregistered != "consul-overlay-probe-h1" {
		t.Errorf("probe service not removed (deregistered %q)", deregistered)
	}
	if reg == nil || reg.Check == nil || reg.Check.TTL == "" || reg.Check.DeregisterCriticalServiceAfter == "" {
		t.Errorf("probe registered as %+v; want a TTL check the agent removes it after", reg)
	}
}
