package discovery

import (
	"encoding/json"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/dockerapi"
)

const testEP = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func baseEndpoint() Endpoint {
	return Endpoint{
		ID:          testEP,
		Network:     "app_net",
		NetworkID:   "net123",
		IPv4:        netip.MustParseAddr("10.1.2.3"),
		ContainerID: "abcdef012345",
		Register:    true,
	}
}

func container(name string, labels map[string]string, env ...string) *dockerapi.Container {
	return &dockerapi.Container{ID: "abcdef012345" + strings.Repeat("0", 52), Name: name, Labels: labels, Env: env}
}

// svc is the part of a registration the table tests compare.
type svc struct {
	ID, Name string
	Port     int
	Tags     []string
}

func summarize(regs []*api.AgentServiceRegistration) []svc {
	var out []svc
	for _, r := range regs {
		out = append(out, svc{r.ID, r.Name, r.Port, r.Tags})
	}
	return out
}

func TestBuildServicesNamesTagsIDs(t *testing.T) {
	tcp80 := []Port{{"tcp", 80}}
	two := []Port{{"tcp", 80}, {"tcp", 443}}
	tests := []struct {
		name string
		ep   func(*Endpoint)
		c    *dockerapi.Container
		want []svc
	}{
		{
			name: "no metadata yet: network name, no port",
			want: []svc{{testEP, "app-net", 0, nil}},
		},
		{
			name: "no metadata, no network name: short endpoint id",
			ep:   func(e *Endpoint) { e.Network = "" },
			want: []svc{{testEP, "endpoint-0123456789ab", 0, nil}},
		},
		{
			name: "container name, leading slash dropped and made DNS-safe",
			c:    container("/my_app.1", nil),
			want: []svc{{testEP, "my-app-1", 0, nil}},
		},
		{
			name: "compose label beats container name",
			c:    container("proj-web-1", map[string]string{ComposeServiceLabel: "web"}),
			want: []svc{{testEP, "web", 0, nil}},
		},
		{
			name: "env SERVICE_NAME beats compose label",
			c:    container("proj-web-1", map[string]string{ComposeServiceLabel: "web"}, "SERVICE_NAME=fromenv"),
			want: []svc{{testEP, "fromenv", 0, nil}},
		},
		{
			name: "label beats env",
			c:    container("x", map[string]string{"SERVICE_NAME": "fromlabel"}, "SERVICE_NAME=fromenv"),
			want: []svc{{testEP, "fromlabel", 0, nil}},
		},
		{
			name: "driver opt beats label",
			ep:   func(e *Endpoint) { e.Options = map[string]string{"SERVICE_NAME": "fromopt", "other": "x"} },
			c:    container("x", map[string]string{"SERVICE_NAME": "fromlabel"}),
			want: []svc{{testEP, "fromopt", 0, nil}},
		},
		{
			name: "driver opt applies before metadata arrives",
			ep:   func(e *Endpoint) { e.Options = map[string]string{"SERVICE_NAME": "early", "SERVICE_TAGS": "t"} },
			want: []svc{{testEP, "early", 0, []string{"t"}}},
		},
		{
			name: "explicit names are kept as given, lower-case key suffix accepted",
			c:    container("x", nil, "SERVICE_name=My_Svc"),
			want: []svc{{testEP, "My_Svc", 0, nil}},
		},
		{
			name: "single port keeps the plain name",
			ep:   func(e *Endpoint) { e.Ports = tcp80 },
			c:    container("x", map[string]string{"SERVICE_NAME": "web"}),
			want: []svc{{testEP + ":80", "web", 80, nil}},
		},
		{
			name: "several ports: name-port, also with a generic SERVICE_NAME",
			ep:   func(e *Endpoint) { e.Ports = two },
			c:    container("x", map[string]string{"SERVICE_NAME": "web"}),
			want: []svc{{testEP + ":80", "web-80", 80, nil}, {testEP + ":443", "web-443", 443, nil}},
		},
		{
			name: "per-port name is exact and beats the generic one",
			ep:   func(e *Endpoint) { e.Ports = two },
			c:    container("x", map[string]string{"SERVICE_NAME": "web"}, "SERVICE_443_NAME=secure"),
			want: []svc{{testEP + ":80", "web-80", 80, nil}, {testEP + ":443", "secure", 443, nil}},
		},
		{
			name: "per-port env beats generic label (per-port over generic within the container)",
			ep:   func(e *Endpoint) { e.Ports = tcp80 },
			c:    container("x", map[string]string{"SERVICE_TAGS": "label"}, "SERVICE_80_TAGS=env80"),
			want: []svc{{testEP + ":80", "x", 80, []string{"env80"}}},
		},
		{
			name: "generic driver opt beats per-port label (driver options first)",
			ep: func(e *Endpoint) {
				e.Ports = tcp80
				e.Options = map[string]string{"SERVICE_NAME": "opt"}
			},
			c:    container("x", map[string]string{"SERVICE_80_NAME": "label80"}),
			want: []svc{{testEP + ":80", "opt", 80, nil}},
		},
		{
			name: "per-port driver opt beats generic driver opt",
			ep: func(e *Endpoint) {
				e.Ports = two
				e.Options = map[string]string{"SERVICE_NAME": "opt", "SERVICE_443_NAME": "opt443"}
			},
			want: []svc{{testEP + ":80", "opt-80", 80, nil}, {testEP + ":443", "opt443", 443, nil}},
		},
		{
			name: "udp gets the udp tag and an ID suffix; same port tcp and udp stay distinct",
			ep:   func(e *Endpoint) { e.Ports = []Port{{"tcp", 53}, {"udp", 53}} },
			c:    container("dns", map[string]string{"SERVICE_TAGS": "a, b,,a"}),
			want: []svc{
				{testEP + ":53", "dns-53", 53, []string{"a", "b"}},
				{testEP + ":53:udp", "dns-53", 53, []string{"a", "b", "udp"}},
			},
		},
		{
			name: "sctp tag",
			ep:   func(e *Endpoint) { e.Ports = []Port{{"sctp", 9}} },
			c:    container("s", nil),
			want: []svc{{testEP + ":9:sctp", "s", 9, []string{"sctp"}}},
		},
		{
			name: "escaped comma in tags",
			c:    container("x", nil, `SERVICE_TAGS=a\,b,c`),
			want: []svc{{testEP, "x", 0, []string{"a,b", "c"}}},
		},
		{
			name: "SERVICE_IGNORE skips the endpoint",
			c:    container("x", map[string]string{"SERVICE_IGNORE": "true"}),
			want: nil,
		},
		{
			name: "SERVICE_IGNORE=false does not",
			c:    container("x", map[string]string{"SERVICE_IGNORE": "false"}),
			want: []svc{{testEP, "x", 0, nil}},
		},
		{
			name: "per-port ignore skips one port; the count for name-port includes it",
			ep:   func(e *Endpoint) { e.Ports = two },
			c:    container("x", nil, "SERVICE_443_IGNORE=1"),
			want: []svc{{testEP + ":80", "x-80", 80, nil}},
		},
		{
			name: "driver opt ignore",
			ep:   func(e *Endpoint) { e.Options = map[string]string{"SERVICE_IGNORE": "yes"} },
			want: nil,
		},
		{
			name: "register=false",
			ep:   func(e *Endpoint) { e.Register = false },
			c:    container("x", nil),
			want: nil,
		},
		{
			name: "service prefix applies to every name",
			ep: func(e *Endpoint) {
				e.ServicePrefix = "prod-"
				e.Ports = two
			},
			c:    container("x", map[string]string{"SERVICE_443_NAME": "tls"}),
			want: []svc{{testEP + ":80", "prod-x-80", 80, nil}, {testEP + ":443", "prod-tls", 443, nil}},
		},
		{
			name: "SERVICE_ID with one port is used in the plugin's namespace",
			ep:   func(e *Endpoint) { e.Ports = tcp80 },
			c:    container("x", nil, "SERVICE_ID=custom"),
			want: []svc{{"consul-overlay:custom", "x", 80, nil}},
		},
		{
			name: "SERVICE_ID from the driver options is prefixed too",
			ep:   func(e *Endpoint) { e.Options = map[string]string{"SERVICE_ID": "opt-id"} },
			want: []svc{{"consul-overlay:opt-id", "app-net", 0, nil}},
		},
		{
			name: "generic SERVICE_ID with several ports gets the port appended; per-port as is; both prefixed",
			ep:   func(e *Endpoint) { e.Ports = []Port{{"tcp", 80}, {"udp", 81}, {"tcp", 443}} },
			c:    container("x", nil, "SERVICE_ID=custom", "SERVICE_443_ID=tls-id"),
			want: []svc{
				{"consul-overlay:custom:80", "x-80", 80, nil},
				{"consul-overlay:custom:81:udp", "x-81", 81, []string{"udp"}},
				{"consul-overlay:tls-id", "x-443", 443, nil},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ep := baseEndpoint()
			if tt.ep != nil {
				tt.ep(&ep)
			}
			got := summarize(buildServices(owner{node: "node1"}, ep, tt.c))
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("services:\n got %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestBuildServicesAddressesAndMeta(t *testing.T) {
	ep := baseEndpoint()
	ep.IPv6 = netip.MustParseAddr("fd00::3")
	ep.Ports = []Port{{"tcp", 8080}}
	c := container("/web-1", map[string]string{"SERVICE_REGION": "eu", "SERVICE_8080_REGION": "eu-8080",
		"SERVICE_9090_OTHER": "not-mine", "SERVICE_CHECK_HTTP": "/health", "SERVICE_BAD.KEY": "x",
		"SERVICE_CONSUL-X": "reserved", "SERVICE_NODE": "ours-win"}, "SERVICE_ZONE=a")
	regs := buildServices(owner{node: "node1", hostID: "h-1"}, ep, c)
	if len(regs) != 1 {
		t.Fatalf("got %d services", len(regs))
	}
	r := regs[0]
	if r.Address != "10.1.2.3" {
		t.Errorf("Address = %q, want the IPv4 overlay address", r.Address)
	}
	wantTA := map[string]api.ServiceAddress{
		TaggedLANIPv4: {Address: "10.1.2.3", Port: 8080},
		TaggedLANIPv6: {Address: "fd00::3", Port: 8080},
	}
	if !reflect.DeepEqual(r.TaggedAddresses, wantTA) {
		t.Errorf("TaggedAddresses = %+v, want %+v", r.TaggedAddresses, wantTA)
	}
	wantMeta := map[string]string{
		MetaManagedBy: ManagedByValue, MetaNode: "node1", MetaHostID: "h-1", MetaNetwork: "app_net", MetaNetworkID: "net123",
		MetaEndpointID: testEP, MetaContainerID: c.ID, MetaContainerName: "web-1",
		"region": "eu-8080", "zone": "a",
	}
	if !reflect.DeepEqual(r.Meta, wantMeta) {
		t.Errorf("Meta = %v\nwant %v", r.Meta, wantMeta)
	}
	for k, v := range r.Meta {
		if len(k) > metaMaxKeyLen || len(v) > metaMaxValLen || strings.HasPrefix(k, "consul-") {
			t.Errorf("meta pair %q=%q breaks Consul's rules", k, v)
		}
	}
	if r.Check == nil || r.Check.HTTP != "http://10.1.2.3:8080/health" || r.Check.Interval != DefaultCheckInterval {
		t.Errorf("Check = %+v", r.Check)
	}

	// IPv6-only: Address is the IPv6 one, the check brackets it.
	ep.IPv4 = netip.Addr{}
	r = buildServices(owner{node: "node1"}, ep, container("x", nil, "SERVICE_CHECK_TCP=true"))[0]
	if r.Address != "fd00::3" || r.Check == nil || r.Check.TCP != "[fd00::3]:8080" {
		t.Errorf("IPv6-only: Address %q, Check %+v", r.Address, r.Check)
	}
	if _, ok := r.TaggedAddresses[TaggedLANIPv4]; ok {
		t.Errorf("IPv6-only has a lan_ipv4 tagged address: %+v", r.TaggedAddresses)
	}

	// Before metadata: container ID prefix in Meta, no name.
	ep = baseEndpoint()
	r = buildServices(owner{node: "node1"}, ep, nil)[0]
	if r.Meta[MetaContainerID] != "abcdef012345" || r.Meta[MetaContainerName] != "" {
		t.Errorf("Meta without metadata = %v", r.Meta)
	}
}

func TestBuildServicesMetaLimit(t *testing.T) {
	labels := map[string]string{}
	for i := range 100 {
		labels["SERVICE_K"+strings.Repeat("x", i%3)+string(rune('a'+i%26))+string(rune('a'+i/26))] = "v"
	}
	labels["SERVICE_LONG"] = strings.Repeat("v", 513)
	labels["SERVICE_"+strings.Repeat("K", 129)] = "v"
	r := buildServices(owner{node: "n"}, baseEndpoint(), container("x", labels))[0]
	if len(r.Meta) > metaMaxPairs {
		t.Fatalf("%d meta pairs, Consul allows %d", len(r.Meta), metaMaxPairs)
	}
	if r.Meta[MetaManagedBy] != ManagedByValue || r.Meta[MetaEndpointID] != testEP {
		t.Fatalf("own meta keys lost to attributes: %v", r.Meta)
	}
	if _, ok := r.Meta["long"]; ok {
		t.Error("a value over 512 characters was kept")
	}
}

func TestBuildCheck(t *testing.T) {
	tests := []struct {
		name string
		env  []string
		port int
		want *api.AgentServiceCheck
	}{
		{"none", nil, 80, nil},
		{"http", []string{"SERVICE_CHECK_HTTP=health", "SERVICE_CHECK_INTERVAL=2s", "SERVICE_CHECK_TIMEOUT=1s", "SERVICE_CHECK_HTTP_METHOD=HEAD"}, 80,
			&api.AgentServiceCheck{HTTP: "http://10.1.2.3:80/health", Interval: "2s", Timeout: "1s", Method: "HEAD"}},
		{"https skip verify", []string{"SERVICE_CHECK_HTTPS=/h", "SERVICE_CHECK_TLS_SKIP_VERIFY=true"}, 443,
			&api.AgentServiceCheck{HTTP: "https://10.1.2.3:443/h", Interval: "10s", TLSSkipVerify: true}},
		{"http wins over tcp", []string{"SERVICE_CHECK_TCP=true", "SERVICE_CHECK_HTTP=/"}, 80,
			&api.AgentServiceCheck{HTTP: "http://10.1.2.3:80/", Interval: "10s"}},
		{"tcp", []string{"SERVICE_CHECK_TCP=true", "SERVICE_CHECK_INITIAL_STATUS=passing", "SERVICE_CHECK_DEREGISTER_AFTER=5m"}, 6379,
			&api.AgentServiceCheck{TCP: "10.1.2.3:6379", Interval: "10s", Status: "passing", DeregisterCriticalServiceAfter: "5m"}},
		{"tcp=false", []string{"SERVICE_CHECK_TCP=false"}, 80, nil},
		{"tcp needs a port", []string{"SERVICE_CHECK_TCP=true"}, 0, nil},
		{"http without port", []string{"SERVICE_CHECK_HTTP=/x"}, 0,
			&api.AgentServiceCheck{HTTP: "http://10.1.2.3/x", Interval: "10s"}},
		{"grpc", []string{"SERVICE_CHECK_GRPC=true", "SERVICE_CHECK_GRPC_USE_TLS=true"}, 50051,
			&api.AgentServiceCheck{GRPC: "10.1.2.3:50051", GRPCUseTLS: true, Interval: "10s"}},
		{"bad durations and status are dropped", []string{"SERVICE_CHECK_TCP=1", "SERVICE_CHECK_INTERVAL=soon",
			"SERVICE_CHECK_TIMEOUT=-1s", "SERVICE_CHECK_INITIAL_STATUS=great"}, 80,
			&api.AgentServiceCheck{TCP: "10.1.2.3:80", Interval: "10s"}},
		{"per-port check key", []string{"SERVICE_CHECK_HTTP=/generic", "SERVICE_80_CHECK_HTTP=/p80"}, 80,
			&api.AgentServiceCheck{HTTP: "http://10.1.2.3:80/p80", Interval: "10s"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ep := baseEndpoint()
			if tt.port > 0 {
				ep.Ports = []Port{{"tcp", tt.port}}
			}
			regs := buildServices(owner{node: "n"}, ep, container("x", nil, tt.env...))
			if got := regs[0].Check; !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("check = %+v, want %+v", got, tt.want)
			}
			for k := range regs[0].Meta {
				if strings.HasPrefix(k, "check_") {
					t.Errorf("check setting %q leaked into Meta", k)
				}
			}
		})
	}
}

func TestParseExposedPorts(t *testing.T) {
	tests := []struct {
		name    string
		json    string
		want    []Port
		wantErr bool
	}{
		{"null", `null`, nil, false},
		{"empty", `[]`, []Port{}, false},
		{"tcp udp sctp sorted and deduplicated", `[{"Proto":17,"Port":53},{"Proto":6,"Port":80},{"Proto":6,"Port":53},{"Proto":132,"Port":9},{"Proto":6,"Port":80}]`,
			[]Port{{"sctp", 9}, {"tcp", 53}, {"udp", 53}, {"tcp", 80}}, false},
		{"unknown proto", `[{"Proto":1,"Port":80}]`, nil, true},
		{"port 0", `[{"Proto":6,"Port":0}]`, nil, true},
		{"port too big", `[{"Proto":6,"Port":65536}]`, nil, true},
		{"fraction", `[{"Proto":6,"Port":80.5}]`, nil, true},
		{"missing port", `[{"Proto":6}]`, nil, true},
		{"string port", `[{"Proto":6,"Port":"80"}]`, nil, true},
		{"not a list", `{"Proto":6,"Port":80}`, nil, true},
		{"not objects", `[80]`, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var v any
			if err := json.Unmarshal([]byte(tt.json), &v); err != nil {
				t.Fatal(err)
			}
			for _, in := range []any{v, tt.json, []byte(tt.json)} {
				got, err := ParseExposedPorts(in)
				if (err != nil) != tt.wantErr {
					t.Fatalf("ParseExposedPorts(%T %s) error = %v, want error %v", in, tt.json, err, tt.wantErr)
				}
				if err == nil && !reflect.DeepEqual(got, tt.want) {
					t.Fatalf("ParseExposedPorts(%T %s) = %#v, want %#v", in, tt.json, got, tt.want)
				}
			}
		})
	}
	if _, err := ParseExposedPorts(42); err == nil {
		t.Error("ParseExposedPorts(42) succeeded")
	}
	if _, err := ParseExposedPorts(`"[]"`); err == nil {
		t.Error("ParseExposedPorts of a JSON string holding JSON succeeded")
	}
}

func FuzzParseExposedPorts(f *testing.F) {
	for _, s := range []string{`[{"Proto":6,"Port":80}]`, `[]`, `null`, `[{"Proto":17,"Port":65535},{"Proto":132,"Port":1}]`, `[{"Proto":6,"Port":1e3}]`, `"x"`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		var v any
		if json.Unmarshal([]byte(s), &v) != nil {
			return
		}
		got, err := ParseExposedPorts(v)
		if err != nil {
			return
		}
		if !slices.IsSortedFunc(got, comparePorts) {
			t.Fatalf("not sorted: %v", got)
		}
		for i, p := range got {
			if p.Port < 1 || p.Port > 65535 || protoOrder[p.Proto] == 0 && p.Proto != "tcp" {
				t.Fatalf("bad port %+v from %q", p, s)
			}
			if i > 0 && got[i-1] == p {
				t.Fatalf("duplicate %+v from %q", p, s)
			}
		}
		// Round trip through Docker's wire form.
		nums := map[string]int{"tcp": 6, "udp": 17, "sctp": 132}
		var wire []map[string]int
		for _, p := range got {
			wire = append(wire, map[string]int{"Proto": nums[p.Proto], "Port": p.Port})
		}
		b, _ := json.Marshal(wire)
		again, err := ParseExposedPorts(b)
		if err != nil || (len(got) > 0 && !reflect.DeepEqual(again, got)) {
			t.Fatalf("round trip of %v: %v, %v", got, again, err)
		}
		// And the services built from them are distinct.
		ep := baseEndpoint()
		ep.Ports = got
		ids := map[string]bool{}
		for _, r := range buildServices(owner{node: "n"}, ep, nil) {
			if ids[r.ID] {
				t.Fatalf("duplicate service ID %s for ports %v", r.ID, got)
			}
			ids[r.ID] = true
		}
	})
}

func TestContainerIDFromSandboxKey(t *testing.T) {
	tests := map[string]string{
		"/var/run/docker/netns/1a2b3c4d5e6f":   "1a2b3c4d5e6f",
		"/run/docker/netns/0123456789ab":       "0123456789ab",
		"/custom/exec-root/netns/ffffffffffff": "ffffffffffff",
		"/var/run/docker/netns/default":        "",
		"/var/run/docker/netns/1a2b3c4d5e6":    "",
		"/var/run/docker/netns/1A2B3C4D5E6F":   "",
		"/var/run/docker/netns/1a2b3c4d5e6g":   "",
		"/var/run/docker/netns/":               "",
		"":                                     "",
		"1a2b3c4d5e6f":                         "1a2b3c4d5e6f",
		"/proc/123/ns/net":                     "",
	}
	for key, want := range tests {
		if got := ContainerIDFromSandboxKey(key); got != want {
			t.Errorf("ContainerIDFromSandboxKey(%q) = %q, want %q", key, got, want)
		}
	}
}

func TestDNSSafe(t *testing.T) {
	tests := map[string]string{
		"web":                   "web",
		"my_app.1":              "my-app-1",
		"--x--":                 "x",
		"__":                    "",
		strings.Repeat("a", 70): strings.Repeat("a", 63),
		"ünïcode":               "n-code",
	}
	for in, want := range tests {
		if got := dnsSafe(in); got != want {
			t.Errorf("dnsSafe(%q) = %q, want %q", in, got, want)
		}
	}
}
