package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"runtime/debug"
	"sync"
	"time"

	"consul-overlay/discovery"
	"consul-overlay/internal/hostid"
	"consul-overlay/kvstore"
)

// hostsPrefix is where host records live: hosts/<host ID>, one per host,
// held by the host's Consul session while it runs (see kvstore/doc.go).
const hostsPrefix = "hosts/"

// version is the build's version, set with -ldflags "-X main.version=…";
// else the module's version or VCS revision from the build information.
var version = ""

func buildVersion() string {
	if version != "" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			v += "+" + s.Value[:12]
		}
	}
	return v
}

// hostRecord is the value of hosts/<ID>. BootID and LockFile (device and
// inode of DATA_DIR/lock) let a restarted instance recognise a session
// left by its own previous incarnation; a copied DATA_DIR has another lock
// file, another machine another boot ID.
type hostRecord struct {
	ID   string `json:"id"`
	Node string `json:"node"`
	// AgentNode is the local Consul agent's node name, which the host's
	// services are registered under, when the agent answered at start:
	// the reaper deregisters a gone host's services there.
	AgentNode string     `json:"agent_node,omitempty"`
	VTEP      netip.Addr `json:"vtep"`
	PID       int        `json:"pid"`
	Started   time.Time  `json:"started"`
	Version   string     `json:"version"`
	BootID    string     `json:"boot_id,omitempty"`
	LockFile  string     `json:"lock_file,omitempty"`
	// SessionTTL is the TTL of the check the host's session is bound to
	// (kvstore.ClaimConfig.TTL; the name is from when the session had it).
	SessionTTL string `json:"session_ttl,omitempty"`
}

// claimer is the Consul store's claim (the embedded store has none: there
// the DATA_DIR lock is the only guard, as there is only one host).
type claimer interface {
	Claim(ctx context.Context, key string, value []byte, cfg kvstore.ClaimConfig) (*kvstore.Claim, error)
	Prefix() string
}

var _ claimer = (*kvstore.Consul)(nil)

// hostClaim is this host's record in the store, held for the life of the
// process.
type hostClaim struct {
	store kvstore.Store
	claim *kvstore.Claim // nil on the embedded store
	key   string

	mu  sync.Mutex // guards rec
	rec hostRecord
}

// claimHost writes this host's record and proves the store is readable.
// With Consul the record is claimed with a session: a live session of
// another instance holding it (a copied DATA_DIR, a cloned VM) refuses the
// start and changes nothing in the store. Then the record is read back by
// a get and by a list of the prefix: a token that cannot read the prefix would
// otherwise see an empty store and the start-up reconcile would wipe the
// host's overlays.
func claimHost(ctx context.Context, store kvstore.Store, rec hostRecord, dataDir string, log *slog.Logger) (_ *hostClaim, retErr error) {
	h := &hostClaim{store: store, key: hostsPrefix + rec.ID, rec: rec}
	c, isConsul := store.(claimer)
	if isConsul {
		h.rec.SessionTTL = kvstore.DefaultClaimTTL.String()
	}
	value, err := kvstore.Encode(h.rec)
	if err != nil {
		return nil, err
	}
	if isConsul {
		cl, err := c.Claim(ctx, h.key, value, kvstore.ClaimConfig{
			Name: "consul-overlay " + rec.Node,
			// The host's liveness check on its agent: one per host, also
			// on an agent that several hosts share. `consul catalog
			// services` lists the plugin's hosts under its name.
			ServiceID:   discovery.HostServiceID(rec.ID),
			ServiceName: discovery.HostServiceName,
			ServiceMeta: map[string]string{discovery.MetaHostID: rec.ID, discovery.MetaNode: rec.Node},
			Takeover: func(holder []byte) bool {
				var old hostRecord
				if kvstore.Decode(holder, &old) != nil {
					return false
				}
				// Same identity, same boot, same lock file: the holder was
				// this DATA_DIR's instance, and since we hold its lock, it
				// is dead (kill -9 leaves the session until its TTL).
				if old.ID == rec.ID && old.BootID != "" && old.BootID == rec.BootID && old.LockFile != "" && old.LockFile == rec.LockFile {
					log.Info("taking over the host record from this host's previous instance", "host_id", rec.ID, "old_pid", old.PID, "old_started", old.Started)
					return true
				}
				return false
			},
			OnLost: func(err error) {
				log.Error("host record lost its Consul session; claiming it again", "host_id", rec.ID, "error", err)
			},
			OnRegained: func(session string) {
				log.Info("host record claimed again", "host_id", rec.ID, "session", session)
			},
			OnCheckError: func(err error) {
				log.Warn("host record: liveness check or session not confirmed, retrying", "host_id", rec.ID, "error", err)
			},
		})
		if err != nil {
			return nil, claimError(c.Prefix(), h.key, rec, dataDir, err)
		}
		h.claim = cl
		log.Info("host record claimed", "host_id", rec.ID, "key", c.Prefix()+h.key, "session", cl.Session())
	} else if err := store.Put(ctx, h.key, value); err != nil {
		return nil, fmt.Errorf("write host record %s: %w", h.key, err)
	}
	defer func() {
		if retErr != nil && h.claim != nil {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			if err := h.claim.Release(rctx); err != nil {
				retErr = errors.Join(retErr, err)
			}
		}
	}()
	prefix := ""
	if isConsul {
		prefix = c.Prefix()
	}
	if err := proveReadable(ctx, store, prefix, h.key, value); err != nil {
		return nil, err
	}
	return h, nil
}

