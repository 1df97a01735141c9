package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"consul-overlay/consulacl"
	"consul-overlay/doctor"
)

// doctor runs `consul-overlay doctor --json` in the plugin's host
// namespace with the plugin's settings, as an operator would on that host;
// env overrides settings.
func (p *pluginProc) doctor(t *testing.T, env ...string) (doctor.Report, int) {
	t.Helper()
	cmd := exec.Command("nsenter", "--net="+p.host.NS.Path, pluginBinary(t), "doctor", "--json")
	cmd.Env = append(append(os.Environ(), p.env...), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	code := 0
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("doctor on %s: %v\n%s", p.name, err, stderr.String())
		}
		code = ee.ExitCode()
	}
	var r doctor.Report
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		t.Fatalf("doctor --json on %s (exit %d): %v\nstdout:\n%s\nstderr:\n%s", p.name, code, err, stdout.String(), stderr.String())
	}
	return r, code
}

// checksNamed returns the checks of one name.
func checksNamed(r doctor.Report, name string) []doctor.Check {
	var out []doctor.Check
	for _, c := range r.Checks {
		if c.Name == name {
			out = append(out, c)
		}
	}
	return out
}

func reportText(r doctor.Report) string {
	var b strings.Builder
	_ = doctor.WriteText(&b, &r)
	return b.String()
}

func TestDoctorTwoHosts(t *testing.T) {
	c := newCluster(t, 2)
	a, b := c.plugins[0], c.plugins[1]
	spec := netSpec{subnet4: "10.31.0.0/24", opts: map[string]string{"name": "doc", "mtu": "1450"}}
	na, err := a.createNetwork(spec)
	if err != nil {
		t.Fatal(err)
	}
	nb, err := b.createNetwork(spec)
	if err != nil {
		t.Fatal(err)
	}
	ca, cb := na.run(t), nb.run(t)
	eventually(t, 15*time.Second, func() error {
		for i, p := range []*pluginProc{a, b} {
			if r, code := p.status(t); code != 0 || len(r.Drift) > 0 {
				return fmt.Errorf("host%d: exit %d, drift %v, errors %v", i, code, r.Drift, r.Errors)
			}
		}
		return nil
	})
	if err := ca.ping(t, cb.addr4.Addr(), 1); err != nil {
		t.Fatalf("the overlay does not work before doctor runs: %v", err)
	}
	hostName := func(i int) string { return fmt.Sprintf("host%d (%s)", i, c.hosts[i].Addr) }

	t.Run("healthy", func(t *testing.T) {
		for i, p := range []*pluginProc{a, b} {
			r, code := p.doctor(t)
			t.Logf("host%d:\n%s", i, reportText(r))
			if code != doctorOK || r.Failed {
				t.Errorf("host%d: exit %d, failed %v", i, code, r.Failed)
			}
			other := hostName(1 - i)
			for _, name := range []string{"store", "vxlan", "mtu", "owners", "clock"} {
				cs := checksNamed(r, name)
				if len(cs) == 0 {
					t.Errorf("host%d: no %s check", i, name)
				}
				for _, ch := range cs {
					if ch.Result != doctor.Pass {
						t.Errorf("host%d: %s check %s: %s", i, name, ch.Result, ch.Message)
					}
				}
			}
			for _, name := range []string{"vxlan", "mtu"} {
				if cs := checksNamed(r, name); len(cs) != 1 || cs[0].Host != other || cs[0].Network != "doc" {
					t.Errorf("host%d: %s checks %+v, want one of host %s, network doc", i, name, cs, other)
				}
			}
		}
	})

	t.Run("udp 4789 blocked", func(t *testing.T) {
		rule := []string{"INPUT", "-p", "udp", "--dport", "4789", "-j", "DROP"}
		if out, err := c.hosts[1].NS.Run(t, append([]string{"iptables", "-w", "-I"}, rule...)...); err != nil {
			t.Fatalf("block udp 4789 on host1: %v\n%s", err, out)
		}
		defer func() {
			if out, err := c.hosts[1].NS.Run(t, append([]string{"iptables", "-w", "-D"}, rule...)...); err != nil {
				t.Errorf("unblock udp 4789 on host1: %v\n%s", err, out)
			}
		}()
		r, code := a.doctor(t)
		t.Logf("host0:\n%s", reportText(r))
		if code != doctorFailed || !r.Failed {
			t.Errorf("exit %d, failed %v, want exit %d", code, r.Failed, doctorFailed)
		}
		cs := checksNamed(r, "vxlan")
		if len(cs) != 1 || cs[0].Result != doctor.Fail || cs[0].Host != hostName(1) || !strings.Contains(cs[0].Message, hostName(1)) || cs[0].Network != "doc" {
			t.Errorf("vxlan checks %+v, want one FAIL naming %s on doc", cs, hostName(1))
		}
		if ms := checksNamed(r, "mtu"); len(ms) != 0 {
			t.Errorf("mtu checked on an unreachable host: %+v", ms)
		}
	})

	t.Run("underlay mtu lowered", func(t *testing.T) {
		link := c.hosts[1].Link
		if out, err := c.hosts[1].NS.Run(t, "ip", "link", "set", link, "mtu", "1400"); err != nil {
			t.Fatalf("lower the underlay mtu on host1: %v\n%s", err, out)
		}
		defer func() {
			if out, err := c.hosts[1].NS.Run(t, "ip", "link", "set", link, "mtu", "1500"); err != nil {
				t.Errorf("restore the underlay mtu on host1: %v\n%s", err, out)
			}
		}()
		r, code := a.doctor(t)
		t.Logf("host0:\n%s", reportText(r))
		if code != doctorFailed || !r.Failed {
			t.Errorf("exit %d, failed %v, want exit %d", code, r.Failed, doctorFailed)
		}
		if cs := checksNamed(r, "vxlan"); len(cs) != 1 || cs[0].Result != doctor.Pass {
			t.Errorf("vxlan checks %+v, want one PASS (small packets pass)", cs)
		}
		cs := checksNamed(r, "mtu")
		if len(cs) != 1 || cs[0].Result != doctor.Fail || cs[0].Host != hostName(1) || !strings.Contains(cs[0].Message, hostName(1)) {
			t.Fatalf("mtu checks %+v, want one FAIL naming %s", cs, hostName(1))
		}
		// 1400 on the receiving link less 50 bytes of VXLAN encapsulation;
		// a veth takes up to 4 bytes past its MTU (room for a VLAN tag).
		found := false
		for size := 1350; size <= 1354; size++ {
			if strings.Contains(cs[0].Message, fmt.Sprintf("passes is %d bytes", size)) && strings.Contains(cs[0].Fix, fmt.Sprintf("mtu=%d", size)) {
				found = true
			}
		}
		if !found {
			t.Errorf("mtu check %+v does not name a largest size of 1350 to 1354", cs[0])
		}
	})

	// Healthy again once the faults are undone.
	if r, code := a.doctor(t); code != doctorOK {
		t.Errorf("after the faults are undone: exit %d\n%s", code, reportText(r))
	}
}

