package main

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"consul-overlay/internal/testenv"
)

// The floor of the hosts benchmark's convergence: the least any design
// that learns of a change from Consul can cost on this machine. One key,
// overwritten with the new peer; on every simulated host a watcher
// process holding one blocking GET of that key, which on each answer
// writes the peer's neighbour and FDB entries on the host's VXLAN device
// (the plugin's two kernel writes). One write, one small answer per host,
// the same processes' wake-ups and kernel writes as the plugins', and the
// same netlink events measure it. No design can use one shared key (two
// changes at once would lose one); it is a floor, not a design.

// floorWatchArg is the argument that makes overlaybench a floor watcher.
const floorWatchArg = "floorwatch"

// Floor shapes: how a watcher learns of a change (see floorShapes).
const (
	shapeKey    = "key"    // one blocking GET of one key holding the peer
	shapeNames  = "names"  // a blocking key listing whose names carry a version, then a GET of the new name
	shapeStamps = "stamps" // a blocking list of one small stamp per host, then a GET of the record whose stamp moved
	shapeLean   = "lean"   // the plugin's: a blocking key listing, a check transaction of every record, a GET of the changed one
)

// floorShapes are run in this order; the first is the floor.
var floorShapes = []string{shapeKey, shapeNames, shapeStamps, shapeLean}

// floorWatch is the watcher's process: floorwatch SHAPE CONSUL_ADDR KEY
// IFINDEX. It prints "ready" once it holds its first blocking query, then
// runs until killed. KEY is the key (shape key) or the prefix the writer
// writes under; each peer read is "IP MAC VTEP" on its first line.
func floorWatch(args []string) int {
	if len(args) != 4 || !slices.Contains(floorShapes, args[0]) {
		fmt.Fprintf(os.Stderr, "usage: overlaybench floorwatch %s CONSUL_ADDR KEY IFINDEX\n", strings.Join(floorShapes, "|"))
		return 2
	}
	shape, addr, key := args[0], args[1], args[2]
	var idx int
	if _, err := fmt.Sscan(args[3], &idx); err != nil || idx <= 0 {
		fmt.Fprintf(os.Stderr, "floorwatch: interface index %q: not a positive number\n", args[3])
		return 2
	}
	// As the plugin's client (kvstore.NewConsul): no gzip.
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.DisableCompression = true
	c, err := api.NewClient(&api.Config{Address: addr, HttpClient: &http.Client{Transport: tr}})
	if err != nil {
		fmt.Fprintln(os.Stderr, "floorwatch:", err)
		return 1
	}
	kv := c.KV()
	// wait is one blocking query; it returns the keys to read (nil: the
	// value came with the answer, in val).
	var (
		names  map[string]bool   // shape names: the last listing
		stamps map[string]uint64 // shape stamps: modify index by stamp key
		held   map[string]uint64 // shape lean: modify index by record key
	)
	wait := func(last uint64) (read []string, val []byte, meta *api.QueryMeta, err error) {
		q := &api.QueryOptions{WaitIndex: last, WaitTime: 30 * time.Second}
		switch shape {
		case shapeKey:
			var p *api.KVPair
			p, meta, err = kv.Get(key, q)
			if p != nil {
				val = p.Value
			}
		case shapeNames:
			var ks []string
			ks, meta, err = kv.Keys(key, "", q)
			if err == nil {
				seen := make(map[string]bool, len(ks))
				for _, k := range ks {
					seen[k] = true
					if names != nil && !names[k] {
						read = append(read, k)
					}
				}
				names = seen
			}
		case shapeStamps:
			var ps api.KVPairs
			ps, meta, err = kv.List(key+"stamps/", q)
			if err == nil {
				seen := make(map[string]uint64, len(ps))
				for _, p := range ps {
					seen[p.Key] = p.ModifyIndex
					if i, ok := stamps[p.Key]; stamps != nil && (!ok || i != p.ModifyIndex) {
						read = append(read, key+"recs/"+strings.TrimPrefix(p.Key, key+"stamps/"))
					}
				}
				stamps = seen
			}
		case shapeLean:
			if held == nil {
				var ps api.KVPairs
				ps, meta, err = kv.List(key+"recs/", q)
				if err == nil {
					held = map[string]uint64{}
					for _, p := range ps {
						held[p.Key] = p.ModifyIndex
					}
				}
				break
			}
			_, meta, err = kv.Keys(key+"recs/", "", q)
			if err != nil || meta.LastIndex == last {
				break
			}
			ops := make(api.KVTxnOps, 0, len(held))
			for k, i := range held {
				ops = append(ops, &api.KVTxnOp{Verb: api.KVCheckIndex, Key: k, Index: i})
			}
			slices.SortFunc(ops, func(a, b *api.KVTxnOp) int { return strings.Compare(a.Key, b.Key) })
			ok, resp, _, terr := kv.Txn(ops, &api.QueryOptions{RequireConsistent: true})
			if terr != nil {
				err = terr
				break
			}
			if !ok && resp != nil {
				for _, e := range resp.Errors {
					if e.OpIndex >= 0 && e.OpIndex < len(ops) {
						read = append(read, ops[e.OpIndex].Key)
					}
				}
			}
		}
		return read, val, meta, err
	}
	var last uint64
	ready := false
	for {
		read, val, meta, err := wait(last)
		if err != nil {
			fmt.Fprintln(os.Stderr, "floorwatch:", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if !ready {
			ready = true
			last = meta.LastIndex
			fmt.Println("ready")
			continue
		}
		if meta.LastIndex == last {
			continue
		}
		if meta.LastIndex < last {
			last = 0
			continue
		}
		last = meta.LastIndex
		if val != nil {
			if err := floorProgram(idx, string(val)); err != nil {
				fmt.Fprintln(os.Stderr, "floorwatch:", err)
			}
		}
		for _, k := range read {
			p, _, err := kv.Get(k, nil)
			if err != nil || p == nil {
				fmt.Fprintf(os.Stderr, "floorwatch: read %s: %v\n", k, err)
				continue
			}
			if held != nil {
				held[k] = p.ModifyIndex
			}
			if err := floorProgram(idx, string(p.Value)); err != nil {
				fmt.Fprintln(os.Stderr, "floorwatch:", err)
			}
		}
	}
}

// floorProgram writes the peer "IP MAC VTEP" as the plugin does: a
// permanent neighbour entry and an FDB entry pointing at the VTEP.
func floorProgram(idx int, v string) error {
	ip, mac, vtep, err := parseFloorPeer(v)
	if err != nil {
		return err
	}
	if err := netlink.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT, IP: ip.AsSlice(), HardwareAddr: mac}); err != nil {
		return fmt.Errorf("neighbour %s: %w", ip, err)
	}
	if err := netlink.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, State: netlink.NUD_PERMANENT, Flags: netlink.NTF_SELF, IP: vtep.AsSlice(), HardwareAddr: mac}); err != nil {
		return fmt.Errorf("fdb %s: %w", mac, err)
	}
	return nil
}

