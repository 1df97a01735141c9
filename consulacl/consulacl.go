package consulacl

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/discovery"
	"consul-overlay/kvstore"
)

// PolicyHCL is the least-privilege Consul ACL policy of CONSUL_HTTP_TOKEN,
// with %s the KV prefix (KV_PREFIX). docs/security.md ("Consul ACL")
// quotes it and the plugin's TestACLLeastPrivilege runs the protocol suite
// with a token holding exactly this policy, under default deny.
const PolicyHCL = `key_prefix "%s" {
  policy = "write"
}
service_prefix "" {
  policy = "write"
}
session_prefix "" {
  policy = "write"
}
agent_prefix "" {
  policy = "read"
}
node_prefix "" {
  policy = "read"
}
`

// Policy is PolicyHCL for a KV prefix.
func Policy(prefix string) string { return fmt.Sprintf(PolicyHCL, prefix) }

// The rules a refused probe names.
const (
	RuleServiceWrite = `service_prefix "" { policy = "write" }`
	RuleSessionWrite = `session_prefix "" { policy = "write" }`
	RuleAgentRead    = `agent_prefix "" { policy = "read" }`
	RuleNodeRead     = `node_prefix "" { policy = "read" }`
)

// RuleKeyWrite is the KV rule for a prefix.
func RuleKeyWrite(prefix string) string {
	return fmt.Sprintf(`key_prefix %q { policy = "write" }`, prefix)
}

// ProbeServiceName is the service the service probe registers; a policy
// narrower than service_prefix "" must let it be written too.
const ProbeServiceName = "consul-overlay-probe"

// The permissions, as Result.Perm names them.
const (
	PermKeyWrite     = "key write"
	PermAgentRead    = "agent read"
	PermSessionWrite = "session write"
	PermServiceWrite = "service write"
	PermNodeRead     = "node read"
)

// PermissionError is a probe refused by Consul's ACLs: what was tried and
// the rule that allows it. It is a kvstore.ErrPermissionDenied.
type PermissionError struct {
	Op   string // "register services"
	Rule string // RuleServiceWrite
	Err  error
}

func (e *PermissionError) Error() string {
	return fmt.Sprintf("the Consul token cannot %s (needs %s): %v", e.Op, e.Rule, e.Err)
}

func (e *PermissionError) Unwrap() error { return kvstore.ErrPermissionDenied }

// Denied reports whether err is Consul's answer to a request its ACLs
// refuse (403, "Permission denied" or "ACL not found").
func Denied(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, kvstore.ErrPermissionDenied) {
		return true
	}
	var se api.StatusError
	if errors.As(err, &se) && se.Code == http.StatusForbidden {
		return true
	}
	// Not a bare "403": an address in a dial error may contain it.
	s := err.Error()
	return strings.Contains(s, "response code: 403") || strings.Contains(s, "Permission denied") || strings.Contains(s, "ACL not found")
}

// Unreachable reports whether err is no answer or a server-side failure
// (worth retrying), not a refusal.
func Unreachable(err error) bool {
	var se api.StatusError
	if errors.As(err, &se) {
		return se.Code >= 500 || se.Code == http.StatusTooManyRequests
	}
	return !Denied(err)
}

// ProbeTimeout bounds each probe request.
const ProbeTimeout = 5 * time.Second

// Options says which probes to run and what to name their objects.
type Options struct {
	// KeyPrefix, when not "", runs the KV write probe on the key
	// KeyPrefix + "acl-probe" (a compare-and-set that writes nothing).
	// The plugin leaves it "": claiming its host record proves it.
	KeyPrefix string
	// AgentRead runs the agent read probe (/v1/agent/self): the plugin
	// needs it only when NODE_NAME is unset.
	AgentRead bool
	// HostID names the probe session and service
	// (consul-overlay-probe-<HostID> unless ServiceID is set).
	HostID    string
	ServiceID string
	// SessionName names the probe session ("": "consul-overlay probe
	// <HostID>").
	SessionName string
}

