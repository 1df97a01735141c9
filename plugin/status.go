package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"consul-overlay/internal/hostid"
	"consul-overlay/kvstore"
	"consul-overlay/status"
	"consul-overlay/vxlan"
)

// Exit codes of `consul-overlay status`.
const (
	statusOK      = 0 // the store answers and the kernel matches it
	statusDrift   = 1 // drift, or the store or the kernel could not be read
	statusBadCall = 2 // bad flags or settings: nothing was read
)

// statusMain is `consul-overlay status [--json]`: it reads the settings
// from the same environment as the plugin, looks at the store and the
// kernel of the current network namespace, prints the report and returns
// the exit code. It changes nothing: no file in DATA_DIR, no key, no
// kernel object.
func statusMain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("consul-overlay status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print JSON (stable field names) instead of text")
	timeout := fs.Duration("timeout", 10*time.Second, "bound on the store reads")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: consul-overlay status [--json] [--timeout 10s]\n\n"+
			"Prints this host's identity, the store, every network and host of the cluster, and the\n"+
			"drift between the store and this host's kernel. Reads only. Settings come from the\n"+
			"environment, as for the plugin (CONSUL_HTTP_ADDR, KV_PREFIX, DATA_DIR, VTEP_ADDR, ...).\n"+
			"Exit status: 0 no drift, 1 drift or something unreadable, 2 bad usage.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return statusBadCall
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return statusBadCall
	}
	cfg, err := loadConfig(os.Getenv)
	if err != nil {
		fmt.Fprintf(stderr, "consul-overlay status: bad setting: %v\n", err)
		return statusBadCall
	}
	ccfg, useConsul, err := kvstore.ConsulConfigFromEnv(os.Getenv)
	if err != nil {
		fmt.Fprintf(stderr, "consul-overlay status: bad setting: %v\n", err)
		return statusBadCall
	}
	scfg, _, closeStore := readOnlyStatusConfig(cfg, ccfg, useConsul, *timeout)
	defer closeStore()

	r, err := status.Collect(context.Background(), scfg)
	if err != nil {
		fmt.Fprintf(stderr, "consul-overlay status: %v\n", err)
		return statusDrift
	}
	if scfg.HostID == "" {
		r.Errors = append(r.Errors, fmt.Sprintf("no host identity in %s: the plugin never ran with DATA_DIR=%s (set DATA_DIR as the plugin has it)", filepath.Join(cfg.DataDir, hostid.IDFile), cfg.DataDir))
	}
	if *asJSON {
		err = status.WriteJSON(stdout, r)
	} else {
		err = status.WriteText(stdout, r)
	}
	if err != nil {
		fmt.Fprintf(stderr, "consul-overlay status: %v\n", err)
		return statusDrift
	}
	if len(r.Drift) > 0 || !r.Store.Reachable || len(r.Errors) > 0 {
		return statusDrift
	}
	return statusOK
}

// readOnlyStatusConfig is what `status` and `doctor` read, built from the
// plugin's settings without writing anything: the store (Consul, or the
// embedded file only if it exists), the identity (read, never created:
// hostid.Load would create it), the node name and VTEP, and the kernel
// view of this instance's owner. owner is that instance's owner tag;
// closeStore releases the store.
func readOnlyStatusConfig(cfg Config, ccfg kvstore.ConsulConfig, useConsul bool, timeout time.Duration) (scfg status.Config, owner string, closeStore func()) {
	scfg = status.Config{Prefix: ccfg.Prefix, Node: cfg.Node, Timeout: timeout}
	closeStore = func() {}
	storeName := "embedded"
	if useConsul {
		storeName = ccfg.Address
		scfg.StoreKind, scfg.StoreAddress = "consul", ccfg.Address
		c, err := kvstore.NewConsul(ccfg)
		if err != nil {
			scfg.StoreError = err
		} else {
			scfg.Store = c
			closeStore = func() { c.Close() }
		}
	} else {
		path := filepath.Join(cfg.DataDir, "state.db")
		scfg.StoreKind, scfg.StoreAddress = "embedded", path
		scfg.Store, scfg.StoreError = openEmbeddedReadOnly(path, ccfg.Prefix)
		if st := scfg.Store; st != nil {
			closeStore = func() { st.Close() }
		}
	}
	if id, err := hostid.Read(cfg.DataDir); err == nil {
		scfg.HostID = id
	}
	if v, err := resolveVTEP(cfg); err == nil {
		scfg.VTEP = v
	}
	if scfg.Node == "" {
		if b, err := os.ReadFile(filepath.Join(cfg.DataDir, "node-name")); err == nil {
			scfg.Node = strings.TrimSpace(string(b))
		}
	}
	owner = ownerTag(ccfg.Prefix, storeName)
	scfg.Kernel = func() ([]vxlan.KernelNetwork, error) {
		dp, err := readDataplane(cfg, owner)
		if err != nil {
			return nil, err
		}
		if dp != nil {
			defer dp.Close()
		}
		return vxlan.InspectDataplane(nil, dp, owner)
	}
	return scfg, owner, closeStore
}

// openEmbeddedReadOnly opens the embedded store only if its file exists
// (opening creates it otherwise). While the plugin runs it holds the
// file's lock, so this fails after a short wait: the embedded store can
// be inspected only with the plugin stopped.
func openEmbeddedReadOnly(path, prefix string) (kvstore.Store, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("embedded store %s: %w", path, err)
	}
	e, err := kvstore.NewEmbedded(kvstore.EmbeddedConfig{Path: path, Prefix: prefix, OpenTimeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("%w (a running plugin holds the embedded store: stop it to inspect the store, or use Consul)", err)
	}
	return e, nil
}