// parseFloorPeer reads the first line of a floor value, "IP MAC VTEP"
// (IPv4); the rest pads it to a peer record's size.
func parseFloorPeer(v string) (ip netip.Addr, mac net.HardwareAddr, vtep netip.Addr, err error) {
	v, _, _ = strings.Cut(v, "\n")
	fs := strings.Fields(v)
	if len(fs) != 3 {
		return ip, nil, vtep, fmt.Errorf("floor peer %q: want IP MAC VTEP", v)
	}
	if ip, err = netip.ParseAddr(fs[0]); err != nil || !ip.Is4() {
		return ip, nil, vtep, fmt.Errorf("floor peer %q: IP %q: want an IPv4 address", v, fs[0])
	}
	if mac, err = net.ParseMAC(fs[1]); err != nil || len(mac) != 6 {
		return ip, nil, vtep, fmt.Errorf("floor peer %q: MAC %q: want a 6-byte MAC", v, fs[1])
	}
	if vtep, err = netip.ParseAddr(fs[2]); err != nil || !vtep.Is4() {
		return ip, nil, vtep, fmt.Errorf("floor peer %q: VTEP %q: want an IPv4 address", v, fs[2])
	}
	return ip, mac, vtep, nil
}

// floorResult is what the floor phase measured at one size.
type floorResult struct {
	conv               []float64 // ms, per sample the slowest host
	cpuPerChange       float64   // ms, per watcher (mean)
	consulCPUPerChange float64   // ms
	requestsPerChange  float64
	err                string // why the phase did not finish, if it did not

	// Consul's CPU for one request of each kind a change costs, asked
	// one after the other with nothing else changing (µs; see reqCost).
	cost map[string]float64
}

// Kinds of request whose Consul CPU the floor phase measures alone.
const (
	costFloorGet = "the floor's GET of its key"
	costKeys     = "key listing of the network's peer records (the lean watch's wake)"
	costCheck    = "check transaction of every record (RequireConsistent, as the lean watch sends it for records without stamps)"
	costGet      = "GET of one peer record"
	costList     = "List of the peer records with their values (the watch below 8 KiB of values)"
)

var costKinds = []string{costFloorGet, costKeys, costCheck, costGet, costList}

// p50 and p99 of the floor's convergence; NaN unless every sample finished.
func (fl floorResult) p50() float64 { return fl.pct(false) }
func (fl floorResult) p99() float64 { return fl.pct(true) }

func (fl floorResult) pct(p99 bool) float64 {
	if fl.err != "" || len(fl.conv) == 0 {
		return math.NaN()
	}
	d := summarize(fl.conv)
	if p99 {
		return d.p99
	}
	return d.p50
}