// Result is one probe's outcome.
type Result struct {
	// Perm is the permission probed (PermKeyWrite, ...), Rule the policy
	// rule that grants it.
	Perm string
	Rule string
	// Optional: the plugin works without it, with less (node read: a
	// reaped host's services stay in the catalog).
	Optional bool
	// Err is nil when the token has the permission, a *PermissionError
	// when Consul refused it (Denied), and otherwise the failure that
	// left it unknown (Unreachable: no answer).
	Err error
	// Cleanup is a probe object that could not be removed (a session its
	// TTL ends, a service left registered), for a warning.
	Cleanup error
}

// Check runs the probes in the order key write, agent read, session
// write, service write, node read, and returns one Result per probe run.
// It goes on after a refusal, so that every missing rule is named, and
// stops after a probe that got no answer (the rest would wait as long).
func Check(ctx context.Context, client *api.Client, o Options) []Result {
	if o.ServiceID == "" {
		o.ServiceID = ProbeServiceName + "-" + o.HostID
	}
	if o.SessionName == "" {
		o.SessionName = "consul-overlay probe " + o.HostID
	}
	var probes []func(context.Context) Result
	if o.KeyPrefix != "" {
		probes = append(probes, func(ctx context.Context) Result { return keyWrite(ctx, client, o.KeyPrefix) })
	}
	if o.AgentRead {
		probes = append(probes, func(ctx context.Context) Result { return agentRead(ctx, client) })
	}
	probes = append(probes,
		func(ctx context.Context) Result { return sessionWrite(ctx, client, o.SessionName) },
		func(ctx context.Context) Result { return serviceWrite(ctx, client, o.ServiceID, o.HostID) },
		func(ctx context.Context) Result { return nodeRead(ctx, client) })
	var out []Result
	for _, p := range probes {
		pctx, cancel := context.WithTimeout(ctx, ProbeTimeout)
		r := p(pctx)
		cancel()
		out = append(out, r)
		if r.Err != nil && !Denied(r.Err) {
			break
		}
	}
	return out
}

// keyWrite asks for a compare-and-set of prefix+"acl-probe" at an index no
// key can have: Consul checks key write first (403 if refused), then
// finds the index wrong and writes nothing.
func keyWrite(ctx context.Context, client *api.Client, prefix string) Result {
	r := Result{Perm: PermKeyWrite, Rule: RuleKeyWrite(prefix)}
	key := prefix + "acl-probe"
	ok, _, err := client.KV().CAS(&api.KVPair{Key: key, ModifyIndex: math.MaxUint64}, (&api.WriteOptions{}).WithContext(ctx))
	switch {
	case Denied(err):
		r.Err = &PermissionError{Op: fmt.Sprintf("write keys under %q (KV_PREFIX)", prefix), Rule: r.Rule, Err: err}
	case err != nil:
		r.Err = fmt.Errorf("consul kv compare-and-set (probe %s): %w", key, err)
	case ok:
		// Cannot happen; if it did, the key must not stay.
		_, derr := client.KV().Delete(key, (&api.WriteOptions{}).WithContext(ctx))
		r.Cleanup = errors.Join(fmt.Errorf("the never-matching compare-and-set of probe key %s was applied", key), derr)
	}
	return r
}

func agentRead(ctx context.Context, client *api.Client) Result {
	r := Result{Perm: PermAgentRead, Rule: RuleAgentRead}
	var self map[string]any
	if _, err := client.Raw().Query("/v1/agent/self", &self, (&api.QueryOptions{}).WithContext(ctx)); err != nil {
		if Denied(err) {
			r.Err = &PermissionError{Op: "read the local agent (/v1/agent/self, for the node name; or set NODE_NAME)", Rule: r.Rule, Err: err}
		} else {
			r.Err = fmt.Errorf("consul agent self: %w", err)
		}
	}
	return r
}

