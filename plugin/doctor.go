package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/vishvananda/netns"

	"consul-overlay/consulacl"
	"consul-overlay/doctor"
	"consul-overlay/kvstore"
	"consul-overlay/status"
	"consul-overlay/vxlan"
)

// Exit codes of `consul-overlay doctor`.
const (
	doctorOK      = 0 // no check failed (warnings allowed)
	doctorFailed  = 1 // some check failed
	doctorBadCall = 2 // bad flags or settings: nothing was checked
)

// doctorMain is `consul-overlay doctor [--json]`: it reads the settings
// from the same environment as the plugin, runs the checks of package
// doctor in the current network namespace, prints them and returns the
// exit code. It writes nothing but a few probe frames on the overlay.
func doctorMain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("consul-overlay doctor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print JSON (stable field names) instead of text")
	timeout := fs.Duration("timeout", 10*time.Second, "bound on the store reads")
	probeTimeout := fs.Duration("probe-timeout", 500*time.Millisecond, "wait for each probe's reply")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: consul-overlay doctor [--json] [--timeout 10s] [--probe-timeout 500ms]\n\n"+
			"Checks the store, VXLAN reachability and path MTU to every member host of this host's\n"+
			"networks (probes across the overlay), the firewall backend, kernel modules, sysctls,\n"+
			"other instances' devices and the clock against Consul. Prints PASS/WARN/FAIL and what\n"+
			"to do. Settings come from the environment, as for the plugin.\n"+
			"Exit status: 0 nothing failed, 1 some check failed, 2 bad usage.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return doctorBadCall
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return doctorBadCall
	}
	cfg, err := loadConfig(os.Getenv)
	if err != nil {
		fmt.Fprintf(stderr, "consul-overlay doctor: bad setting: %v\n", err)
		return doctorBadCall
	}
	ccfg, useConsul, err := kvstore.ConsulConfigFromEnv(os.Getenv)
	if err != nil {
		fmt.Fprintf(stderr, "consul-overlay doctor: bad setting: %v\n", err)
		return doctorBadCall
	}
	// The store and kernel read is status's.
	scfg, owner, closeStore := readOnlyStatusConfig(cfg, ccfg, useConsul, *timeout)
	defer closeStore()
	dcfg := doctor.Config{ProbeTimeout: *probeTimeout, System: doctor.HostSystem{}}
	dpns, err := openDataplaneNS(cfg, owner)
	if err != nil {
		// The probes of its networks then WARN that they cannot be sent.
		fmt.Fprintf(stderr, "consul-overlay doctor: %v: overlay probes only in the host's namespace\n", err)
	}
	if dpns.IsOpen() {
		defer dpns.Close()
		dcfg.Probe = dataplaneProbe(dpns)
	}
	if useConsul {
		dcfg.ConsulTime = func(ctx context.Context) (time.Time, error) { return consulTime(ctx, ccfg) }
		if c, ok := scfg.Store.(*kvstore.Consul); ok {
			dcfg.Permissions = func(ctx context.Context) []consulacl.Result {
				return consulacl.Check(ctx, c.Client(), doctorProbeOptions(ccfg.Prefix, cfg.Node, scfg.HostID))
			}
		}
	}
	dcfg.Status = func(ctx context.Context) (*status.Report, error) { return status.Collect(ctx, scfg) }
	dcfg.Foreign = func() (map[string][]string, error) {
		foreign, err := vxlan.ForeignOwners(nil, owner)
		if err != nil {
			return nil, err
		}
		dp, err := readDataplane(cfg, owner)
		if err != nil || dp == nil {
			return foreign, err
		}
		defer dp.Close()
		more, err := vxlan.ForeignOwners(dp, owner)
		if foreign == nil {
			foreign = map[string][]string{}
		}
		for o, links := range more {
			foreign[o] = append(foreign[o], links...)
		}
		return foreign, err
	}

	r, err := doctor.Run(context.Background(), dcfg)
	if err != nil {
		fmt.Fprintf(stderr, "consul-overlay doctor: %v\n", err)
		return doctorFailed
	}
	if *asJSON {
		err = doctor.WriteJSON(stdout, r)
	} else {
		err = doctor.WriteText(stdout, r)
	}
	if err != nil {
		fmt.Fprintf(stderr, "consul-overlay doctor: %v\n", err)
		return doctorFailed
	}
	if r.Failed {
		return doctorFailed
	}
	return doctorOK
}

// doctorProbeOptions are doctor's permission probes: the plugin's (agent
// read only when NODE_NAME is unset) plus KV write on the prefix, which
// the plugin proves by claiming its host record. The probe session and
// service are named apart from the plugin's own start-up probe, so that a
// doctor run beside a starting plugin does not remove the plugin's.
func doctorProbeOptions(prefix, node, hostID string) consulacl.Options {
	if hostID == "" {
		hostID = "unknown"
	}
	return consulacl.Options{
		KeyPrefix:   prefix,
		AgentRead:   node == "",
		HostID:      hostID,
		ServiceID:   consulacl.ProbeServiceName + "-doctor-" + hostID,
		SessionName: "consul-overlay doctor probe " + hostID,
	}
}

// consulTime reads the Date header of a Consul API response
// (/v1/status/leader, which any token may read).
func consulTime(ctx context.Context, c kvstore.ConsulConfig) (time.Time, error) {
	scheme, addr := c.Scheme, c.Address
	if addr == "" {
		addr = kvstore.DefaultConsulAddress
	}
	for _, p := range []string{"http://", "https://"} {
		if rest, ok := strings.CutPrefix(addr, p); ok {
			addr = rest
			if scheme == "" {
				scheme = strings.TrimSuffix(p, "://")
			}
		}
	}
	if scheme == "" {
		scheme = "http"
	}
	tr := &http.Transport{}
	client, err := api.NewHttpClient(tr, api.TLSConfig{CAFile: c.CAFile, CertFile: c.CertFile, KeyFile: c.KeyFile, Address: c.TLSServerName})
	if err != nil {
		return time.Time{}, err
	}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+addr+"/v1/status/leader", nil)
	if err != nil {
		return time.Time{}, err
	}
	if c.Token != "" {
		req.Header.Set("X-Consul-Token", c.Token)
	}
	resp, err := client.Do(req)
	if err != nil {
		return time.Time{}, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	d := resp.Header.Get("Date")
	if d == "" {
		return time.Time{}, fmt.Errorf("no Date header in Consul's response")
	}
	return http.ParseTime(d)
}

// dataplaneProbe is doctor.SendProbe on the network's VXLAN device where
// it is: in the host's namespace, or else in the data-plane namespace ns
// (DATAPLANE_NAMESPACE), entered on a thread of its own that ends with
// the probe (a goroutine that exits locked takes its thread with it, so
// no other goroutine runs in that namespace).
func dataplaneProbe(ns netns.NsHandle) doctor.ProbeFunc {
	return func(ctx context.Context, t doctor.Target, size int, timeout time.Duration) (bool, error) {
		if _, err := net.InterfaceByName(t.Device); err == nil {
			return doctor.SendProbe(ctx, t, size, timeout)
		}
		type result struct {
			ok  bool
			err error
		}
		done := make(chan result, 1)
		go func() {
			runtime.LockOSThread() // never unlocked: see above
			if err := netns.Set(ns); err != nil {
				done <- result{false, fmt.Errorf("probe %s: enter the data-plane namespace: %w", t.Device, err)}
				return
			}
			ok, err := doctor.SendProbe(ctx, t, size, timeout)
			done <- result{ok, err}
		}()
		r := <-done
		return r.ok, r.err
	}
}
