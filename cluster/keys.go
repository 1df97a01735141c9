package cluster

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"consul-overlay/kvstore"
)

// The key ring of encrypted networks. One record under the store's prefix,
//
//	ipsec/keys   KeyRing: the keys, each with its creation time, the time
//	             from which it sends, and the time it is dropped
//
// holds every key the hosts install. A rotation is one compare-and-set
// write that adds a key whose SendFrom lies Grace in the future and gives
// every older key an Until of 2×Grace in the future. Every host then
// computes the same schedule from the record and its clock (Active):
//
//  1. at once: every host installs the new key for receive;
//  2. from SendFrom: every host sends with it (the old key still receives
//     what was sent just before);
//  3. from Until: the old key is dropped.
//
// So no packet is ever sent with a key its receiver has not installed, as
// long as each host sees the record within Grace of its write and the
// hosts' clocks agree within Grace. The record is readable by every token
// that can read the prefix (the hosts need it); it is never logged, and the
// status output does not show it.

// KeysKey is the key ring's key under the store's prefix.
const KeysKey = "ipsec/keys"

// Defaults of KeyringConfig.
const (
	DefaultKeyRotation = 12 * time.Hour
	DefaultKeyGrace    = 30 * time.Second
	keySecretLen       = 32
)

// EncKey is one encryption key of the ring.
type EncKey struct {
	ID       uint32    `json:"id"`
	Secret   []byte    `json:"secret"`
	Created  time.Time `json:"created"`
	SendFrom time.Time `json:"send_from"`
	Until    time.Time `json:"until,omitzero"`
}

// String and LogValue name the key without its secret, so a key that ends
// up in a message or a log line leaks nothing.
func (k EncKey) String() string { return fmt.Sprintf("key %d", k.ID) }

// LogValue implements slog.LogValuer.
func (k EncKey) LogValue() slog.Value {
	return slog.GroupValue(slog.Any("id", k.ID), slog.Time("created", k.Created))
}

// KeyRing is the record at KeysKey.
type KeyRing struct {
	Keys []EncKey `json:"keys"`
}

// Active returns the keys to install at now (those not yet past Until),
// the ID of the one that sends (the latest SendFrom not after now; 0 if
// none), and the next time the answer changes (zero: never).
func (r KeyRing) Active(now time.Time) (keys []EncKey, primary uint32, next time.Time) {
	var best time.Time
	soonest := func(t time.Time) {
		if t.After(now) && (next.IsZero() || t.Before(next)) {
			next = t
		}
	}
	for _, k := range r.Keys {
		if !k.Until.IsZero() && !now.Before(k.Until) {
			continue
		}
		keys = append(keys, k)
		soonest(k.Until)
		soonest(k.SendFrom)
		if !k.SendFrom.After(now) && (primary == 0 || k.SendFrom.After(best)) {
			primary, best = k.ID, k.SendFrom
		}
	}
	return keys, primary, next
}

// newest is the key created last (nil: none).
func (r KeyRing) newest() *EncKey {
	var n *EncKey
	for i := range r.Keys {
		if n == nil || r.Keys[i].Created.After(n.Created) {
			n = &r.Keys[i]
		}
	}
	return n
}

// KeyringConfig configures a Keyring. Zero values take the defaults.
type KeyringConfig struct {
	// Rotation is how often a new key is made (0: DefaultKeyRotation).
	Rotation time.Duration
	// Grace is how long a new key receives before it sends, and an old
	// key receives after the switch (0: DefaultKeyGrace). It must exceed
	// the store's watch delay plus the hosts' clock skew.
	Grace time.Duration
	// Now is the clock (nil: time.Now).
	Now func() time.Time
	// Logger gets an info line per rotation, with key IDs only (nil:
	// discard).
	Logger *slog.Logger
}

// Keyring makes, rotates and watches the key ring in the store. Every host
// runs one; compare-and-set makes one of them win each rotation.
type Keyring struct {
	cfg   KeyringConfig
	log   *slog.Logger
	store kvstore.Store
}

