package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/discovery"
	"consul-overlay/kvstore"
	"consul-overlay/reaper"
)

// aclPolicyHCL is the least-privilege Consul ACL policy of
// CONSUL_HTTP_TOKEN, with %s the KV prefix (KV_PREFIX). docs/security.md
// ("Consul ACL") quotes it and TestACLLeastPrivilege runs the protocol
// suite with a token holding exactly this policy, under default deny.
const aclPolicyHCL = `key_prefix "%s" {
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

// aclPolicy is aclPolicyHCL for a KV prefix.
func aclPolicy(prefix string) string { return fmt.Sprintf(aclPolicyHCL, prefix) }

// The rules named when a start-up probe is refused.
const (
	permServiceWrite = `service_prefix "" { policy = "write" }`
	permSessionWrite = `session_prefix "" { policy = "write" }`
	permAgentRead    = `agent_prefix "" { policy = "read" }`
	permNodeRead     = `node_prefix "" { policy = "read" }`
)

// probeServiceName is the service the start-up probe registers; a policy
// narrower than service_prefix "" must let it be written too.
const probeServiceName = "consul-overlay-probe"

// permissionError is a start-up probe refused by Consul's ACLs: what was
// tried and the rule that allows it.
type permissionError struct {
	op   string // "register services"
	rule string // permServiceWrite
	err  error
}

func (e *permissionError) Error() string {
	return fmt.Sprintf("the Consul token cannot %s (needs %s): %v", e.op, e.rule, e.err)
}

func (e *permissionError) Unwrap() error { return kvstore.ErrPermissionDenied }

// denied reports whether err is Consul's answer to a request its ACLs
// refuse (403, "Permission denied" or "ACL not found").
func denied(err error) bool {
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

// unreachable reports whether err is no answer or a server-side failure
// (worth retrying), not a refusal.
func unreachable(err error) bool {
	var se api.StatusError
	if errors.As(err, &se) {
		return se.Code >= 500 || se.Code == http.StatusTooManyRequests
	}
	return !denied(err)
}

// aclProbeTimeout bounds each probe request.
const aclProbeTimeout = 5 * time.Second

// checkConsulPermissions proves, before anything is written to the store,
// that the Consul token may do what the plugin does besides reading and
// writing its KV prefix (which claimHost proves):
//
//   - agent read (/v1/agent/self), only when NODE_NAME is unset: the node
//     name is then the agent's (a refused read would silently name the
//     host after its hostname);
//   - session write: the host record is held by a session;
//   - service write on the local agent: a probe service
//     consul-overlay-probe-<host ID> (Meta managed-by and host-id) is
//     registered and deregistered at once;
//   - node read (optional, a warning): the reaper lists a gone host's
//     services in the catalog, which hides them from a token without it.
//
// Registration is refused at start even if every network will have
// -o register=false: networks are created later, registering by default,
// and a refused registration would only show as warnings then.
// A refusal is a *permissionError naming the missing rule. While the
// agent does not answer the probes are retried (st tells callers), as
// the claim is.
func checkConsulPermissions(ctx context.Context, store kvstore.Store, nodeSet bool, hostID string, st *startStatus, log *slog.Logger) error {
	c, ok := store.(*kvstore.Consul)
	if !ok {
		return nil
	}
	for wait := 100 * time.Millisecond; ; wait = min(2*wait, claimRetryMax) {
		err := probeConsul(ctx, c.Client(), nodeSet, hostID, log)
		if err == nil || !unreachable(err) || ctx.Err() != nil {
			return err
		}
		st.set(fmt.Sprintf("waiting for the Consul agent: %v", err))
		log.Warn("consul agent unreachable while checking the token's permissions; retrying", "error", err, "retry_in", wait)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (while waiting for the Consul agent: %v)", ctx.Err(), err)
		case <-time.After(wait):
		}
	}
}

func probeConsul(ctx context.Context, client *api.Client, nodeSet bool, hostID string, log *slog.Logger) error {
	pctx, cancel := context.WithTimeout(ctx, aclProbeTimeout)
	defer cancel()
	if !nodeSet {
		var self map[string]any
		if _, err := client.Raw().Query("/v1/agent/self", &self, (&api.QueryOptions{}).WithContext(pctx)); err != nil {
			if denied(err) {
				return &permissionError{op: "read the local agent (/v1/agent/self, for the node name; or set NODE_NAME)", rule: permAgentRead, err: err}
			}
			return fmt.Errorf("consul agent self: %w", err)
		}
	}

	sid, _, err := client.Session().CreateNoChecks(&api.SessionEntry{
		Name: "consul-overlay probe " + hostID, TTL: "10s", Behavior: api.SessionBehaviorDelete,
	}, (&api.WriteOptions{}).WithContext(pctx))
	if err != nil {
		if denied(err) {
			return &permissionError{op: "create sessions (the host record is held by one)", rule: permSessionWrite, err: err}
		}
		return fmt.Errorf("consul session create (probe): %w", err)
	}
	if _, err := client.Session().Destroy(sid, (&api.WriteOptions{}).WithContext(pctx)); err != nil {
		// Its TTL ends it anyway.
		log.Warn("consul: destroy the probe session", "session", sid, "error", err)
	}

	id := probeServiceName + "-" + hostID
	reg := &api.AgentServiceRegistration{
		ID: id, Name: probeServiceName,
		Meta: map[string]string{discovery.MetaManagedBy: discovery.ManagedByValue, discovery.MetaHostID: hostID},
	}
	if err := client.Agent().ServiceRegisterOpts(reg, api.ServiceRegisterOpts{}.WithContext(pctx)); err != nil {
		if denied(err) {
			return &permissionError{op: fmt.Sprintf("register services (probe service %q)", probeServiceName), rule: permServiceWrite, err: err}
		}
		return fmt.Errorf("consul agent service register (probe %s): %w", id, err)
	}
	if err := client.Agent().ServiceDeregisterOpts(id, (&api.QueryOptions{}).WithContext(pctx)); err != nil {
		if denied(err) {
			return &permissionError{op: fmt.Sprintf("deregister services (probe service %s, left registered)", id), rule: permServiceWrite, err: err}
		}
		log.Warn("consul: deregister the probe service", "service_id", id, "error", err)
	}
	// Node read is optional: without it the catalog answers with nothing
	// (not a refusal), and the reaper finds no services of a gone host.
	nodes, _, err := client.Catalog().Nodes((&api.QueryOptions{}).WithContext(pctx))
	nodeRead := err == nil && len(nodes) > 0
	if err == nil && len(nodes) == 0 {
		log.Warn("the Consul token cannot read the catalog's nodes (needs "+permNodeRead+"): when a host is reaped its services are left in the catalog", "rule", permNodeRead)
	}
	log.Debug("consul token permissions checked", "agent_read", !nodeSet, "session_write", true, "service_write", true, "node_read", nodeRead)
	return nil
}

// tolerantCatalog is the reaper's catalog step, which a token may be
// refused: on Consul 1.21 removing another node's service from the catalog
// needs service write on its name (the policy's service_prefix "" covers
// it; a narrower service rule may not), and listing it node read. A
// refusal is logged as a warning and the step skipped, so the rest of the
// reap (its KV state) goes on; the gone host's services then stay in the
// catalog until the operator removes them.
type tolerantCatalog struct {
	reaper.Catalog
	log *slog.Logger
}

var _ reaper.Catalog = tolerantCatalog{}

// newReaperCatalog wraps the reaper's Consul catalog.
func newReaperCatalog(c reaper.Catalog, log *slog.Logger) reaper.Catalog {
	return tolerantCatalog{Catalog: c, log: log}
}

func (t tolerantCatalog) HostServices(ctx context.Context, node, hostID string) ([]reaper.Service, error) {
	s, err := t.Catalog.HostServices(ctx, node, hostID)
	if denied(err) {
		t.log.Warn(`reap: the Consul token cannot list the gone host's services (needs node_prefix "" { policy = "read" } and service read); they are left in the catalog`, "node", node, "host", hostID, "error", err)
		return nil, nil
	}
	return s, err
}

func (t tolerantCatalog) Deregister(ctx context.Context, s reaper.Service) error {
	err := t.Catalog.Deregister(ctx, s)
	if denied(err) {
		t.log.Warn(`reap: the Consul token cannot deregister the gone host's service from the catalog (needs service write on its name, as service_prefix "" { policy = "write" }); it is left there`, "node", s.Node, "service_id", s.ID, "error", err)
		return nil
	}
	return err
}
