package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"time"

	"consul-overlay/driver"
	"consul-overlay/internal/dockerapi"
	"consul-overlay/ipam"
	"consul-overlay/kvstore"
)

// engineIDFile, in DATA_DIR, pins the Docker engine this host's containers
// run on (written by the registrar at its first contact with the engine).
const engineIDFile = "docker-engine-id"

// ownerTag is the data plane's owner tag for this instance: "" for the
// default prefix, so devices made by earlier versions stay this instance's;
// otherwise a short hash of the prefix and the store, so instances with
// other prefixes in one namespace never touch each other's devices.
func ownerTag(prefix, store string) string {
	if prefix == "" || prefix == kvstore.DefaultPrefix {
		return ""
	}
	sum := sha256.Sum256([]byte(prefix + "\x00" + store))
	return hex.EncodeToString(sum[:6])
}

// housekeeping runs, once the driver has restored its state and then every
// interval, the clean-ups that need a wider view than one Docker call:
// IPAM's sweep of expired reclaims and of orphan addresses (an address
// committed before a crash whose reply Docker never got), and the pruning
// of Docker networks bound here that the engine does not have (a crash in
// CreateNetwork after the membership was written). Pruning asks the engine,
// outside any driver call, and only when the engine is the one pinned in
// DATA_DIR.
func housekeeping(ctx context.Context, log *slog.Logger, drv *driver.Driver, ip *ipam.Driver, docker *dockerapi.Client, dataDir string, interval time.Duration) {
	select {
	case <-ctx.Done():
		return
	case <-drv.Ready():
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		// Endpoint records that never joined (a crash whose rollback
		// Docker never sent) go first, so their addresses are swept too.
		if n := drv.ReclaimUnjoined(ctx, ip.Grace()); n > 0 {
			log.Info("reclaimed endpoints that never joined", "endpoints", n)
		}
		if n, err := ip.Sweep(ctx, orphanBound(ctx, log, drv, ip)); err != nil {
			log.Warn("ipam sweep", "error", err)
		} else if n > 0 {
			log.Info("ipam sweep freed addresses", "freed", n)
		}
		if docker != nil {
			engineChores(ctx, log, drv, ip, docker, dataDir)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// orphanBound is the orphan sweep's question (ipam.Driver.Sweep): may an
// endpoint of this host use address a of pool poolID? The driver knows
// only its own endpoints, so a subnet that this host holds more often
// than the driver has networks on it (another driver's network using
// consul-overlay's IPAM with the same subnet, or a network being created
// or removed) is not the driver's alone: any of its addresses may be
// used. The driver's count is taken before and after the holds are read
// and the lower one used, so a network removed meanwhile hides no other.
// Nil (orphans left alone) if the holds cannot be read.
func orphanBound(ctx context.Context, log *slog.Logger, drv *driver.Driver, ip *ipam.Driver) func(poolID string, a netip.Addr) bool {
	before := drv.NetworksBySubnet()
	holds, err := ip.NodeHolds(ctx)
	if err != nil {
		log.Warn("ipam sweep: orphan addresses left alone this time", "error", err)
		return nil
	}
	after := drv.NetworksBySubnet()
	shared := map[netip.Prefix]bool{}
	for s, n := range holds {
		if n > min(before[s], after[s]) {
			shared[s] = true
		}
	}
	return func(poolID string, a netip.Addr) bool {
		_, subnet, _, err := ipam.ParsePoolID(poolID)
		return err != nil || shared[subnet.Masked()] || drv.AddressMayBeUsed(subnet, a)
	}
}

// engineChores asks the engine, once it is proven the pinned one, which
// networks it has: bindings of networks it does not have are pruned, and
// pool holds that none of its networks accounts for are dropped.
func engineChores(ctx context.Context, log *slog.Logger, drv *driver.Driver, ip *ipam.Driver, docker *dockerapi.Client, dataDir string) {
	cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if ok, err := trustedEngine(cctx, docker, dataDir); !ok {
		if err != nil {
			log.Warn("prune networks and pool holds Docker does not have", "error", err)
		}
		return
	}
	if err := pruneNetworks(cctx, drv, docker); err != nil {
		log.Warn("prune networks Docker does not have", "error", err)
	}
	if n, err := sweepPools(cctx, ip, docker); err != nil {
		log.Warn("ipam pool sweep", "error", err)
	} else if n > 0 {
		log.Info("ipam pool sweep dropped holds no Docker network uses", "dropped", n)
	}
}

// trustedEngine reports whether the engine is the one pinned in DATA_DIR
// (false, nil while nothing is pinned yet).
func trustedEngine(ctx context.Context, docker *dockerapi.Client, dataDir string) (bool, error) {
	pinned, err := os.ReadFile(dataDir + "/" + engineIDFile)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, nil // the registrar has not met the engine yet
		}
		return false, err
	}
	info, err := docker.Info(ctx)
	if err != nil {
		return false, fmt.Errorf("ask the engine: %w", err)
	}
	if want := strings.TrimSpace(string(pinned)); info.ID != want {
		return false, fmt.Errorf("the engine at %s has ID %s, not the pinned %s: nothing done", docker.Socket(), info.ID, want)
	}
	return true, nil
}

// sweepPools drops this host's pool holds that no Docker network of the
// pinned engine accounts for (a crash between RequestPool's commit and
// Docker's answer leaves one). Every network with the pool's subnet
// counts, whatever its IPAM driver: counting too many only keeps a hold.
// The caller has checked the engine (trustedEngine).
func sweepPools(ctx context.Context, ip *ipam.Driver, docker *dockerapi.Client) (int, error) {
	nets, err := docker.ListNetworks(ctx)
	if err != nil {
		return 0, err
	}
	return ip.SweepPools(ctx, func(poolID string) (int, bool) {
		_, subnet, sub, err := ipam.ParsePoolID(poolID)
		if err != nil {
			return 0, false
		}
		n := 0
		for _, net := range nets {
			for _, s := range net.Subnets {
				p, err := netip.ParsePrefix(s.Subnet)
				if err != nil || p.Masked() != subnet.Masked() {
					continue
				}
				if r, err := netip.ParsePrefix(s.IPRange); sub.IsValid() && (err != nil || r.Masked() != sub.Masked()) {
					continue
				}
				n++
			}
		}
		return n, true
	})
}

// pruneNetworks drops this host's bindings of Docker networks that the
// pinned engine does not have. The caller has checked the engine
// (trustedEngine).
func pruneNetworks(ctx context.Context, drv *driver.Driver, docker *dockerapi.Client) error {
	return drv.PruneNetworks(ctx, func(ctx context.Context, id string) (bool, error) {
		_, err := docker.InspectNetwork(ctx, id)
		if errors.Is(err, dockerapi.ErrNotFound) {
			return false, nil
		}
		return err == nil, err
	})
}
