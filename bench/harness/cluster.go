package harness

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"testing"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/testenv"
)

// ClusterOptions shape NewCluster.
type ClusterOptions struct {
	// Bin is the plugin binary; "" builds one with Build.
	Bin string
	// MTU of the underlay links (0: 1500).
	MTU int
	// LogLevel of the plugins ("" is debug).
	LogLevel string
	// Env holds extra KEY=VALUE settings for every plugin.
	Env []string
	// Plugins is how many hosts (the first ones) get a plugin at once; the
	// others wait for StartPlugin. 0 means all.
	Plugins int
}

// Cluster is a set of test hosts on one underlay sharing one Consul agent
// (in host 0's namespace, reached over the underlay), each host running
// the plugin in its namespace.
type Cluster struct {
	Hosts   []*testenv.Host
	Plugins []*Plugin // nil for hosts not started yet
	Consul  *testenv.ConsulAgent
	Prefix  string // the KV prefix of this cluster's state

	t   testing.TB
	opt ClusterOptions
}

// NewCluster builds n hosts, Consul and the plugins.
func NewCluster(t testing.TB, n int, o ClusterOptions) *Cluster {
	t.Helper()
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("nsenter"); err != nil {
		testenv.Missing(t, "nsenter", "apt-get install util-linux")
	}
	if o.Bin == "" {
		o.Bin = Build(t)
	}
	if o.Plugins == 0 {
		o.Plugins = n
	}
	c := &Cluster{t: t, opt: o, Prefix: "co-bench-" + RandomID()[:8] + "/"}
	// Forwarding on, as dockerd leaves a host: the plugins' networks get
	// the default egress of a real host (auto, with its firewall rules).
	c.Hosts = testenv.NewUnderlay(t, n, testenv.UnderlayOptions{MTU: o.MTU, Forwarding: true})
	c.Consul = testenv.StartConsul(t, testenv.WithNetNS(c.Hosts[0].NS.Path), testenv.WithBindAddr(c.Hosts[0].Addr.String()))
	c.Plugins = make([]*Plugin, n)
	for i := range o.Plugins {
		c.StartPlugin(i)
	}
	return c
}

// StartPlugin starts the plugin on host i (named "host<i>").
func (c *Cluster) StartPlugin(i int) *Plugin {
	c.t.Helper()
	p := StartPlugin(c.t, c.opt.Bin, fmt.Sprintf("host%d", i), c.Hosts[i], PluginOptions{
		ConsulAddr: c.Consul.Addr, Prefix: c.Prefix, LogLevel: c.opt.LogLevel, Env: c.opt.Env,
	})
	c.Plugins[i] = p
	return p
}

// KV returns a Consul client whose connections are made from host i's
// namespace, as a plugin on that host makes them.
func (c *Cluster) KV(i int) (*api.Client, error) {
	path := c.Hosts[i].NS.Path
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return testenv.DialIn(ctx, path, network, addr)
		},
		MaxIdleConnsPerHost: 16,
	}
	return api.NewClient(&api.Config{Address: c.Consul.Addr, Transport: tr})
}
