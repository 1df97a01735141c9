package dockertest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/testenv"
)

// TestDockerRegistration runs the managed plugin against a real engine and
// a real Consul agent on loopback: containers become services with their
// overlay addresses and a passing HTTP check, `docker stop` deregisters,
// and a container removed while the plugin was down is reclaimed by the
// next anti-entropy pass.
func TestDockerRegistration(t *testing.T) {
	agent := testenv.StartConsul(t)
	consul, err := api.NewClient(&api.Config{Address: agent.Addr})
	if err != nil {
		t.Fatal(err)
	}
	prefix := "co-dtreg-" + fmt.Sprint(rand.Uint32()) + "/"
	ref, id := testPlugin(t, "consul-overlay-dockertest:r", nil,
		"CONSUL_HTTP_ADDR="+agent.Addr, "KV_PREFIX="+prefix, "ANTI_ENTROPY_INTERVAL=2s", "IPAM_GRACE=4s")
	ctx := t.Context()

	netName := UniqueName("codr-")
	third := 1 + rand.IntN(254)
	web1, web2 := netName+"-w1", netName+"-w2"
	t.Cleanup(func() {
		if t.Failed() {
			dump(t, ref, id, netName, web1, web2)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		Docker(ctx, "rm", "-f", web1, web2)
		Docker(ctx, "network", "rm", netName)
	})
	if _, err := Docker(ctx, "network", "create", "-d", ref, "--ipam-driver", ref,
		"--subnet", fmt.Sprintf("10.125.%d.0/24", third), "-o", "name="+netName, netName); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{web1, web2} {
		if _, err := Docker(ctx, "run", "-d", "--name", name, "--network", netName, "--expose", "80",
			"-l", "SERVICE_NAME=web", "-l", "SERVICE_TAGS=e2e", "-e", "SERVICE_CHECK_HTTP=/", "-e", "SERVICE_CHECK_INTERVAL=1s",
			BusyboxImage, "httpd", "-f", "-p", "80", "-h", "/www"); err != nil {
			t.Fatal(err)
		}
	}
	ips := []string{containerIP(t, web1, netName).String(), containerIP(t, web2, netName).String()}
	slices.Sort(ips)

	// Two healthy instances of web, at their overlay addresses, port 80,
	// with the HTTP check passing (the agent reaches them through the
	// gateway address on the host's bridge).
	err = Eventually(ctx, 20*time.Second, func(ctx context.Context) error {
		entries, _, err := consul.Health().Service("web", "", true, (&api.QueryOptions{}).WithContext(ctx))
		if err != nil {
			return err
		}
		var got []string
		for _, e := range entries {
			if e.Service.Port != 80 || !slices.Contains(e.Service.Tags, "e2e") {
				return fmt.Errorf("instance %s: port %d tags %v", e.Service.ID, e.Service.Port, e.Service.Tags)
			}
			got = append(got, e.Service.Address)
		}
		slices.Sort(got)
		if !slices.Equal(got, ips) {
			return fmt.Errorf("passing web instances at %v, want %v", got, ips)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	checks, _, err := consul.Health().Checks("web", nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range checks {
		if c.Type != "http" || c.Status != api.HealthPassing {
			t.Errorf("check %s: type %s status %s", c.CheckID, c.Type, c.Status)
		}
	}

	// docker stop removes the instance within a second.
	start := time.Now()
	if _, err := Docker(ctx, "stop", "-t", "1", web1); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	if err := Eventually(ctx, 5*time.Second, func(ctx context.Context) error {
		svcs, err := consul.Agent().ServicesWithFilter(`Service == "web"`)
		if err != nil {
			return err
		}
		if len(svcs) != 1 {
			return fmt.Errorf("%d web services after docker stop", len(svcs))
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	gone := time.Since(stopped)
	t.Logf("docker stop took %s; the service was gone %s after it returned", stopped.Sub(start).Round(time.Millisecond), gone.Round(time.Millisecond))
	if gone > time.Second {
		t.Errorf("service removed %s after docker stop, want within 1s", gone)
	}

	// Stale state: with the plugin stopped, a container is removed; after
	// the plugin restarts, its service, endpoint record and address go
	// once anti-entropy has seen the container missing for its grace
	// period (30 s) and the reclaimed address has waited IPAM_GRACE for
	// Docker's own release.
	if _, err := Docker(ctx, "plugin", "disable", "-f", ref); err != nil {
		t.Fatal(err)
	}
	if _, err := Docker(ctx, "rm", "-f", web2); err != nil {
		t.Fatal(err)
	}
	if _, err := Docker(ctx, "plugin", "enable", "--timeout", "30", ref); err != nil {
		t.Fatal(err)
	}
	restarted := time.Now()
	if err := Eventually(ctx, 90*time.Second, func(ctx context.Context) error {
		svcs, err := consul.Agent().ServicesWithFilter(`Service == "web"`)
		if err != nil {
			return err
		}
		if len(svcs) != 0 {
			return fmt.Errorf("%d web services left after the removed container", len(svcs))
		}
		keys, _, err := consul.KV().Keys(prefix, "", nil)
		if err != nil {
			return err
		}
		for _, k := range keys {
			if strings.Contains(k, "/endpoints/") || strings.HasSuffix(k, "/"+ips[0]) || strings.HasSuffix(k, "/"+ips[1]) {
				return fmt.Errorf("key of a removed endpoint left: %s", k)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	t.Logf("stale endpoint reclaimed %s after the plugin was enabled again", time.Since(restarted).Round(time.Millisecond))

	if _, err := Docker(ctx, "rm", "-f", web1); err != nil {
		t.Error(err)
	}
	if _, err := Docker(ctx, "network", "rm", netName); err != nil {
		t.Error(err)
	}
	// The host's own records stay by design: hosts/<id> while the plugin
	// runs, members/<id> as its proof of the store at restart.
	keys, _, err := consul.KV().Keys(prefix, "", nil)
	keys = slices.DeleteFunc(keys, func(k string) bool {
		return strings.HasPrefix(k, prefix+"hosts/") || strings.HasPrefix(k, prefix+"members/")
	})
	if err != nil || len(keys) > 0 {
		t.Errorf("keys left after teardown: %v %v", keys, err)
	}
}