// done says whether the phase finished (its other figures are zero if not).
func (fl floorResult) done() bool { return fl.err == "" && len(fl.conv) > 0 }

// floorPad pads a floor value to about a peer record's size (20
// endpoints of about 21 bytes).
var floorPad = "\n" + strings.Repeat("p", 420)

// hostsFloor runs the floor phase of one shape on hosts[:H] (their VXLAN
// devices idx, their events evs), writing through the meter from the
// sample's host; n is the shape's position (its peers' addresses).
func hostsFloor(t *runner, cfg *config, hosts []*testenv.Host, H int, idx []int, evs []*peerEvents, meter *consulMeter, consulPid int, shape string, n int) (res floorResult) {
	ctx := t.Context()
	exe, err := os.Executable()
	if err != nil {
		res.err = err.Error()
		return res
	}
	base := "co-floor-" + strings.ReplaceAll(time.Now().Format("150405.000"), ".", "") + "-" + shape + "/"
	// Writers: one client per host, its connection made in the host's
	// namespace, as the plugin's would be.
	writers := make([]*api.KV, H)
	for i := range H {
		path := hosts[i].NS.Path
		tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return testenv.DialIn(ctx, path, network, addr)
		}}
		c, err := api.NewClient(&api.Config{Address: meter.Addr, HttpClient: &http.Client{Transport: tr}})
		if err != nil {
			res.err = err.Error()
			return res
		}
		writers[i] = c.KV()
	}
	// Every host's entry exists before the watchers start.
	name := func(i, version int) string { return fmt.Sprintf("%snames/host%d@%d", base, i, version) }
	version := make([]int, H)
	for i := range H {
		var err error
		switch shape {
		case shapeNames:
			_, err = writers[0].Put(&api.KVPair{Key: name(i, 0), Value: []byte(floorPad)}, nil)
		case shapeLean:
			_, err = writers[0].Put(&api.KVPair{Key: fmt.Sprintf("%srecs/host%d", base, i), Value: []byte(floorPad)}, nil)
		case shapeStamps:
			_, _, _, err = writers[0].Txn(api.KVTxnOps{
				{Verb: api.KVSet, Key: fmt.Sprintf("%srecs/host%d", base, i), Value: []byte(floorPad)},
				{Verb: api.KVSet, Key: fmt.Sprintf("%sstamps/host%d", base, i), Value: []byte("0")},
			}, nil)
		}
		if err != nil {
			res.err = fmt.Sprintf("%s: write host%d's entry: %v", shape, i, err)
			return res
		}
	}
	watchKey := base
	if shape == shapeKey {
		watchKey = base + "change"
	} else if shape == shapeNames {
		watchKey = base + "names/"
	}
	cmds := make([]*exec.Cmd, H)
	stop := func() {
		for i, c := range cmds {
			if c != nil && c.Process != nil {
				_ = c.Process.Kill()
				_ = c.Wait()
				cmds[i] = nil
			}
		}
	}
	t.Cleanup(stop)
	defer stop()
	readyc := make(chan error, H)
	for i := range H {
		c := hosts[i].NS.Command(ctx, exe, floorWatchArg, shape, meter.Addr, watchKey, fmt.Sprint(idx[i]))
		c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		c.Stderr = t.logw
		out, err := c.StdoutPipe()
		if err != nil {
			res.err = err.Error()
			return res
		}
		if err := c.Start(); err != nil {
			res.err = fmt.Sprintf("start the floor watcher on host%d: %v", i, err)
			return res
		}
		cmds[i] = c
		go func() {
			sc := bufio.NewScanner(out)
			if sc.Scan() && sc.Text() == "ready" {
				readyc <- nil
				for sc.Scan() { // keep the pipe drained
				}
				return
			}
			readyc <- fmt.Errorf("host%d: the floor watcher never said ready", i)
		}()
	}
	deadline := time.After(60 * time.Second)
	for range H {
		select {
		case err := <-readyc:
			if err != nil {
				res.err = err.Error()
				return res
			}
		case <-deadline:
			res.err = "the floor watchers were not all ready after 60 s"
			return res
		case <-ctx.Done():
			res.err = ctx.Err().Error()
			return res
		}
	}
	pids := make([]int, H+1)
	for i, c := range cmds {
		pids[i] = c.Process.Pid
	}
	pids[H] = consulPid
	sleepCtx(ctx, time.Second)
	m0, c0 := meter.snap(), hostCPU(pids)
	for s := range cfg.hostsSamples {
		k := s % H
		ip := netip.AddrFrom4([4]byte{10, byte(74 + n), byte(s / 250), byte(s%250 + 1)})
		mac := net.HardwareAddr{0x02, 0xf1, byte(n), 0x00, byte(s >> 8), byte(s)}
		val := []byte(fmt.Sprintf("%s %s %s", ip, mac, hosts[k].Addr) + floorPad)
		t0 := time.Now()
		var err error
		switch shape {
		case shapeKey:
			_, err = writers[k].Put(&api.KVPair{Key: watchKey, Value: val}, nil)
		case shapeNames:
			version[k]++
			_, _, _, err = writers[k].Txn(api.KVTxnOps{
				{Verb: api.KVDelete, Key: name(k, version[k]-1)},
				{Verb: api.KVSet, Key: name(k, version[k]), Value: val},
			}, nil)
		case shapeLean:
			_, err = writers[k].Put(&api.KVPair{Key: fmt.Sprintf("%srecs/host%d", base, k), Value: val}, nil)
		case shapeStamps:
			_, _, _, err = writers[k].Txn(api.KVTxnOps{
				{Verb: api.KVSet, Key: fmt.Sprintf("%srecs/host%d", base, k), Value: val},
				{Verb: api.KVSet, Key: fmt.Sprintf("%sstamps/host%d", base, k), Value: []byte(fmt.Sprint(s + 1))},
			}, nil)
		}
		if err != nil {
			res.err = fmt.Sprintf("%s sample %d: write: %v", shape, s, err)
			return res
		}
		each, _, err := waitAllHosts(ctx, evs[:H], k, ip, mac, t0)
		if err != nil {
			res.err = fmt.Sprintf("%s sample %d (peer %s from host%d): %v", shape, s, ip, k, err)
			return res
		}
		res.conv = append(res.conv, slices.Max(each))
		sleepCtx(ctx, 20*time.Millisecond)
	}
	m1, c1 := meter.snap(), hostCPU(pids)
	if shape == shapeKey {
		res.cost = reqCost(t, writers[0], watchKey, consulPid)
	}
	load := diffSnaps(m0, m1)
	pc, cc := cpuDiff(c0, c1)
	ns := float64(cfg.hostsSamples)
	res.cpuPerChange = ms(pc) / ns
	res.consulCPUPerChange = ms(cc) / ns
	res.requestsPerChange = float64(load.total) / ns
	return res
}

