package netsync

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"consul-overlay/cluster"
	"consul-overlay/internal/testenv"
	"consul-overlay/kvstore"
)

// flakySpecs fails writes of specs/ while fail is set (a Consul leader
// election, a timeout), and passes everything else through.
type flakySpecs struct {
	kvstore.Store
	fail atomic.Bool
}

var errNoLeader = errors.New("Unexpected response code: 500 (rpc error making call: No cluster leader)")

func (f *flakySpecs) CAS(ctx context.Context, key string, value []byte, index uint64) error {
	if f.fail.Load() && strings.HasPrefix(key, cluster.SpecsPrefix) {
		return errNoLeader
	}
	return f.Store.CAS(ctx, key, value, index)
}

// TestRetireRetried: a user's `docker network rm web` on host b succeeds
// but retiring the spec fails (a store error at that moment, here a
// leader election). The syncer tries again at each pass, so once the
// store answers the network is retired on every host; it never tried
// again, and the hosts disagreed for good (and b's next start would have
// created it again, undoing the user's rm).
func TestRetireRetried(t *testing.T) {
	agent := testenv.StartConsul(t)
	c := &cl{t: t, addr: agent.Addr, prefix: "netsync-retire/"}
	a := c.host("a", "co")
	b, flaky := removedWhileStoreRefuses(t, c, a, "10.99.50.0/24", "")
	flaky.fail.Store(false)

	// The store answers again: the next passes retire it, and every
	// host removes it.
	testenv.Eventually(t, 15*time.Second, func() error {
		if _, ok := a.engine.get("web"); ok {
			return fmt.Errorf("host a still has web after the user removed it on host b")
		}
		sp, err := cluster.GetSpec(context.Background(), a.store, "web")
		if err == nil && !sp.Spec.Retired {
			return fmt.Errorf("the spec of web is still live")
		}
		return nil
	})
	if _, ok := b.engine.get("web"); ok {
		t.Error("host b has web again after the user removed it there")
	}
}

// TestRetireRetriedAfterRestart: as TestRetireRetried, but host b's plugin
// is killed while the store still refuses the retirement, and starts again
// once it answers. The removal is on disk (Config.RetireFile): the new
// syncer retires the network instead of creating it again from its live
// spec, which undid the user's rm on b and kept it on every other host.
func TestRetireRetriedAfterRestart(t *testing.T) {
	agent := testenv.StartConsul(t)
	c := &cl{t: t, addr: agent.Addr, prefix: "netsync-retire-restart/"}
	a := c.host("a", "co")
	file := filepath.Join(t.TempDir(), "netsync-retiring.json")
	b, flaky := removedWhileStoreRefuses(t, c, a, "10.99.51.0/24", file)
	b.stop() // the plugin killed
	flaky.fail.Store(false)
	b2 := &host{name: "b", store: flaky, engine: b.engine, logs: &syncBuf{}, retireFile: file}
	b2.start(t)

	testenv.Eventually(t, 15*time.Second, func() error {
		if _, ok := a.engine.get("web"); ok {
			return fmt.Errorf("host a still has web after the user removed it on host b")
		}
		return nil
	})
	time.Sleep(1500 * time.Millisecond)
	if _, ok := b2.engine.get("web"); ok {
		t.Error("host b has web again after the user removed it there: its restart created it from the live spec")
	}
	if _, err := os.Stat(file); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the retire file is left after the store took the retirement: %v", err)
	}
}

// removedWhileStoreRefuses starts host b, whose store refuses spec writes
// on demand (retireFile: its Config.RetireFile), lets host a create
// network web (subnet) and b take it, then has a user remove web on b
// while the store refuses the retirement, and waits for b to log that.
func removedWhileStoreRefuses(t *testing.T, c *cl, a *host, subnet, retireFile string) (*host, *flakySpecs) {
	t.Helper()
	real := c.open()
	flaky := &flakySpecs{Store: real}
	clu, err := cluster.New(cluster.Config{HostID: "id-b", Node: "b", VTEP: netip.MustParseAddr("192.0.2.200")}, real)
	if err != nil {
		t.Fatal(err)
	}
	b := &host{name: "b", store: flaky, engine: newFakeEngine("co", clu), logs: &syncBuf{}, retireFile: retireFile}
	b.start(t)

	a.userCreate(t, "web", subnet, nil, nil)
	testenv.Eventually(t, 3*time.Second, func() error { return has(b, "web", "") })
	time.Sleep(1500 * time.Millisecond) // b matched it in a pass

	flaky.fail.Store(true)
	if err := b.engine.RemoveNetwork(context.Background(), "web"); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 3*time.Second, func() error {
		if !strings.Contains(b.logs.String(), "retiring it in the cluster failed") {
			return fmt.Errorf("no retire failure logged yet")
		}
		return nil
	})
	return b, flaky
}

// TestUnreadableRetireFile: a retire file that cannot be read is said at
// error level, naming it, and the syncer starts all the same: cluster-wide
// networks are not worth stopping the plugin for.
func TestUnreadableRetireFile(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "netsync-retiring.json")
	if err := os.WriteFile(file, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	store, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: filepath.Join(dir, "s.db"), Prefix: "t/"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	logs := &syncBuf{}
	s, err := New(Config{HostID: "h", RetireFile: file, DriverName: func(context.Context) (string, error) { return "co", nil },
		Logger: slog.New(slog.NewTextHandler(logs, nil))}, store, newFakeEngine("co", nil))
	if err != nil || s == nil {
		t.Fatalf("New with an unreadable retire file: %v", err)
	}
	if out := logs.String(); !strings.Contains(out, "level=ERROR") || !strings.Contains(out, file) {
		t.Errorf("the unreadable file was not logged at error level naming it:\n%s", out)
	}
}
