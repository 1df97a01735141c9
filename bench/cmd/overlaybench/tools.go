package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"

	"consul-overlay/internal/testenv"
)

// nsRun runs a command in a namespace (nil: the machine's own) and
// returns its combined output.
func nsRun(ctx context.Context, ns *testenv.NetNS, args ...string) (string, error) {
	var cmd *exec.Cmd
	if ns == nil {
		cmd = exec.CommandContext(ctx, args[0], args[1:]...)
	} else {
		cmd = ns.Command(ctx, args...)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		where := "host"
		if ns != nil {
			where = ns.Name
		}
		return string(out), fmt.Errorf("%s (in %s): %w: %s", strings.Join(args, " "), where, err, strings.TrimSpace(lastLines(string(out), 5)))
	}
	return string(out), nil
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// iperfServer runs `iperf3 -s` in ns until ctx ends.
func iperfServer(ctx context.Context, ns *testenv.NetNS, port int) error {
	cmd := ns.Command(ctx, "iperf3", "-s", "-p", strconv.Itoa(port))
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start iperf3 server in %s: %w", ns.Name, err)
	}
	go func() { _ = cmd.Wait() }()
	return nil
}

// iperfResult is one iperf3 client run.
type iperfResult struct {
	gbps        float64 // received, all streams
	retransmits int
}

// iperf runs a TCP test from ns to dst:port with the given parallel
// streams and duration, retrying while the server is not up yet.
func iperf(ctx context.Context, ns *testenv.NetNS, dst netip.Addr, port, streams int, secs float64) (iperfResult, error) {
	args := []string{"iperf3", "-c", dst.String(), "-p", strconv.Itoa(port), "-P", strconv.Itoa(streams),
		"-t", strconv.FormatFloat(secs, 'f', -1, 64), "-J"}
	if secs >= 3 {
		args = append(args, "-O", "1") // leave slow start out
	}
	args = append(args, "--connect-timeout", "3000")
	var lastErr error
	for try := 0; try < 10; try++ {
		// A run that stalls (the path broke under it) must not hang the
		// benchmark: iperf3 has no overall timeout of its own.
		rctx, cancel := context.WithTimeout(ctx, time.Duration(secs*float64(time.Second))+20*time.Second)
		out, err := ns.Command(rctx, args...).Output()
		cancel()
		var j struct {
			Error string
			End   struct {
				SumSent     struct{ Retransmits int } `json:"sum_sent"`
				SumReceived struct {
					BitsPerSecond float64 `json:"bits_per_second"`
				} `json:"sum_received"`
			}
		}
		if jerr := json.Unmarshal(out, &j); jerr == nil && j.Error == "" && j.End.SumReceived.BitsPerSecond > 0 {
			return iperfResult{gbps: j.End.SumReceived.BitsPerSecond / 1e9, retransmits: j.End.SumSent.Retransmits}, nil
		} else if j.Error != "" {
			lastErr = errors.New(j.Error)
		} else {
			lastErr = fmt.Errorf("%v (%v): %s", err, jerr, lastLines(string(out), 3))
		}
		if ctx.Err() != nil {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	return iperfResult{}, fmt.Errorf("iperf3 %s from %s: %w", dst, ns.Name, lastErr)
}

var pingTime = regexp.MustCompile(`time=([0-9.]+) ms`)

// pingRTT sends count pings, interval apart, from ns to dst and returns
// each round trip in microseconds and the number lost.
func pingRTT(ctx context.Context, ns *testenv.NetNS, dst netip.Addr, count int, interval time.Duration) ([]float64, int, error) {
	rctx, cancel := context.WithTimeout(ctx, time.Duration(count)*interval+10*time.Second)
	defer cancel()
	out, err := ns.Command(rctx, "ping", "-n", "-i", fmt.Sprintf("%.3f", interval.Seconds()), "-c", strconv.Itoa(count), "-W", "1", dst.String()).CombinedOutput()
	var rtts []float64
	for _, m := range pingTime.FindAllStringSubmatch(string(out), -1) {
		v, perr := strconv.ParseFloat(m[1], 64)
		if perr == nil {
			rtts = append(rtts, v*1000)
		}
	}
	if len(rtts) == 0 {
		return nil, count, fmt.Errorf("ping %s from %s: no reply (%v): %s", dst, ns.Name, err, lastLines(string(out), 3))
	}
	return rtts, count - len(rtts), nil
}

// pingOnce sends one ping with the don't-fragment bit and size bytes of
// ICMP payload; it reports whether a reply came.
func pingOnce(ctx context.Context, ns *testenv.NetNS, dst netip.Addr, size int) (bool, string) {
	out, err := ns.Command(ctx, "ping", "-n", "-c", "1", "-W", "2", "-M", "do", "-s", strconv.Itoa(size), dst.String()).CombinedOutput()
	return err == nil, strings.TrimSpace(lastLines(string(out), 2))
}

var pingLoss = regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)

// pingLossOf parses ping's summary: sent and received.
func pingLossOf(out string) (sent, recv int, ok bool) {
	m := pingLoss.FindStringSubmatch(out)
	if m == nil {
		return 0, 0, false
	}
	sent, _ = strconv.Atoi(m[1])
	recv, _ = strconv.Atoi(m[2])
	return sent, recv, true
}

// toolVersion returns the first line of `cmd args...`, or "missing".
func toolVersion(args ...string) string {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil && len(out) == 0 {
		return "missing"
	}
	return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
}
