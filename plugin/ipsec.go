package main

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	cstate "consul-overlay/cluster"
	"consul-overlay/kvstore"
	"consul-overlay/vxlan"
)

// ipsecSettings reads the encryption settings:
// ENCRYPTION_KEY_ROTATION (default 12h, at least 1m) and
// ENCRYPTION_KEY_GRACE (default 30s, at least 1s; how long a new key only
// receives before it sends, and the old one receives after).
func ipsecSettings(getenv func(string) string) (cstate.KeyringConfig, error) {
	var c cstate.KeyringConfig
	for _, s := range []struct {
		name string
		min  time.Duration
		to   *time.Duration
	}{{"ENCRYPTION_KEY_ROTATION", time.Minute, &c.Rotation}, {"ENCRYPTION_KEY_GRACE", time.Second, &c.Grace}} {
		v := strings.TrimSpace(getenv(s.name))
		if v == "" {
			continue
		}
		d, err := time.ParseDuration(v)
		if err != nil || d < s.min {
			return c, fmt.Errorf("%s=%q: want a duration of at least %s, like 12h", s.name, v, s.min)
		}
		*s.to = d
	}
	rot, grace := c.Rotation, c.Grace
	if rot == 0 {
		rot = cstate.DefaultKeyRotation
	}
	if grace == 0 {
		grace = cstate.DefaultKeyGrace
	}
	if rot < 4*grace {
		return c, fmt.Errorf("ENCRYPTION_KEY_ROTATION=%s must be at least 4 times ENCRYPTION_KEY_GRACE=%s (a new key sends one grace after it is made, the old one goes two graces after that)", rot, grace)
	}
	return c, nil
}

// ipsecKeys is the subset of *vxlan.Manager the key loop programs.
type ipsecKeys interface {
	SetIPsecKeys(ctx context.Context, keys vxlan.IPsecKeys) (vxlan.Changes, error)
	EncryptedNetworks() int
}

// startIPsec runs the key ring of encrypted networks until the returned
// stop is called: it makes the first key once this host has an encrypted
// network (a plugin that never encrypts writes nothing), rotates when due (any host
// may; compare-and-set picks one), watches the ring and hands the keys
// active now to the data plane, again at each scheduled switch. Key
// material is never logged.
func startIPsec(ctx context.Context, log *slog.Logger, store kvstore.Store, dp ipsecKeys, cfg cstate.KeyringConfig) (stop func(), err error) {
	cfg.Logger = log
	kr, err := cstate.NewKeyring(cfg, store)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		runKeyring(ctx, log, kr, dp)
	}()
	return func() { cancel(); <-done }, nil
}

// runKeyring is startIPsec's loop.
func runKeyring(ctx context.Context, log *slog.Logger, kr *cstate.Keyring, dp ipsecKeys) {
	ring, err := kr.Watch(ctx, func(err error) { log.Warn("encryption key ring unreadable; keeping the keys in use", "error", err) })
	if err != nil {
		log.Error("encryption keys are not watched: encrypted networks cannot rotate or get keys; restart the plugin", "error", err)
		return
	}
	defer func() {
		for range ring {
		}
	}()
	var cur cstate.KeyRing
	have := false
	timer := time.NewTimer(0) // Ensure at once
	defer timer.Stop()
	retry := time.Second
	for {
		select {
		case <-ctx.Done():
			return
		case r, ok := <-ring:
			if !ok {
				return
			}
			cur, have = r, true
		case <-timer.C:
			if len(cur.Keys) == 0 && dp.EncryptedNetworks() == 0 {
				// No ring and nothing to encrypt: look again soon.
				timer.Reset(time.Second)
				continue
			}
			r, err := kr.Ensure(ctx)
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				log.Warn("encryption key ring not updated; retrying", "error", err, "retry_in", retry)
				timer.Reset(retry)
				retry = min(2*retry, time.Minute)
				continue
			}
			retry = time.Second
			cur, have = r, true
		}
		if !have || len(cur.Keys) == 0 {
			if len(cur.Keys) == 0 {
				timer.Stop()
				select {
				case <-timer.C:
				default:
				}
				timer.Reset(time.Second)
			}
			continue
		}
		now := time.Now()
		keys, primary, next := cur.Active(now)
		want := vxlan.IPsecKeys{Primary: primary}
		for _, k := range keys {
			want.Keys = append(want.Keys, vxlan.IPsecKey{ID: k.ID, Secret: k.Secret})
		}
		if _, err := dp.SetIPsecKeys(ctx, want); err != nil && ctx.Err() == nil {
			log.Warn("encryption keys not programmed; retried at the next change", "keys", len(want.Keys), "primary", primary, "error", err)
			if next.IsZero() || next.After(now.Add(10*time.Second)) {
				next = now.Add(10 * time.Second)
			}
		}
		// Wake at the next switch of the schedule or the next rotation.
		wake := kr.NextRotation(cur)
		if !next.IsZero() && (wake.IsZero() || next.Before(wake)) {
			wake = next
		}
		timer.Stop()
		select {
		case <-timer.C:
		default:
		}
		timer.Reset(max(time.Until(wake), 10*time.Millisecond))
	}
}
