package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	clusterstate "consul-overlay/cluster"
	"consul-overlay/internal/hostid"
	"consul-overlay/kvstore"
)

// legacyIdentity returns the node name under which a version before host
// identities recorded this host's state, when DATA_DIR has no host-id yet
// and the store holds a membership under that name with this host's
// underlay address; "" otherwise (a new host). Those versions keyed a
// host by NODE_NAME, else by the name persisted in DATA_DIR/node-name.
// While the store is unreachable it waits, as the start does: guessing
// would make an upgraded host a stranger to its own records.
func legacyIdentity(ctx context.Context, store kvstore.Store, cfg Config, st *startStatus, log *slog.Logger) (string, error) {
	if _, err := os.Stat(filepath.Join(cfg.DataDir, hostid.IDFile)); !errors.Is(err, os.ErrNotExist) {
		return "", nil // an identity exists (or is unreadable: Load says so)
	}
	name := cfg.Node
	if name == "" {
		if b, err := os.ReadFile(filepath.Join(cfg.DataDir, "node-name")); err == nil {
			name = strings.TrimSpace(string(b))
		}
	}
	if name == "" || !hostid.ValidLegacy(name) {
		return "", nil
	}
	vtep, err := resolveVTEP(cfg)
	if err != nil {
		return "", nil // the start reports it
	}
	var state clusterstate.State
	for wait := 100 * time.Millisecond; ; wait = min(2*wait, claimRetryMax) {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		state, err = clusterstate.ReadState(rctx, store)
		cancel()
		if err == nil {
			break
		}
		if !errors.Is(err, kvstore.ErrUnavailable) || ctx.Err() != nil {
			return "", fmt.Errorf("look for this host's records from an earlier version: %w", err)
		}
		st.set(fmt.Sprintf("waiting for the state store: %v", err))
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(wait):
		}
	}
	for _, n := range state.Networks {
		if m, ok := n.Hosts[name]; ok && m.VTEP == vtep.String() {
			log.Warn("adopting the node name as this host's identity: the store holds its state from a version before host identities", "node", name, "logical", n.Key, "vtep", vtep)
			return name, nil
		}
	}
	return "", nil
}