// NewKeyring returns a Keyring on store.
func NewKeyring(cfg KeyringConfig, store kvstore.Store) (*Keyring, error) {
	if store == nil {
		return nil, errors.New("keyring: store is required")
	}
	if cfg.Rotation <= 0 {
		cfg.Rotation = DefaultKeyRotation
	}
	if cfg.Grace <= 0 {
		cfg.Grace = DefaultKeyGrace
	}
	if cfg.Rotation < 4*cfg.Grace {
		return nil, fmt.Errorf("keyring: rotation %s must be at least 4 times the grace %s (a key sends from grace after its creation and the old one goes 2×grace after)", cfg.Rotation, cfg.Grace)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Keyring{cfg: cfg, log: cfg.Logger, store: store}, nil
}

// Config is the keyring's configuration with its defaults applied.
func (k *Keyring) Config() KeyringConfig { return k.cfg }

// read returns the ring and its index (0: absent).
func (k *Keyring) read(ctx context.Context) (KeyRing, uint64, error) {
	p, err := k.store.Get(ctx, KeysKey)
	if errors.Is(err, kvstore.ErrNotFound) {
		return KeyRing{}, 0, nil
	}
	if err != nil {
		return KeyRing{}, 0, fmt.Errorf("read key ring: %w", err)
	}
	var r KeyRing
	if err := kvstore.Decode(p.Value, &r); err != nil {
		return KeyRing{}, 0, fmt.Errorf("read key ring %s: %w", KeysKey, err)
	}
	return r, p.ModifyIndex, nil
}

func newKey(now, sendFrom time.Time, taken func(uint32) bool) (EncKey, error) {
	k := EncKey{Secret: make([]byte, keySecretLen), Created: now, SendFrom: sendFrom}
	if _, err := rand.Read(k.Secret); err != nil {
		return EncKey{}, fmt.Errorf("generate key: %w", err)
	}
	var b [4]byte
	for k.ID == 0 || taken(k.ID) {
		if _, err := rand.Read(b[:]); err != nil {
			return EncKey{}, fmt.Errorf("generate key id: %w", err)
		}
		k.ID = binary.BigEndian.Uint32(b[:])
	}
	return k, nil
}

// Ensure makes the ring exist and be current: a first key if there is
// none, a rotation if the newest key is older than Rotation, and keys past
// their Until dropped. It returns the ring as stored.
func (k *Keyring) Ensure(ctx context.Context) (KeyRing, error) {
	return k.update(ctx, false)
}

// Rotate adds a new key now, whatever the age of the newest.
func (k *Keyring) Rotate(ctx context.Context) (KeyRing, error) {
	return k.update(ctx, true)
}

func (k *Keyring) update(ctx context.Context, force bool) (KeyRing, error) {
	for attempt := 0; attempt < maxCASAttempts; attempt++ {
		if err := ctx.Err(); err != nil {
			return KeyRing{}, err
		}
		r, index, err := k.read(ctx)
		if err != nil {
			return KeyRing{}, err
		}
		now := k.cfg.Now().UTC()
		taken := func(id uint32) bool {
			for _, x := range r.Keys {
				if x.ID == id {
					return true
				}
			}
			return false
		}
		changed := false
		next := KeyRing{}
		for _, x := range r.Keys {
			if !x.Until.IsZero() && !now.Before(x.Until) {
				changed = true
				continue
			}
			next.Keys = append(next.Keys, x)
		}
		newest := next.newest()
		switch {
		case newest == nil:
			// The first key sends at once: no host has sent before it.
			nk, err := newKey(now, now, taken)
			if err != nil {
				return KeyRing{}, err
			}
			next.Keys = append(next.Keys, nk)
			changed = true
			k.log.Info("encryption key created", "key_id", nk.ID)
		case force || now.Sub(newest.Created) >= k.cfg.Rotation:
			nk, err := newKey(now, now.Add(k.cfg.Grace), taken)
			if err != nil {
				return KeyRing{}, err
			}
			for i := range next.Keys {
				if next.Keys[i].Until.IsZero() {
					next.Keys[i].Until = now.Add(2 * k.cfg.Grace)
				}
			}
			next.Keys = append(next.Keys, nk)
			changed = true
			k.log.Info("encryption key rotated", "key_id", nk.ID, "sends_from", nk.SendFrom, "previous_until", now.Add(2*k.cfg.Grace))
		}
		if !changed {
			return r, nil
		}
		b, err := kvstore.Encode(next)
		if err != nil {
			return KeyRing{}, err
		}
		err = k.store.CAS(ctx, KeysKey, b, index)
		if errors.Is(err, kvstore.ErrConflict) {
			continue // another host rotated: look again
		}
		if err != nil {
			return KeyRing{}, fmt.Errorf("write key ring %s: %w", KeysKey, err)
		}
		return next, nil
	}
	return KeyRing{}, fmt.Errorf("write key ring %s: %w after %d attempts", KeysKey, kvstore.ErrConflict, maxCASAttempts)
}

// NextRotation is when Ensure will next rotate r (zero: r is empty, now).
func (k *Keyring) NextRotation(r KeyRing) time.Time {
	n := r.newest()
	if n == nil {
		return time.Time{}
	}
	return n.Created.Add(k.cfg.Rotation)
}

// Watch delivers the ring at start and after every change, until ctx
// ends. A record that does not decode is skipped (and reported on errs,
// if not nil).
func (k *Keyring) Watch(ctx context.Context, errs func(error)) (<-chan KeyRing, error) {
	in, err := k.store.Watch(ctx, "ipsec/")
	if err != nil {
		return nil, fmt.Errorf("watch key ring: %w", err)
	}
	out := make(chan KeyRing)
	go func() {
		defer close(out)
		for pairs := range in {
			r := KeyRing{}
			ok := true
			for _, p := range pairs {
				if p.Key != KeysKey {
					continue
				}
				if err := kvstore.Decode(p.Value, &r); err != nil {
					ok = false
					if errs != nil {
						errs(fmt.Errorf("key ring %s: %w", KeysKey, err))
					}
				}
			}
			if !ok {
				continue
			}
			select {
			case out <- r:
			case <-ctx.Done():
				for range in {
				}
				return
			}
		}
	}()
	return out, nil
}