// TestDoctorACL: on a Consul agent with ACLs and default deny, doctor with
// the plugin's token (the documented policy) passes its permissions check;
// with a token that lacks one required rule it fails that check naming the
// rule, exits 1, and leaves nothing behind; without NODE_NAME a token
// without agent read fails too.
func TestDoctorACL(t *testing.T) {
	c := newACLCluster(t, "acldoc")
	full := aclPolicy(c.prefix)
	p := newPluginProc(t, "host0", c.hosts[0], c.agent.Addr, c.prefix, "CONSUL_HTTP_TOKEN="+c.token(t, "full", full))
	p.start()
	p.mustWork(t)

	r, code := p.doctor(t)
	t.Logf("full policy:\n%s", reportText(r))
	if cs := checksNamed(r, "permissions"); code != doctorOK || len(cs) != 1 || cs[0].Result != doctor.Pass {
		t.Errorf("full policy: exit %d, permission checks %+v", code, cs)
	}
	for _, tc := range []struct {
		name, drop, rule string
		env              []string
	}{
		{name: "kv read only", drop: "", rule: fmt.Sprintf(`key_prefix %q { policy = "write" }`, c.prefix)},
		{name: "session", drop: `session_prefix ""`, rule: `session_prefix "" { policy = "write" }`},
		{name: "service", drop: `service_prefix ""`, rule: `service_prefix "" { policy = "write" }`},
		{name: "agent", drop: `agent_prefix ""`, rule: `agent_prefix "" { policy = "read" }`, env: []string{"NODE_NAME="}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rules := strings.Replace(full, "policy = \"write\"", "policy = \"read\"", 1) // the key rule comes first
			if tc.drop != "" {
				rules = withoutRule(t, full, tc.drop)
			}
			tok := c.token(t, "doc-"+strings.ReplaceAll(tc.name, " ", "-"), rules)
			r, code := p.doctor(t, append([]string{"CONSUL_HTTP_TOKEN=" + tok}, tc.env...)...)
			t.Logf("without %s:\n%s", tc.rule, reportText(r))
			cs := checksNamed(r, "permissions")
			if code != doctorFailed || !r.Failed || len(cs) != 1 || cs[0].Result != doctor.Fail ||
				!strings.Contains(cs[0].Message, tc.rule) || !strings.Contains(cs[0].Fix, tc.rule) {
				t.Errorf("exit %d, permission checks %+v, want one FAIL naming %s", code, cs, tc.rule)
			}
			if st := checksNamed(r, "store"); len(st) != 1 || st[0].Result != doctor.Pass {
				t.Errorf("store checks %+v, want PASS (the token reads the prefix)", st)
			}
		})
	}
	// The probes left no probe service and no key of their own.
	if svcs, err := c.admin.Agent().ServicesWithFilter(fmt.Sprintf(`Service == %q`, consulacl.ProbeServiceName)); err != nil || len(svcs) != 0 {
		t.Errorf("probe services left: %v, %v", svcs, err)
	}
	for _, k := range c.keys(t) {
		if strings.HasSuffix(k, "acl-probe") {
			t.Errorf("probe key written: %s", k)
		}
	}
}
