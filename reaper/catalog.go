package reaper

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"consul-overlay/discovery"

	"github.com/hashicorp/consul/api"
)

// ConsulCatalog is Catalog on a Consul agent's API.
type ConsulCatalog struct {
	// Client talks to this host's agent.
	Client *api.Client
	// LocalNode is the node name of that agent. A service on it was
	// registered through it (an agent shared by several hosts): it is
	// removed from the agent, else the agent's anti-entropy would
	// register it again. A service on another node is removed from the
	// catalog.
	LocalNode string
}

var _ Catalog = ConsulCatalog{}

// HostServices lists node's services whose Meta host-id is hostID and
// that are consul-overlay's: managed by it (containers'), or the host's
// liveness check (discovery.HostServiceName).
func (c ConsulCatalog) HostServices(ctx context.Context, node, hostID string) ([]Service, error) {
	q := (&api.QueryOptions{
		Filter: fmt.Sprintf("Meta[%q] == %q and (Meta[%q] == %q or Service == %q)", discovery.MetaHostID, hostID,
			discovery.MetaManagedBy, discovery.ManagedByValue, discovery.HostServiceName),
	}).WithContext(ctx)
	list, _, err := c.Client.Catalog().NodeServiceList(node, q)
	if err != nil {
		return nil, fmt.Errorf("list services of node %q: %w", node, err)
	}
	if list == nil {
		return nil, nil
	}
	out := make([]Service, 0, len(list.Services))
	for _, s := range list.Services {
		// Checked again: the filter is the agent's, this is ours.
		if s.Meta[discovery.MetaHostID] != hostID {
			continue
		}
		out = append(out, Service{Node: node, ID: s.ID, Name: s.Service})
	}
	return out, nil
}

// Deregister removes one service; a missing one is success.
func (c ConsulCatalog) Deregister(ctx context.Context, s Service) error {
	if s.Node == c.LocalNode {
		err := c.Client.Agent().ServiceDeregisterOpts(s.ID, (&api.QueryOptions{}).WithContext(ctx))
		if err != nil && !isNotFound(err) {
			return fmt.Errorf("deregister service %s from agent %q: %w", s.ID, s.Node, err)
		}
		return nil
	}
	_, err := c.Client.Catalog().Deregister(&api.CatalogDeregistration{Node: s.Node, ServiceID: s.ID}, (&api.WriteOptions{}).WithContext(ctx))
	if err != nil {
		return fmt.Errorf("deregister service %s of node %q: %w", s.ID, s.Node, err)
	}
	return nil
}

func isNotFound(err error) bool {
	var se api.StatusError
	if errors.As(err, &se) && se.Code == 404 {
		return true
	}
	return strings.Contains(err.Error(), "Unknown service")
}
