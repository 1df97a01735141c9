package cluster

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"consul-overlay/kvstore"
)

// State is the whole cluster state as stored, read by ReadState.
type State struct {
	// Networks are the logical networks with a readable config, by key.
	Networks []Network
	// Endpoints are the endpoint records of each network, by key; keys
	// without a readable config are listed too (orphans).
	Endpoints map[string][]Endpoint
	// Members are the members/<host-id> records.
	Members []Host
	// Unreadable names keys whose value could not be decoded (a newer
	// schema, a corrupt value).
	Unreadable []string
}

// ReadState reads every logical network, endpoint record and members/
// record under the store's prefix. Unlike View it has no side effects:
// it removes nothing and needs no host identity, which makes it what a
// read-only status command uses.
func ReadState(ctx context.Context, store kvstore.Store) (State, error) {
	st := State{Endpoints: map[string][]Endpoint{}}
	pairs, err := store.List(ctx, "networks/")
	if err != nil {
		return State{}, fmt.Errorf("list networks: %w", err)
	}
	for _, p := range pairs {
		parts := strings.SplitN(p.Key, "/", 3)
		if len(parts) < 3 {
			continue
		}
		key := parts[1]
		switch {
		case p.Key == configKey(key):
			var rec Network
			if kvstore.Decode(p.Value, &rec) != nil {
				st.Unreadable = append(st.Unreadable, p.Key)
				continue
			}
			if rec.Key == "" {
				rec.Key = key
			}
			st.Networks = append(st.Networks, rec)
		case strings.HasPrefix(p.Key, endpointsPrefix(key)):
			var ep Endpoint
			if kvstore.Decode(p.Value, &ep) != nil {
				st.Unreadable = append(st.Unreadable, p.Key)
				continue
			}
			st.Endpoints[key] = append(st.Endpoints[key], ep)
		}
	}
	sort.Slice(st.Networks, func(i, j int) bool { return st.Networks[i].Key < st.Networks[j].Key })
	members, err := store.List(ctx, "members/")
	if err != nil {
		return State{}, fmt.Errorf("list members: %w", err)
	}
	for _, p := range members {
		var h Host
		if kvstore.Decode(p.Value, &h) != nil {
			st.Unreadable = append(st.Unreadable, p.Key)
			continue
		}
		if h.HostID == "" {
			h.HostID = strings.TrimPrefix(p.Key, "members/")
		}
		st.Members = append(st.Members, h)
	}
	return st, nil
}