// costRounds is how many requests of each kind reqCost sends.
const costRounds = 500

// reqCost measures Consul's CPU for one request of each kind a change
// costs on the network with the most peer records, one after the other
// (the floor's watchers stay blocked: nothing is written meanwhile).
func reqCost(t *runner, kv *api.KV, floorKey string, consulPid int) map[string]float64 {
	// The lean-watched prefix: networks/<key>/config, with its peer
	// records under networks/<key>/config/peers/.
	names, _, err := kv.Keys("", "", nil)
	if err != nil {
		t.Logf("request costs: list keys: %v", err)
		return nil
	}
	byPrefix := map[string][]string{}
	for _, n := range names {
		if i := strings.Index(n, "/config/peers/"); i > 0 {
			pre := n[:i+len("/config")]
			byPrefix[pre] = append(byPrefix[pre], n)
		}
	}
	var prefix string
	for p, ks := range byPrefix {
		if len(ks) > len(byPrefix[prefix]) {
			prefix = p
		}
	}
	if prefix == "" {
		t.Logf("request costs: no peer records found")
		return nil
	}
	pairs, _, err := kv.List(prefix, nil)
	if err != nil || len(pairs) == 0 {
		t.Logf("request costs: list %s: %v", prefix, err)
		return nil
	}
	ops := make(api.KVTxnOps, 0, len(pairs))
	for _, p := range pairs {
		ops = append(ops, &api.KVTxnOp{Verb: api.KVCheckIndex, Key: p.Key, Index: p.ModifyIndex})
	}
	record := byPrefix[prefix][0]
	kinds := map[string]func() error{
		costFloorGet: func() error { _, _, err := kv.Get(floorKey, nil); return err },
		costKeys:     func() error { _, _, err := kv.Keys(prefix, "", nil); return err },
		costCheck: func() error {
			ok, _, _, err := kv.Txn(ops, &api.QueryOptions{RequireConsistent: true})
			if err == nil && !ok {
				err = fmt.Errorf("check transaction failed: a record changed")
			}
			return err
		},
		costGet:  func() error { _, _, err := kv.Get(record, nil); return err },
		costList: func() error { _, _, err := kv.List(prefix, nil); return err },
	}
	out := map[string]float64{}
	for _, k := range costKinds {
		c0, _ := cpuTime(consulPid)
		for range costRounds {
			if err := kinds[k](); err != nil {
				t.Logf("request costs: %s: %v", k, err)
				return nil
			}
		}
		c1, _ := cpuTime(consulPid)
		out[k] = float64((c1 - c0).Microseconds()) / costRounds
	}
	return out
}
