package main

import (
	"context"
	"log/slog"
	"net/netip"
	"time"
)

// vtepPollInterval is how often the underlay address is looked up again
// when it is not fixed by VTEP_ADDR: a change reaches the callback within
// this interval (plus the lookup, a few netlink dumps).
const vtepPollInterval = 500 * time.Millisecond

// vtepSetter is what the driver implements to move its overlays and its
// published address to a new VTEP (driver.(*Driver).SetVTEP). It is
// asserted at run time so this package builds before the driver has it.
type vtepSetter interface {
	SetVTEP(ctx context.Context, vtep netip.Addr) error
}

// watchVTEP polls resolve every interval until ctx is done. When the
// address differs from the last one applied, it calls onChange; a failed
// onChange is retried at the next poll (the old address stays the applied
// one), a failed lookup (no default route for a moment) changes nothing.
func watchVTEP(ctx context.Context, cur netip.Addr, interval time.Duration, resolve func() (netip.Addr, error),
	onChange func(context.Context, netip.Addr) error, log *slog.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	lookupFailed := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		a, err := resolve()
		if err != nil {
			if !lookupFailed {
				log.Warn("underlay address lookup failed; keeping the current VTEP", "vtep", cur, "error", err)
			}
			lookupFailed = true
			continue
		}
		lookupFailed = false
		if a == cur {
			continue
		}
		log.Info("underlay address changed", "old_vtep", cur, "vtep", a)
		if err := onChange(ctx, a); err != nil {
			if ctx.Err() != nil {
				return
			}
			log.Error("apply new underlay address; retrying", "vtep", a, "error", err)
			continue
		}
		cur = a
	}
}
