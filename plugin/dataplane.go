package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"consul-overlay/vxlan"
)

// dataplaneDir is where the data-plane namespaces are pinned in the host's
// mount namespace, as `ip netns add` pins under /run/netns.
const dataplaneDir = "/run/consul-overlay"

// dataplanePinEvery is how often the pin is put back if it went (removed
// by hand, or by a tool that cleans /run).
const dataplanePinEvery = 10 * time.Second

// dataplaneNS is the data-plane namespace of DATAPLANE_NAMESPACE
// (docs/dataplane-namespace.md): this process holds it open, and its pin
// in the host's mount namespace keeps it, and every container's link in
// it, alive while the plugin is stopped, disabled or upgraded.
type dataplaneNS struct {
	pin  vxlan.NSPin
	path string // the pin, in the host's mount namespace
	ns   netns.NsHandle
}

// dataplanePath is the pin of the data-plane namespace that setting
// (Config.DataplaneNS) names: "true" is owner's mark.
func dataplanePath(setting, owner string) string {
	if setting == "true" {
		setting = vxlan.OwnerMark(owner)
	}
	return filepath.Join(dataplaneDir, setting)
}

// openDataplane opens, or creates and pins, owner's data-plane namespace,
// and keeps its pin in place until ctx ends. The returned stop closes it
// (the namespace stays: the pin holds it).
func openDataplane(ctx context.Context, log *slog.Logger, setting string, hostPID int, owner string) (*dataplaneNS, func(), error) {
	d := &dataplaneNS{pin: vxlan.NSPin{HostPID: hostPID}, path: dataplanePath(setting, owner)}
	ns, err := d.pin.EnsureNS(d.path)
	if err != nil {
		return nil, nil, fmt.Errorf("data-plane namespace (DATAPLANE_NAMESPACE; needs pidhost, CAP_SYS_ADMIN and CAP_SYS_PTRACE: the plugin built with make plugin PLUGIN_DATAPLANE=1): %w", err)
	}
	d.ns = ns
	log.Info("data-plane namespace open", "pin", d.path)
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(dataplanePinEvery)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if err := d.pin.Pin(d.ns, d.path); err != nil {
				log.Error("data-plane namespace: its pin is gone and cannot be put back: a plugin restart now would take every container's link in it down", "pin", d.path, "error", err)
			}
		}
	}()
	return d, func() {
		cancel()
		<-done
		d.ns.Close()
	}, nil
}

// procPath is the namespace as this process sees it, for vxlan.Config.
func (d *dataplaneNS) procPath() string {
	return "/proc/self/fd/" + strconv.Itoa(int(d.ns))
}

// handle is a netlink handle in the namespace, for the kernel readers.
func (d *dataplaneNS) handle() (*netlink.Handle, error) {
	return netlink.NewHandleAt(d.ns)
}

// openDataplaneNS opens the data-plane namespace of DATAPLANE_NAMESPACE
// for status, doctor and the metrics: through HOST_PID's mount namespace
// (NSPin.OpenNS, as the plugin does), or else at the path as this process
// sees it (a standalone binary on the host). A zero handle and no error:
// no setting, or no network made in it yet.
func openDataplaneNS(cfg Config, owner string) (netns.NsHandle, error) {
	if cfg.DataplaneNS == "" {
		return netns.None(), nil
	}
	path := dataplanePath(cfg.DataplaneNS, owner)
	var errs []error
	for _, open := range []func() (netns.NsHandle, error){
		func() (netns.NsHandle, error) { return vxlan.NSPin{HostPID: cfg.HostPID}.OpenNS(path) },
		func() (netns.NsHandle, error) { return netns.GetFromPath(path) },
	} {
		ns, err := open()
		if err == nil {
			return ns, nil
		}
		errs = append(errs, err)
	}
	if os.IsNotExist(errs[len(errs)-1]) {
		return netns.None(), nil // no network was made in it yet
	}
	return netns.None(), fmt.Errorf("data-plane namespace %s: %w", path, errors.Join(errs...))
}

// readDataplane is a netlink handle on the data-plane namespace
// (openDataplaneNS), nil without one.
func readDataplane(cfg Config, owner string) (*netlink.Handle, error) {
	ns, err := openDataplaneNS(cfg, owner)
	if err != nil || !ns.IsOpen() {
		return nil, err
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("data-plane namespace %s: %w", dataplanePath(cfg.DataplaneNS, owner), err)
	}
	return h, nil
}
