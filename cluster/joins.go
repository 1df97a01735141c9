package cluster

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"consul-overlay/discovery"
	"consul-overlay/kvstore"
)

// Joined is what Join learned about one endpoint of this host, stored at
// joins/<host-id>/<endpoint-id>. It lives outside networks/<key>/ on
// purpose: no host watches it, so recording a join wakes no peer watch
// (the endpoint record, which every member host watches, is written once,
// at CreateEndpoint). A restarted plugin reads it back (Joins).
type Joined struct {
	NetworkKey string `json:"network_key"`
	// Sandbox is the ID Join's SandboxKey ends in.
	Sandbox string `json:"sandbox"`
	// Ports are the exposed ports Join gave, if CreateEndpoint gave none.
	Ports []discovery.Port `json:"ports,omitempty"`
}

func joinsPrefix(hostID string) string { return "joins/" + hostID + "/" }
func joinKey(hostID, id string) string { return joinsPrefix(hostID) + id }

// PutJoined records what Join learned about this host's endpoint id.
func (c *Cluster) PutJoined(ctx context.Context, id string, j Joined) error {
	if id == "" || strings.ContainsAny(id, "/ ") {
		return fmt.Errorf("record join: invalid endpoint ID %q", id)
	}
	val, err := kvstore.Encode(j)
	if err != nil {
		return err
	}
	if err := c.store.Put(ctx, joinKey(c.cfg.HostID, id), val); err != nil {
		return fmt.Errorf("record join of endpoint %s: %w", id, err)
	}
	return nil
}

// DeleteJoined removes the join record of this host's endpoint id; a
// missing one is success.
func (c *Cluster) DeleteJoined(ctx context.Context, id string) error {
	if err := c.store.Delete(ctx, joinKey(c.cfg.HostID, id)); err != nil && !errors.Is(err, kvstore.ErrNotFound) {
		return fmt.Errorf("remove join record of endpoint %s: %w", id, err)
	}
	return nil
}

// Joins lists this host's join records by endpoint ID. An unreadable
// record is skipped.
func (c *Cluster) Joins(ctx context.Context) (map[string]Joined, error) {
	return c.joinsOf(ctx, c.cfg.HostID)
}

func (c *Cluster) joinsOf(ctx context.Context, hostID string) (map[string]Joined, error) {
	prefix := joinsPrefix(hostID)
	pairs, err := c.store.List(ctx, prefix)
	if err != nil {
		return nil, fmt.Errorf("list join records of host %s: %w", hostID, err)
	}
	out := make(map[string]Joined, len(pairs))
	for _, p := range pairs {
		var j Joined
		if kvstore.Decode(p.Value, &j) != nil {
			continue
		}
		out[strings.TrimPrefix(p.Key, prefix)] = j
	}
	return out, nil
}

// deleteJoinsOf removes every join record of host hostID (an evicted one).
func (c *Cluster) deleteJoinsOf(ctx context.Context, hostID string) error {
	js, err := c.joinsOf(ctx, hostID)
	if err != nil {
		return err
	}
	var errs []error
	for id := range js {
		if err := c.store.Delete(ctx, joinKey(hostID, id)); err != nil && !errors.Is(err, kvstore.ErrNotFound) {
			errs = append(errs, fmt.Errorf("remove join record %s: %w", joinKey(hostID, id), err))
		}
	}
	return errors.Join(errs...)
}
