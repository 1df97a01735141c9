package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/consulacl"
	"consul-overlay/kvstore"
	"consul-overlay/reaper"
)

// aclPolicy is the least-privilege policy of CONSUL_HTTP_TOKEN for a KV
// prefix (consulacl.PolicyHCL, which docs/security.md quotes).
func aclPolicy(prefix string) string { return consulacl.Policy(prefix) }

// denied reports whether err is a refusal by Consul's ACLs.
func denied(err error) bool { return consulacl.Denied(err) }

// checkConsulPermissions proves, before anything is written to the store,
// that the Consul token may do what the plugin does besides reading and
// writing its KV prefix (which claimHost proves), with the probes of
// package consulacl:
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
// A refusal is a *consulacl.PermissionError naming the missing rule (the
// first one refused, and the others after it). While the agent does not
// answer the probes are retried (st tells callers), as the claim is.
func checkConsulPermissions(ctx context.Context, store kvstore.Store, nodeSet bool, hostID string, st *startStatus, log *slog.Logger) error {
	c, ok := store.(*kvstore.Consul)
	if !ok {
		return nil
	}
	for wait := 100 * time.Millisecond; ; wait = min(2*wait, claimRetryMax) {
		err := probeConsul(ctx, c.Client(), nodeSet, hostID, log)
		if err == nil || !consulacl.Unreachable(err) || ctx.Err() != nil {
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

// probeConsul runs the probes once: nil when every required permission
// is granted; the refusals (joined, the first one's rule first) or the
// failure that left one unknown otherwise.
func probeConsul(ctx context.Context, client *api.Client, nodeSet bool, hostID string, log *slog.Logger) error {
	results := consulacl.Check(ctx, client, consulacl.Options{AgentRead: !nodeSet, HostID: hostID})
	var refused []error
	granted := map[string]bool{}
	for _, r := range results {
		if r.Cleanup != nil {
			log.Warn("consul: a permission probe's object was not removed", "permission", r.Perm, "error", r.Cleanup)
		}
		switch {
		case r.Err == nil:
			granted[r.Perm] = true
		case r.Optional && denied(r.Err):
			log.Warn("the Consul token cannot read the catalog's nodes (needs "+r.Rule+"): when a host is reaped its services are left in the catalog", "rule", r.Rule)
		case r.Optional:
			log.Debug("consul: optional permission not checked", "permission", r.Perm, "error", r.Err)
		case denied(r.Err):
			refused = append(refused, r.Err)
		default:
			// No answer: the rest was not probed; retried.
			return r.Err
		}
	}
	if len(refused) == 1 {
		return refused[0]
	}
	if len(refused) > 1 {
		return errors.Join(refused...)
	}
	log.Debug("consul token permissions checked", "agent_read", granted[consulacl.PermAgentRead], "session_write", granted[consulacl.PermSessionWrite],
		"service_write", granted[consulacl.PermServiceWrite], "node_read", granted[consulacl.PermNodeRead])
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
