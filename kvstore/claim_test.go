package kvstore

import (
	"errors"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/testenv"
)

func rawClient(t *testing.T, agent *testenv.ConsulAgent, token string) *api.Client {
	t.Helper()
	c, err := api.NewClient(&api.Config{Address: agent.Addr, Token: token, Transport: &http.Transport{DialContext: agent.DialContext}})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestConsulClaim(t *testing.T) {
	agent := testenv.StartConsul(t)
	raw := rawClient(t, agent, "")

	t.Run("HeldByLiveSessionIsRefused", func(t *testing.T) {
		s := newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: "claim-" + randomHex(t)})
		first, err := s.Claim(bg(t), "hosts/a", []byte("first"), ClaimConfig{})
		if err != nil {
			t.Fatal(err)
		}
		defer first.Release(bg(t))
		p, err := s.Get(bg(t), "hosts/a")
		if err != nil || string(p.Value) != "first" || p.Session != first.Session() || p.Session == "" {
			t.Fatalf("Get after Claim = %+v, %v; want value first held by %s", p, err, first.Session())
		}
		sessionsBefore, _, err := raw.Session().List(nil)
		if err != nil {
			t.Fatal(err)
		}
		_, err = s.Claim(bg(t), "hosts/a", []byte("second"), ClaimConfig{})
		var held *HeldError
		if !errors.As(err, &held) || !errors.Is(err, ErrHeld) || string(held.Value) != "first" || held.Session != first.Session() {
			t.Fatalf("second Claim = %v, want a HeldError naming value first and session %s", err, first.Session())
		}
		after, err := s.Get(bg(t), "hosts/a")
		if err != nil || after.ModifyIndex != p.ModifyIndex || string(after.Value) != "first" {
			t.Fatalf("refused Claim changed the key: %+v, %v (before %+v)", after, err, p)
		}
		sessionsAfter, _, err := raw.Session().List(nil)
		if err != nil || len(sessionsAfter) != len(sessionsBefore) {
			t.Fatalf("refused Claim left a session behind: %d sessions before, %d after (%v)", len(sessionsBefore), len(sessionsAfter), err)
		}
	})

	t.Run("TakeoverOfAStaleSelf", func(t *testing.T) {
		s := newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: "claim-" + randomHex(t)})
		old, err := s.Claim(bg(t), "hosts/a", []byte("incarnation-1"), ClaimConfig{})
		if err != nil {
			t.Fatal(err)
		}
		oldID := old.Session()
		old.stop() // the process died: nobody renews, nobody releases
		<-old.done
		var asked string
		cl, err := s.Claim(bg(t), "hosts/a", []byte("incarnation-2"), ClaimConfig{Takeover: func(h []byte) bool { asked = string(h); return true }})
		if err != nil {
			t.Fatalf("Claim with Takeover: %v", err)
		}
		defer cl.Release(bg(t))
		if asked != "incarnation-1" {
			t.Fatalf("Takeover asked with %q, want the holder's value", asked)
		}
		if info, _, err := raw.Session().Info(oldID, nil); err != nil || info != nil {
			t.Fatalf("stale session %s still exists after takeover: %+v, %v", oldID, info, err)
		}
		p, _ := s.Get(bg(t), "hosts/a")
		if p == nil || p.Session != cl.Session() || string(p.Value) != "incarnation-2" {
			t.Fatalf("after takeover the key is %+v, want incarnation-2 held by %s", p, cl.Session())
		}
	})

	t.Run("ReleaseKeepsTheRecordWithoutSession", func(t *testing.T) {
		s := newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: "claim-" + randomHex(t)})
		cl, err := s.Claim(bg(t), "hosts/a", []byte("v1"), ClaimConfig{})
		if err != nil {
			t.Fatal(err)
		}
		if err := cl.Update(bg(t), []byte("v2")); err != nil {
			t.Fatal(err)
		}
		id := cl.Session()
		if err := cl.Release(bg(t)); err != nil {
			t.Fatal(err)
		}
		if err := cl.Release(bg(t)); err != nil {
			t.Fatalf("second Release: %v", err)
		}
		p, err := s.Get(bg(t), "hosts/a")
		if err != nil || p.Session != "" || string(p.Value) != "v2" {
			t.Fatalf("after Release: %+v, %v; want value v2 and no session", p, err)
		}
		if info, _, err := raw.Session().Info(id, nil); err != nil || info != nil {
			t.Fatalf("session %s not destroyed by Release: %+v, %v", id, info, err)
		}
		if svc, _, err := raw.Agent().Service(cl.cfg.ServiceID, nil); err == nil || svc != nil {
			t.Fatalf("the claim's service %s still on the agent after Release: %+v, %v", cl.cfg.ServiceID, svc, err)
		}
		// A released key is free for the next holder at once.
		cl2, err := s.Claim(bg(t), "hosts/a", []byte("v3"), ClaimConfig{})
		if err != nil {
			t.Fatalf("Claim after Release: %v", err)
		}
		cl2.Release(bg(t))
	})

	t.Run("LostSessionIsReacquired", func(t *testing.T) {
		s := newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: "claim-" + randomHex(t)})
		var lost, regained atomic.Int32
		regainedc := make(chan string, 4)
		cl, err := s.Claim(bg(t), "hosts/a", []byte("v"), ClaimConfig{
			TTL:        10 * time.Second, // passed every 1.7 s
			OnLost:     func(error) { lost.Add(1) },
			OnRegained: func(id string) { regained.Add(1); regainedc <- id },
		})
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Release(bg(t))
		first := cl.Session()
		start := time.Now()
		if _, err := raw.Session().Destroy(first, nil); err != nil {
			t.Fatal(err)
		}
		select {
		case id := <-regainedc:
			if id == first || id == "" {
				t.Fatalf("regained with session %q, want a new one", id)
			}
			t.Logf("claim re-acquired %s after its session was destroyed", time.Since(start).Round(time.Millisecond))
		case <-time.After(10 * time.Second):
			t.Fatal("claim not re-acquired within 10s of its session being destroyed")
		}
		p, err := s.Get(bg(t), "hosts/a")
		if err != nil || p.Session != cl.Session() || lost.Load() != 1 {
			t.Fatalf("after re-acquire: %+v, %v, lost called %d times", p, err, lost.Load())
		}
		// The key deleted under a live session: re-acquired as well.
		if err := s.Delete(bg(t), "hosts/a"); err != nil {
			t.Fatal(err)
		}
		select {
		case <-regainedc:
		case <-time.After(10 * time.Second):
			t.Fatal("claim not re-acquired within 10s of its key being deleted")
		}
		if p, err := s.Get(bg(t), "hosts/a"); err != nil || p.Session != cl.Session() || string(p.Value) != "v" {
			t.Fatalf("after the key was deleted: %+v, %v", p, err)
		}
	})

	// An Update while the claim is being re-acquired (its session lost)
	// only keeps the value; the re-acquire had read the old one. The
	// value updated is what the key holds once re-acquired.
	t.Run("UpdateDuringReacquireKept", func(t *testing.T) {
		s := newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: "claim-" + randomHex(t)})
		regainedc := make(chan string, 4)
		cl, err := s.Claim(bg(t), "hosts/a", []byte("v1"), ClaimConfig{
			TTL:        10 * time.Second,
			OnRegained: func(id string) { regainedc <- id },
		})
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Release(bg(t))
		var once sync.Once
		cl.mu.Lock()
		cl.beforeWrite = func() {
			once.Do(func() {
				if err := cl.Update(bg(t), []byte("v2")); err != nil {
					t.Errorf("update while lost: %v", err)
				}
			})
		}
		cl.mu.Unlock()
		if _, err := raw.Session().Destroy(cl.Session(), nil); err != nil {
			t.Fatal(err)
		}
		select {
		case <-regainedc:
		case <-time.After(10 * time.Second):
			t.Fatal("claim not re-acquired within 10s of its session being destroyed")
		}
		if p, err := s.Get(bg(t), "hosts/a"); err != nil || string(p.Value) != "v2" || p.Session != cl.Session() {
			t.Fatalf("after the re-acquire the key holds %q (session %q, %v), want the updated v2 under %q", p.Value, p.Session, err, cl.Session())
		}
	})

	// A renewal does not read the key; the watch of the key is what
	// notices a key released or taken under a live session, and at once
	// rather than at the next renewal.
	t.Run("ReleasedUnderLiveSessionIsReacquired", func(t *testing.T) {
		s := newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: "claim-" + randomHex(t)})
		lostc := make(chan error, 4)
		regainedc := make(chan string, 4)
		cl, err := s.Claim(bg(t), "hosts/a", []byte("v"), ClaimConfig{
			OnLost:     func(err error) { lostc <- err },
			OnRegained: func(id string) { regainedc <- id },
		})
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Release(bg(t))
		first := cl.Session()
		start := time.Now()
		// Released by its own session ID from elsewhere: the session lives
		// on, so no renewal would ever notice.
		if ok, _, err := raw.KV().Release(&api.KVPair{Key: s.Prefix() + "hosts/a", Value: []byte("v"), Session: first}, nil); err != nil || !ok {
			t.Fatalf("release under the claim: %v, %v", ok, err)
		}
		select {
		case err := <-lostc:
			if !strings.Contains(err.Error(), "no longer held") {
				t.Fatalf("OnLost(%v), want the key no longer held", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("claim did not notice within 10s that its key was released")
		}
		select {
		case id := <-regainedc:
			t.Logf("claim noticed the release and re-acquired in %s", time.Since(start).Round(time.Millisecond))
			if id == first {
				t.Fatalf("regained with the old session %s", id)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("claim not re-acquired within 10s of its key being released")
		}
		if p, err := s.Get(bg(t), "hosts/a"); err != nil || p.Session != cl.Session() {
			t.Fatalf("after re-acquire: %+v, %v", p, err)
		}
	})

	// Another instance that takes the key over destroys the session: the
	// holder it took it from notices, and gets it back only once the
	// other lets go.
	t.Run("TakenOverNotices", func(t *testing.T) {
		s := newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: "claim-" + randomHex(t)})
		lostc := make(chan error, 4)
		regainedc := make(chan string, 4)
		var checkErrs atomic.Int32
		old, err := s.Claim(bg(t), "hosts/a", []byte("old"), ClaimConfig{
			OnLost:       func(err error) { lostc <- err },
			OnRegained:   func(id string) { regainedc <- id },
			OnCheckError: func(error) { checkErrs.Add(1) },
		})
		if err != nil {
			t.Fatal(err)
		}
		defer old.Release(bg(t))
		taker, err := s.Claim(bg(t), "hosts/a", []byte("new"), ClaimConfig{Takeover: func([]byte) bool { return true }})
		if err != nil {
			t.Fatal(err)
		}
		select {
		case <-lostc:
		case <-time.After(10 * time.Second):
			t.Fatal("the claim taken over did not notice within 10s")
		}
		if old.Session() != "" {
			// It may already be trying again, refused: never holding.
			if p, _ := s.Get(bg(t), "hosts/a"); p == nil || p.Session != taker.Session() {
				t.Fatalf("key %+v, want it held by the taker %s", p, taker.Session())
			}
		}
		time.Sleep(time.Second)
		if p, err := s.Get(bg(t), "hosts/a"); err != nil || p.Session != taker.Session() || string(p.Value) != "new" {
			t.Fatalf("taken-over key: %+v, %v; want value new held by %s", p, err, taker.Session())
		}
		if checkErrs.Load() == 0 {
			t.Fatal("the refused re-acquire was not reported through OnCheckError")
		}
		if err := taker.Release(bg(t)); err != nil {
			t.Fatal(err)
		}
		select {
		case <-regainedc:
		case <-time.After(10 * time.Second):
			t.Fatal("claim not re-acquired within 10s of the taker's release")
		}
		if p, err := s.Get(bg(t), "hosts/a"); err != nil || p.Session != old.Session() {
			t.Fatalf("after the taker's release: %+v, %v", p, err)
		}
	})

	// The session has no TTL to renew at the servers: it is bound to the
	// agent's serfHealth and to the claim's TTL check, which the holder
	// passes at its agent.
	t.Run("SessionBoundToTheAgentCheck", func(t *testing.T) {
		s := newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: "claim-" + randomHex(t)})
		cl, err := s.Claim(bg(t), "hosts/a", []byte("v"), ClaimConfig{TTL: 10 * time.Second, ServiceID: "claim-test-" + randomHex(t), ServiceMeta: map[string]string{"host-id": "a"}})
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Release(bg(t))
		info, _, err := raw.Session().Info(cl.Session(), nil)
		if err != nil || info == nil {
			t.Fatalf("session %s: %+v, %v", cl.Session(), info, err)
		}
		if info.TTL != "" || !slices.Equal(info.NodeChecks, []string{"serfHealth"}) || len(info.ServiceChecks) != 1 || info.ServiceChecks[0].ID != cl.cfg.ServiceID {
			t.Fatalf("session %+v: want no TTL, node check serfHealth and service check %s", info, cl.cfg.ServiceID)
		}
		svc, _, err := raw.Agent().Service(cl.cfg.ServiceID, nil)
		if err != nil || svc.Service != "consul-overlay" || svc.Meta["host-id"] != "a" {
			t.Fatalf("the claim's agent service: %+v, %v; want service consul-overlay with its meta", svc, err)
		}
		// Held past the check's TTL, across several passes (every 1.7 s),
		// without a renewal.
		time.Sleep(12 * time.Second)
		checks, err := raw.Agent().Checks()
		if err != nil || checks[cl.cfg.ServiceID] == nil || checks[cl.cfg.ServiceID].Status != api.HealthPassing {
			t.Fatalf("the claim's check after 12 s: %+v, %v; want passing", checks[cl.cfg.ServiceID], err)
		}
		if p, err := s.Get(bg(t), "hosts/a"); err != nil || p.Session != info.ID || cl.Session() != info.ID {
			t.Fatalf("after 12 s the key is %+v (%v), the claim's session %s; want both %s", p, err, cl.Session(), info.ID)
		}
	})

	// A holder killed (nobody passes its check, nobody releases) loses the
	// key once the check goes critical; the next holder registers the
	// same check again and takes the key without a takeover.
	t.Run("HolderThatStopsPassingLosesTheKey", func(t *testing.T) {
		s := newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: "claim-" + randomHex(t)})
		const ttl = 10 * time.Second
		old, err := s.Claim(bg(t), "hosts/a", []byte("old"), ClaimConfig{TTL: ttl})
		if err != nil {
			t.Fatal(err)
		}
		oldID := old.Session()
		old.stop()
		<-old.done
		stopped := time.Now()
		for {
			p, err := s.Get(bg(t), "hosts/a")
			if err != nil {
				t.Fatal(err)
			}
			if p.Session == "" {
				t.Logf("key released %s after its holder stopped passing (TTL %s)", time.Since(stopped).Round(100*time.Millisecond), ttl)
				break
			}
			if time.Since(stopped) > ttl+10*time.Second {
				t.Fatalf("key still held by %s %s after its holder stopped passing", p.Session, time.Since(stopped).Round(time.Second))
			}
			time.Sleep(200 * time.Millisecond)
		}
		if info, _, err := raw.Session().Info(oldID, nil); err != nil || info != nil {
			t.Fatalf("the stopped holder's session %s: %+v, %v; want it ended", oldID, info, err)
		}
		cl, err := s.Claim(bg(t), "hosts/a", []byte("new"), ClaimConfig{})
		if err != nil {
			t.Fatalf("Claim after the holder died: %v", err)
		}
		defer cl.Release(bg(t))
		if p, err := s.Get(bg(t), "hosts/a"); err != nil || p.Session != cl.Session() || string(p.Value) != "new" {
			t.Fatalf("after the new claim: %+v, %v", p, err)
		}
	})

	// An agent that forgets the check (restarted without its state, or a
	// deregistration) ends the session: the claim registers the check
	// again and takes the key back.
	t.Run("CheckDeregisteredIsReacquired", func(t *testing.T) {
		s := newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: "claim-" + randomHex(t)})
		regainedc := make(chan string, 4)
		cl, err := s.Claim(bg(t), "hosts/a", []byte("v"), ClaimConfig{OnRegained: func(id string) { regainedc <- id }})
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Release(bg(t))
		first := cl.Session()
		if err := raw.Agent().ServiceDeregister(cl.cfg.ServiceID); err != nil {
			t.Fatal(err)
		}
		select {
		case id := <-regainedc:
			if id == first {
				t.Fatalf("regained with the old session %s", id)
			}
		case <-time.After(15 * time.Second):
			t.Fatal("claim not re-acquired within 15s of its check being deregistered")
		}
		if svc, _, err := raw.Agent().Service(cl.cfg.ServiceID, nil); err != nil || svc == nil {
			t.Fatalf("the claim's service not registered again: %+v, %v", svc, err)
		}
		if p, err := s.Get(bg(t), "hosts/a"); err != nil || p.Session != cl.Session() {
			t.Fatalf("after re-acquire: %+v, %v", p, err)
		}
	})

	t.Run("BadTTL", func(t *testing.T) {
		s := newConsul(t, ConsulConfig{Address: agent.Addr})
		if _, err := s.Claim(bg(t), "hosts/a", nil, ClaimConfig{TTL: 5 * time.Second}); err == nil {
			t.Fatal("Claim with a 5s TTL succeeded; Consul's minimum is 10s")
		}
	})
}

