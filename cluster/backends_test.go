package cluster

import (
	"crypto/rand"
	"encoding/hex"
	"path/filepath"
	"testing"

	"consul-overlay/internal/testenv"
	"consul-overlay/kvstore"
)

func TestEmbedded(t *testing.T) {
	runContract(t, func(t *testing.T) openFunc {
		path := filepath.Join(t.TempDir(), "state.db")
		return func(t *testing.T) kvstore.Store {
			s, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: path, Prefix: "test/"})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			return s
		}
	})
}

func TestConsul(t *testing.T) {
	agent := testenv.StartConsul(t)
	runContract(t, func(t *testing.T) openFunc {
		b := make([]byte, 4)
		if _, err := rand.Read(b); err != nil {
			t.Fatal(err)
		}
		prefix := "cluster-" + hex.EncodeToString(b) + "/"
		return func(t *testing.T) kvstore.Store {
			s, err := kvstore.NewConsul(kvstore.ConsulConfig{Address: agent.Addr, Prefix: prefix})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			return s
		}
	})
}