// claimError turns a refused claim into what the user must do.
func claimError(prefix, key string, rec hostRecord, dataDir string, err error) error {
	var held *kvstore.HeldError
	if errors.As(err, &held) {
		var other hostRecord
		who := "a host whose record cannot be read"
		if kvstore.Decode(held.Value, &other) == nil {
			who = fmt.Sprintf("node %q (vtep %s, pid %d, started %s)", other.Node, other.VTEP, other.PID, other.Started.Format(time.RFC3339))
		}
		return fmt.Errorf("host identity %s (%s) is already held by a live host, %s: this DATA_DIR is a copy of that host's (a copied directory or a cloned machine). "+
			"Remove %s on this host to make it a new host, then start again. "+
			"If it is this very host restarting on another boot, wait %s for the old session to end (its check %s goes critical when nobody passes it)",
			rec.ID, filepath.Join(dataDir, hostid.IDFile), who, filepath.Join(dataDir, hostid.IDFile), kvstore.DefaultClaimTTL+5*time.Second, discovery.HostServiceID(rec.ID))
	}
	if errors.Is(err, kvstore.ErrPermissionDenied) {
		return fmt.Errorf("claim host record %s%s: %w. The Consul token needs key_prefix %q { policy = \"write\" }, session_prefix \"\" { policy = \"write\" } and service_prefix \"\" { policy = \"write\" } (the host's liveness check, service %s)", prefix, key, err, prefix, discovery.HostServiceID(rec.ID))
	}
	return fmt.Errorf("claim host record %s%s: %w", prefix, key, err)
}

// proveReadable reads back the record just written, by a get and by a
// list of the whole prefix. prefix is the Consul KV prefix ("" for the embedded
// store) for the messages.
func proveReadable(ctx context.Context, store kvstore.Store, prefix, key string, value []byte) error {
	perm := fmt.Sprintf("the Consul token needs key_prefix %q { policy = \"write\" } (read and write of the prefix)", prefix)
	p, err := store.Get(ctx, key)
	switch {
	case errors.Is(err, kvstore.ErrPermissionDenied):
		return fmt.Errorf("read back host record %s%s: %w: %s", prefix, key, err, perm)
	case errors.Is(err, kvstore.ErrNotFound):
		return fmt.Errorf("read back host record %s%s: not found right after writing it: the token cannot read the prefix; %s", prefix, key, perm)
	case err != nil:
		return fmt.Errorf("read back host record %s%s: %w", prefix, key, err)
	case !bytes.Equal(p.Value, value):
		return fmt.Errorf("read back host record %s%s: another value than the one written (another instance with this identity?)", prefix, key)
	}
	// The whole prefix, as the driver will read it: Consul answers a list
	// the token may not read with nothing, not with an error.
	ps, err := store.List(ctx, "")
	if errors.Is(err, kvstore.ErrPermissionDenied) {
		return fmt.Errorf("list %s: %w: %s", prefix, err, perm)
	}
	if err != nil {
		return fmt.Errorf("list %s: %w", prefix, err)
	}
	for _, q := range ps {
		if q.Key == key && bytes.Equal(q.Value, value) {
			return nil
		}
	}
	return fmt.Errorf("list %s: %d keys, without this host's record %s just written: the token cannot list the prefix, and would see an empty store; %s (and \"list\" where acl_enable_key_list_policy is on)",
		prefix, len(ps), key, perm)
}

// Record returns the current host record.
func (h *hostClaim) Record() hostRecord {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.rec
}

// SetVTEP republishes the record with a new underlay address.
func (h *hostClaim) SetVTEP(ctx context.Context, a netip.Addr) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	rec := h.rec
	rec.VTEP = a
	value, err := kvstore.Encode(rec)
	if err != nil {
		return err
	}
	if h.claim != nil {
		err = h.claim.Update(ctx, value)
	} else {
		err = h.store.Put(ctx, h.key, value)
	}
	if err != nil {
		return fmt.Errorf("update host record %s with vtep %s: %w", h.key, a, err)
	}
	h.rec = rec
	return nil
}

// Release gives up the claim (the record stays, without a session: this
// host is no longer live).
func (h *hostClaim) Release(ctx context.Context) error {
	if h.claim == nil {
		return nil
	}
	return h.claim.Release(ctx)
}