// TestConsulPermissionDenied runs an agent with ACLs: a token whose policy
// denies the prefix gets ErrPermissionDenied from every call, never an
// empty answer or an outage.
func TestConsulPermissionDenied(t *testing.T) {
	const root = "11111111-2222-3333-4444-555555555555"
	agent := testenv.StartConsul(t, testenv.WithArgs("-hcl",
		`acl { enabled = true  default_policy = "allow"  tokens { initial_management = "`+root+`" } }`))
	admin := rawClient(t, agent, root)
	prefix := "denied-" + randomHex(t) + "/"
	pol, _, err := admin.ACL().PolicyCreate(&api.ACLPolicy{
		Name:  "deny-" + randomHex(t),
		Rules: `key_prefix "` + prefix + `" { policy = "deny" }  session_prefix "" { policy = "deny" }`,
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, _, err := admin.ACL().TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: pol.ID}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: prefix, Token: tok.SecretID})
	for name, call := range storeCalls(s) {
		if name == "List" {
			continue // Consul filters a list by read permission: see below
		}
		if err := call(bg(t)); !errors.Is(err, ErrPermissionDenied) || errors.Is(err, ErrUnavailable) || errors.Is(err, ErrNotFound) {
			t.Errorf("%s with a denied token = %v, want ErrPermissionDenied only", name, err)
		}
	}
	// What makes a token that cannot read dangerous: a list is an empty
	// answer, not an error. Callers must prove they can read.
	if _, err := admin.KV().Put(&api.KVPair{Key: prefix + "k", Value: []byte("v")}, nil); err != nil {
		t.Fatal(err)
	}
	if ps, err := s.List(bg(t), ""); err != nil || len(ps) != 0 {
		t.Fatalf("List with a denied token = %d pairs, %v; Consul was expected to filter silently", len(ps), err)
	}
	_, err = s.Claim(bg(t), "hosts/a", []byte("v"), ClaimConfig{})
	if !errors.Is(err, ErrPermissionDenied) || !strings.Contains(err.Error(), "session create") {
		t.Fatalf("Claim with a token without session write = %v, want ErrPermissionDenied at session create", err)
	}
}
