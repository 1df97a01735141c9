package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"consul-overlay/kvstore"
)

// blindStore answers like Consul to a token that may write but not read:
// lists filtered to nothing, or gets refused.
type blindStore struct {
	kvstore.Store
	denyGet bool
}

func (b blindStore) List(ctx context.Context, prefix string) ([]*kvstore.Pair, error) {
	return nil, nil
}

func (b blindStore) Get(ctx context.Context, key string) (*kvstore.Pair, error) {
	if b.denyGet {
		return nil, fmt.Errorf("consul kv get %q: %w: Unexpected response code: 403", key, kvstore.ErrPermissionDenied)
	}
	return b.Store.Get(ctx, key)
}

func TestClaimHostEmbedded(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	e, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: filepath.Join(t.TempDir(), "state.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rec := hostRecord{ID: "0123456789abcdef0123456789abcdef", Node: "n1", VTEP: netip.MustParseAddr("192.0.2.1"), PID: 1, Started: time.Now().UTC()}

	h, err := claimHost(ctx, e, rec, "/data", log)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.SetVTEP(ctx, netip.MustParseAddr("192.0.2.9")); err != nil {
		t.Fatal(err)
	}
	p, err := e.Get(ctx, hostsPrefix+rec.ID)
	var got hostRecord
	if err != nil || kvstore.Decode(p.Value, &got) != nil || got.VTEP != netip.MustParseAddr("192.0.2.9") || got.Node != "n1" {
		t.Fatalf("host record = %+v, %v; want node n1 with vtep 192.0.2.9", got, err)
	}
	if err := h.Release(ctx); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name string
		s    kvstore.Store
		want string
	}{
		{"list omits the record", blindStore{Store: e}, "cannot list the prefix"},
		{"get refused", blindStore{Store: e, denyGet: true}, "permission denied"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := claimHost(ctx, tc.s, rec, "/data", log)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "key_prefix") {
				t.Fatalf("claimHost = %v; want an error saying %q and naming key_prefix", err, tc.want)
			}
		})
	}
}
