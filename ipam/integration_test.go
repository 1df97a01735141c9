package ipam

import (
	"crypto/rand"
	"encoding/hex"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"consul-overlay/internal/testenv"
	"consul-overlay/kvstore"
)

func init() {
	backends = append(backends,
		backend{name: "embedded", start: startEmbedded},
		backend{name: "consul", start: startConsul},
	)
}

// startEmbedded gives each scenario its own bbolt file; every simulated host
// opens it (stores on one path in one process share the file).
func startEmbedded(*testing.T) func(*testing.T) func() kvstore.Store {
	return func(t *testing.T) func() kvstore.Store {
		path := filepath.Join(t.TempDir(), "kv.db")
		return func() kvstore.Store {
			s, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: path, Prefix: "test"})
			if err != nil {
				t.Fatalf("open embedded store: %v", err)
			}
			t.Cleanup(func() { s.Close() })
			return s
		}
	}
}

// startConsul starts one dev agent for all scenarios; each scenario gets its
// own key prefix and each simulated host its own client.
func startConsul(t *testing.T) func(*testing.T) func() kvstore.Store {
	agent := testenv.StartConsul(t)
	return func(t *testing.T) func() kvstore.Store {
		prefix := "ipam-test/" + randomID()
		return func() kvstore.Store { return consulClient(t, agent.Addr, prefix) }
	}
}

func consulClient(t testing.TB, addr, prefix string) kvstore.Store {
	s, err := kvstore.NewConsul(kvstore.ConsulConfig{Address: addr, Prefix: prefix, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatalf("consul client: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

var idMu sync.Mutex

func randomID() string {
	idMu.Lock()
	defer idMu.Unlock()
	b := make([]byte, 6)
	rand.Read(b)
	return hex.EncodeToString(b)
}