func sessionWrite(ctx context.Context, client *api.Client, name string) Result {
	r := Result{Perm: PermSessionWrite, Rule: RuleSessionWrite}
	sid, _, err := client.Session().CreateNoChecks(&api.SessionEntry{
		Name: name, TTL: "10s", Behavior: api.SessionBehaviorDelete,
	}, (&api.WriteOptions{}).WithContext(ctx))
	if err != nil {
		if Denied(err) {
			r.Err = &PermissionError{Op: "create sessions (the host record is held by one)", Rule: r.Rule, Err: err}
		} else {
			r.Err = fmt.Errorf("consul session create (probe): %w", err)
		}
		return r
	}
	if _, err := client.Session().Destroy(sid, (&api.WriteOptions{}).WithContext(ctx)); err != nil {
		// Its TTL ends it anyway.
		r.Cleanup = fmt.Errorf("destroy the probe session %s (its 10s TTL ends it): %w", sid, err)
	}
	return r
}

// probeCleanupTimeout bounds the removal of a probe service whose
// registration got no answer, which runs even when the probe's own
// context has expired.
const probeCleanupTimeout = 5 * time.Second

// probeReapAfter is how long the agent keeps a probe service whose check
// is critical before it removes it (Consul's least is one minute).
const probeReapAfter = time.Minute

func serviceWrite(ctx context.Context, client *api.Client, id, hostID string) Result {
	r := Result{Perm: PermServiceWrite, Rule: RuleServiceWrite}
	reg := &api.AgentServiceRegistration{
		ID: id, Name: ProbeServiceName,
		Meta: map[string]string{discovery.MetaManagedBy: discovery.ManagedByValue, discovery.MetaHostID: hostID},
		// A backstop: should the removal below get no answer too, the
		// agent removes the probe itself once its check (a TTL nobody
		// passes) has been critical for probeReapAfter.
		Check: &api.AgentServiceCheck{
			CheckID: id + "-ttl", Name: "consul-overlay permission probe", TTL: "10s",
			DeregisterCriticalServiceAfter: probeReapAfter.String(),
		},
	}
	if err := client.Agent().ServiceRegisterOpts(reg, api.ServiceRegisterOpts{}.WithContext(ctx)); err != nil {
		if Denied(err) {
			r.Err = &PermissionError{Op: fmt.Sprintf("register services (probe service %q)", ProbeServiceName), Rule: r.Rule, Err: err}
			return r
		}
		r.Err = fmt.Errorf("consul agent service register (probe %s): %w", id, err)
		// No answer (a timeout) is not no registration: the agent may
		// have taken it, and nothing else would remove it.
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), probeCleanupTimeout)
		defer cancel()
		if err := client.Agent().ServiceDeregisterOpts(id, (&api.QueryOptions{}).WithContext(dctx)); err != nil {
			r.Cleanup = fmt.Errorf("deregister the probe service %s, which the agent may have registered: %w", id, err)
		}
		return r
	}
	// Its own time, not what the registration left of the probe's: an
	// agent slow to register is slow to deregister too, and a removal
	// cut short leaves the probe service registered.
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), probeCleanupTimeout)
	defer cancel()
	if err := client.Agent().ServiceDeregisterOpts(id, (&api.QueryOptions{}).WithContext(dctx)); err != nil {
		if Denied(err) {
			r.Err = &PermissionError{Op: fmt.Sprintf("deregister services (probe service %s, left registered)", id), Rule: r.Rule, Err: err}
		} else {
			r.Cleanup = fmt.Errorf("deregister the probe service %s: %w", id, err)
		}
	}
	return r
}

// nodeRead lists the catalog's nodes. Without node read Consul answers with
// none rather than a refusal; the agent's own node is always there for a
// token that may read it.
func nodeRead(ctx context.Context, client *api.Client) Result {
	r := Result{Perm: PermNodeRead, Rule: RuleNodeRead, Optional: true}
	nodes, _, err := client.Catalog().Nodes((&api.QueryOptions{}).WithContext(ctx))
	switch {
	case Denied(err) || err == nil && len(nodes) == 0:
		if err == nil {
			err = errors.New("the catalog lists no node")
		}
		r.Err = &PermissionError{Op: "read the catalog's nodes (the reaper lists a gone host's services there)", Rule: r.Rule, Err: err}
	case err != nil:
		r.Err = fmt.Errorf("consul catalog nodes: %w", err)
	}
	return r
}
