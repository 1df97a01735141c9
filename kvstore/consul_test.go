package kvstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"consul-overlay/internal/testenv"
)

func randomHex(t testing.TB) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func newConsul(t *testing.T, cfg ConsulConfig) *Consul {
	t.Helper()
	s, err := NewConsul(cfg)
	if err != nil {
		t.Fatalf("NewConsul(%+v): %v", cfg, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// consulBackend gives each test its own key root on the shared agent.
func consulBackend(agent *testenv.ConsulAgent) newBackend {
	return func(t *testing.T) openFunc {
		root := "test-" + randomHex(t) + "/"
		return func(t *testing.T, prefix string) Store {
			return newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: root + prefix})
		}
	}
}

func TestConsul(t *testing.T) {
	agent := testenv.StartConsul(t)

	t.Run("Contract", func(t *testing.T) { runContract(t, consulBackend(agent)) })
	t.Run("FencedContract", func(t *testing.T) { runContract(t, fencedBackend(consulBackend(agent)), "TxnInvalid") })
	t.Run("LeanWatchContract", func(t *testing.T) { runContract(t, leanBackend(consulBackend(agent))) })
	t.Run("Fence", func(t *testing.T) { testFence(t, consulBackend(agent)(t)) })

	t.Run("Contention", func(t *testing.T) {
		// 8 clients, as if on 8 hosts, 1,000 successful increments in all.
		prefix := "contention-" + randomHex(t)
		stores := make([]Store, 8)
		for i := range stores {
			stores[i] = newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: prefix})
		}
		runContention(t, stores, 1000)
	})

	t.Run("NodeName", func(t *testing.T) {
		s := newConsul(t, ConsulConfig{Address: agent.Addr})
		got, err := s.NodeName(bg(t))
		if err != nil || got != agent.NodeName {
			t.Fatalf("NodeName() = %q, %v; want %q", got, err, agent.NodeName)
		}
		if s.Address() != agent.Addr || s.Client() == nil || s.Prefix() != DefaultPrefix {
			t.Fatalf("Address() = %q, Client() = %v, Prefix() = %q", s.Address(), s.Client(), s.Prefix())
		}
	})

	t.Run("RefusedWriteIsNotAnOutage", func(t *testing.T) {
		s := newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: "big-" + randomHex(t)})
		err := s.Put(bg(t), "big", make([]byte, 512*1024+1)) // Consul answers 413
		if err == nil || errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), agent.Addr) {
			t.Fatalf("Put of an oversized value = %v, want a plain error naming %s", err, agent.Addr)
		}
	})

	t.Run("CallerCancelIsNotAnOutage", func(t *testing.T) {
		s := newConsul(t, ConsulConfig{Address: agent.Addr})
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := s.Get(ctx, "k")
		if !errors.Is(err, context.Canceled) || errors.Is(err, ErrUnavailable) || errors.Is(err, ErrNotFound) {
			t.Fatalf("Get with a cancelled context = %v, want context.Canceled only", err)
		}
	})
}

// storeCalls exercises every I/O method once.
func storeCalls(s Store) map[string]func(ctx context.Context) error {
	return map[string]func(ctx context.Context) error{
		"Get":       func(ctx context.Context) error { _, err := s.Get(ctx, "k"); return err },
		"List":      func(ctx context.Context) error { _, err := s.List(ctx, ""); return err },
		"Put":       func(ctx context.Context) error { return s.Put(ctx, "k", []byte("v")) },
		"Create":    func(ctx context.Context) error { return s.Create(ctx, "k", []byte("v")) },
		"CAS":       func(ctx context.Context) error { return s.CAS(ctx, "k", []byte("v"), 7) },
		"Delete":    func(ctx context.Context) error { return s.Delete(ctx, "k") },
		"DeleteCAS": func(ctx context.Context) error { return s.DeleteCAS(ctx, "k", 7) },
		"Txn": func(ctx context.Context) error {
			return s.Txn(ctx, []Op{{Verb: OpCheckNotExists, Key: "k"}, {Verb: OpSet, Key: "k", Value: []byte("v")}})
		},
	}
}

// wantUnavailable checks that every call fails with ErrUnavailable naming
// addr, within limit.
func wantUnavailable(t *testing.T, s Store, addr string, limit time.Duration) {
	t.Helper()
	for name, call := range storeCalls(s) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		start := time.Now()
		err := call(ctx)
		elapsed := time.Since(start)
		cancel()
		switch {
		case !errors.Is(err, ErrUnavailable):
			t.Errorf("%s = %v, want ErrUnavailable", name, err)
		case errors.Is(err, ErrNotFound) || errors.Is(err, ErrConflict):
			t.Errorf("%s = %v, also ErrNotFound/ErrConflict", name, err)
		case !strings.Contains(err.Error(), addr):
			t.Errorf("%s = %v, does not name %s", name, err, addr)
		case elapsed > limit:
			t.Errorf("%s took %s, want within %s", name, elapsed, limit)
		}
	}
}

func TestConsulOutage(t *testing.T) {
	agent := testenv.StartConsul(t)
	baseline := runtime.NumGoroutine()
	const timeout = 2 * time.Second
	cfg := ConsulConfig{Address: agent.Addr, Prefix: "outage", Timeout: timeout}
	s, err := NewConsul(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	writer, err := NewConsul(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Close()
	mustPut(t, writer, "k", "before")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, err := s.Watch(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if got := render(next(t, ch, 5*time.Second)); got != "k=before" {
		t.Fatalf("initial snapshot %q", got)
	}

	agent.Stop()
	t.Logf("agent %s stopped", agent.Addr)
	wantUnavailable(t, s, agent.Addr, timeout+time.Second)
	if _, err := s.NodeName(context.Background()); !errors.Is(err, ErrUnavailable) {
		t.Errorf("NodeName during the outage = %v, want ErrUnavailable", err)
	}
	select {
	case ps, ok := <-ch:
		if !ok {
			t.Fatal("watch channel closed during the outage")
		}
		t.Fatalf("watch delivered %q during the outage", render(ps))
	default:
	}

	agent.Start()
	t.Logf("agent %s restarted", agent.Addr)
	// Dev mode starts empty: the watch, still running, delivers that.
	if got := next(t, ch, 10*time.Second); len(got) != 0 {
		t.Fatalf("snapshot after restart %q, want empty (dev agent lost its data)", render(got))
	}
	mustPut(t, writer, "k", "after")
	if got := render(next(t, ch, time.Second)); got != "k=after" {
		t.Fatalf("snapshot after restart and put %q, want k=after", got)
	}

	cancel()
	waitClosed(t, ch, 2*time.Second)
	waitNoWatchGoroutines(t, 2*time.Second)
	s.Close()
	writer.Close()
	waitGoroutines(t, baseline, 5*time.Second)
}

// waitGoroutines fails unless the goroutine count falls to at most want
// within d (connections closing take a moment).
func waitGoroutines(t *testing.T, want int, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		n := runtime.NumGoroutine()
		if n <= want {
			return
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("%d goroutines, want at most %d:\n%s", n, want, buf)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestConsulUnansweredRequestsTimeOut points the store at a server that
// accepts connections and never answers: every call must give up after
// Timeout with ErrUnavailable.
func TestConsulUnansweredRequestsTimeOut(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
	)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})

	const timeout = 500 * time.Millisecond
	addr := ln.Addr().String()
	s := newConsul(t, ConsulConfig{Address: addr, Timeout: timeout})
	wantUnavailable(t, s, addr, timeout+time.Second)

	// A watch on it does not hang its owner either.
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := s.Watch(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // let the first query get stuck
	cancel()
	waitClosed(t, ch, 2*time.Second)
	waitNoWatchGoroutines(t, 2*time.Second)
}

func TestConsulServerErrors(t *testing.T) {
	tests := []struct {
		code            int
		wantUnavailable bool
	}{
		{http.StatusInternalServerError, true}, // e.g. "No cluster leader"
		{http.StatusServiceUnavailable, true},
		{http.StatusTooManyRequests, true},
		{http.StatusForbidden, false}, // ACL denied: retrying will not help
		{http.StatusBadRequest, false},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprint(tt.code), func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				http.Error(w, "test says "+http.StatusText(tt.code), tt.code)
			}))
			defer srv.Close()
			addr := strings.TrimPrefix(srv.URL, "http://")
			s := newConsul(t, ConsulConfig{Address: addr, Timeout: time.Second})
			for name, call := range storeCalls(s) {
				err := call(bg(t))
				if err == nil {
					t.Errorf("%s succeeded against a server answering %d", name, tt.code)
					continue
				}
				if errors.Is(err, ErrUnavailable) != tt.wantUnavailable {
					t.Errorf("%s = %v; ErrUnavailable %v, want %v", name, err, !tt.wantUnavailable, tt.wantUnavailable)
				}
				if errors.Is(err, ErrNotFound) || errors.Is(err, ErrConflict) {
					t.Errorf("%s = %v, want neither ErrNotFound nor ErrConflict", name, err)
				}
				if !strings.Contains(err.Error(), addr) {
					t.Errorf("%s = %v, does not name %s", name, err, addr)
				}
			}
		})
	}
}

func TestConsulConfigFromEnv(t *testing.T) {
	tests := []struct {
		name      string
		env       map[string]string
		want      ConsulConfig
		wantFound bool
		wantErr   string // substring; "" means success
	}{
		{
			name: "empty",
			want: ConsulConfig{Prefix: DefaultPrefix},
		},
		{
			name:      "host:port",
			env:       map[string]string{"CONSUL_HTTP_ADDR": "10.0.0.1:8500"},
			want:      ConsulConfig{Address: "10.0.0.1:8500", Prefix: DefaultPrefix},
			wantFound: true,
		},
		{
			name:      "http URL",
			env:       map[string]string{"CONSUL_HTTP_ADDR": "http://consul.local:8500"},
			want:      ConsulConfig{Address: "consul.local:8500", Scheme: "http", Prefix: DefaultPrefix},
			wantFound: true,
		},
		{
			name:      "https URL with trailing slash",
			env:       map[string]string{"CONSUL_HTTP_ADDR": "https://[::1]:8501/"},
			want:      ConsulConfig{Address: "[::1]:8501", Scheme: "https", Prefix: DefaultPrefix},
			wantFound: true,
		},
		{
			name: "everything",
			env: map[string]string{
				"CONSUL_HTTP_ADDR":       "127.0.0.1:8501",
				"CONSUL_HTTP_SSL":        "true",
				"CONSUL_HTTP_TOKEN":      " secret ",
				"CONSUL_CACERT":          "/etc/ca.pem",
				"CONSUL_CLIENT_CERT":     "/etc/c.pem",
				"CONSUL_CLIENT_KEY":      "/etc/k.pem",
				"CONSUL_TLS_SERVER_NAME": "server.dc1.consul",
				"KV_PREFIX":              "/my/prefix",
			},
			want: ConsulConfig{
				Address: "127.0.0.1:8501", Scheme: "https", Token: "secret",
				CAFile: "/etc/ca.pem", CertFile: "/etc/c.pem", KeyFile: "/etc/k.pem",
				TLSServerName: "server.dc1.consul", Prefix: "my/prefix/",
			},
			wantFound: true,
		},
		{
			name:      "https URL wins over SSL=false",
			env:       map[string]string{"CONSUL_HTTP_ADDR": "https://h:1", "CONSUL_HTTP_SSL": "false"},
			want:      ConsulConfig{Address: "h:1", Scheme: "https", Prefix: DefaultPrefix},
			wantFound: true,
		},
		{
			name: "prefix gets its slash",
			env:  map[string]string{"KV_PREFIX": "overlay"},
			want: ConsulConfig{Prefix: "overlay/"},
		},
		{name: "no port", env: map[string]string{"CONSUL_HTTP_ADDR": "consul.local"}, wantFound: true, wantErr: "CONSUL_HTTP_ADDR"},
		{name: "port zero", env: map[string]string{"CONSUL_HTTP_ADDR": "h:0"}, wantFound: true, wantErr: "CONSUL_HTTP_ADDR"},
		{name: "port too big", env: map[string]string{"CONSUL_HTTP_ADDR": "h:65536"}, wantFound: true, wantErr: "CONSUL_HTTP_ADDR"},
		{name: "empty host", env: map[string]string{"CONSUL_HTTP_ADDR": ":8500"}, wantFound: true, wantErr: "CONSUL_HTTP_ADDR"},
		{name: "unix socket", env: map[string]string{"CONSUL_HTTP_ADDR": "unix:///run/consul.sock"}, wantFound: true, wantErr: "CONSUL_HTTP_ADDR"},
		{name: "path", env: map[string]string{"CONSUL_HTTP_ADDR": "http://h:8500/consul"}, wantFound: true, wantErr: "CONSUL_HTTP_ADDR"},
		{name: "bad SSL", env: map[string]string{"CONSUL_HTTP_SSL": "yes please"}, wantErr: "CONSUL_HTTP_SSL"},
		{name: "token with space", env: map[string]string{"CONSUL_HTTP_TOKEN": "a b"}, wantErr: "CONSUL_HTTP_TOKEN"},
		{name: "cert without key", env: map[string]string{"CONSUL_CLIENT_CERT": "/c.pem"}, wantErr: "CONSUL_CLIENT_KEY"},
		{name: "key without cert", env: map[string]string{"CONSUL_CLIENT_KEY": "/k.pem"}, wantErr: "CONSUL_CLIENT_CERT"},
		{name: "slash prefix", env: map[string]string{"KV_PREFIX": "/"}, wantErr: "KV_PREFIX"},
		{name: "invalid UTF-8 prefix", env: map[string]string{"KV_PREFIX": "a\xffb"}, wantErr: "KV_PREFIX"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, found, err := ConsulConfigFromEnv(func(k string) string { return tt.env[k] })
			if found != tt.wantFound {
				t.Errorf("found = %v, want %v", found, tt.wantFound)
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one naming %s", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("err = %v", err)
			}
			if got != tt.want {
				t.Fatalf("config = %+v\nwant     %+v", got, tt.want)
			}
			// What the environment gives, NewConsul accepts.
			s, err := NewConsul(ConsulConfig{Address: got.Address, Scheme: got.Scheme, Token: got.Token, Prefix: got.Prefix})
			if err != nil {
				t.Fatalf("NewConsul(from env): %v", err)
			}
			s.Close()
		})
	}
}

func TestNewConsulConfig(t *testing.T) {
	tests := []struct {
		name    string
		cfg     ConsulConfig
		want    ConsulConfig // after normalize, when no error
		wantErr string
	}{
		{name: "zero", cfg: ConsulConfig{}, want: ConsulConfig{Address: DefaultConsulAddress, Scheme: "http", Prefix: DefaultPrefix, Timeout: DefaultTimeout}},
		{name: "https address", cfg: ConsulConfig{Address: "https://h:8501", Prefix: "p", Timeout: time.Second},
			want: ConsulConfig{Address: "h:8501", Scheme: "https", Prefix: "p/", Timeout: time.Second}},
		{name: "scheme upper case", cfg: ConsulConfig{Address: "h:1", Scheme: "HTTPS"},
			want: ConsulConfig{Address: "h:1", Scheme: "https", Prefix: DefaultPrefix, Timeout: DefaultTimeout}},
		{name: "bad scheme", cfg: ConsulConfig{Scheme: "ftp"}, wantErr: "scheme"},
		{name: "bad address", cfg: ConsulConfig{Address: "nope"}, wantErr: "address"},
		{name: "cert without key", cfg: ConsulConfig{CertFile: "/c"}, wantErr: "both or neither"},
		{name: "negative timeout", cfg: ConsulConfig{Timeout: -time.Second}, wantErr: "timeout"},
		{name: "bad prefix", cfg: ConsulConfig{Prefix: "//"}, wantErr: "prefix"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.cfg.normalize()
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("normalize() err = %v, want one about %s", err, tt.wantErr)
				}
				if _, err := NewConsul(tt.cfg); err == nil {
					t.Fatalf("NewConsul accepted %+v", tt.cfg)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("normalize() = %+v, %v\nwant         %+v", got, err, tt.want)
			}
		})
	}

	t.Run("missing TLS files", func(t *testing.T) {
		_, err := NewConsul(ConsulConfig{Scheme: "https", CertFile: "/nonexistent/c.pem", KeyFile: "/nonexistent/k.pem"})
		if err == nil || !strings.Contains(err.Error(), "/nonexistent/c.pem") {
			t.Fatalf("NewConsul with missing cert files = %v, want an error naming the file", err)
		}
	})
}

// TestReadsAreConsistent: Get, List and Watch ask Consul for consistent
// reads, so a restarted server that has not applied its log yet refuses
// them (ErrUnavailable, retried) instead of answering from an old state
// (a watch would withdraw live peers, a missing record pass for deleted).
func TestReadsAreConsistent(t *testing.T) {
	var mu sync.Mutex
	seen := map[string]bool{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.URL.Path, "/v1/kv/") {
			http.NotFound(w, r)
			return
		}
		kind := "get"
		if r.URL.Query().Has("recurse") {
			kind = "list"
			if r.URL.Query().Has("index") {
				kind = "watch"
			}
		}
		mu.Lock()
		seen[kind] = true
		if !r.URL.Query().Has("consistent") {
			seen[kind+" not consistent"] = true
		}
		mu.Unlock()
		w.Header().Set("X-Consul-Index", "7")
		w.Write([]byte(`[{"Key":"p/k","Value":"dg==","ModifyIndex":7}]`))
	}))
	defer srv.Close()
	s := newConsul(t, ConsulConfig{Address: strings.TrimPrefix(srv.URL, "http://"), Prefix: "p/", Timeout: time.Second})
	if _, err := s.Get(bg(t), "k"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.List(bg(t), ""); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(bg(t))
	defer cancel()
	ch, err := s.Watch(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	<-ch
	// The second query of the watch blocks on the index.
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		done := seen["watch"]
		mu.Unlock()
		if done || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	mu.Lock()
	defer mu.Unlock()
	for _, kind := range []string{"get", "list", "watch"} {
		if !seen[kind] {
			t.Errorf("no %s seen", kind)
		}
		if seen[kind+" not consistent"] {
			t.Errorf("%s without ?consistent", kind)
		}
	}
}

// TestConsulWatchOfEmptyPrefixIsPaced: Consul wakes a blocking list of a
// prefix without keys on every write anywhere in the store. The watch
// must not follow each of those wake-ups with a new query (with many
// hosts that is hosts × writes), yet must still deliver the first key
// that appears under its prefix.
func TestConsulWatchOfEmptyPrefixIsPaced(t *testing.T) {
	agent := testenv.StartConsul(t)
	root := "test-" + randomHex(t) + "/"
	var (
		mu      sync.Mutex
		queries int // blocking lists of root+"empty/"
	)
	target := &url.URL{Scheme: "http", Host: agent.Addr}
	rp := httputil.NewSingleHostReverseProxy(target)
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/kv/"+root+"empty/" && r.URL.Query().Get("index") != "" {
			mu.Lock()
			queries++
			mu.Unlock()
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(proxy.Close)
	s := newConsul(t, ConsulConfig{Address: strings.TrimPrefix(proxy.URL, "http://"), Prefix: root})
	w := newConsul(t, ConsulConfig{Address: agent.Addr, Prefix: root})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ch, err := s.Watch(ctx, "empty/")
	if err != nil {
		t.Fatal(err)
	}
	if snap := <-ch; len(snap) != 0 {
		t.Fatalf("first snapshot of an empty prefix: %d pairs", len(snap))
	}
	time.Sleep(100 * time.Millisecond) // the first blocking query is out
	mu.Lock()
	before := queries
	mu.Unlock()
	const writes = 40
	start := time.Now()
	for i := range writes {
		if err := w.Put(ctx, fmt.Sprintf("other/%d", i), []byte("x")); err != nil {
			t.Fatal(err)
		}
		time.Sleep(25 * time.Millisecond)
	}
	elapsed := time.Since(start)
	mu.Lock()
	n := queries - before
	mu.Unlock()
	// One query per write would be 40; paced, it is about one per
	// watchEmptyPace.
	if limit := writes / 4; n > limit {
		t.Errorf("the watch of an empty prefix queried %d times during %d writes elsewhere in %s; want at most %d", n, writes, elapsed.Round(time.Millisecond), limit)
	}
	if err := w.Put(ctx, "empty/k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	put := time.Now()
	select {
	case snap := <-ch:
		if len(snap) != 1 || snap[0].Key != "empty/k" {
			t.Fatalf("snapshot after the first key: %+v", snap)
		}
		t.Logf("%d queries during %d writes elsewhere; the first key delivered after %s", n, writes, time.Since(put).Round(time.Millisecond))
	case <-time.After(10 * time.Second):
		t.Fatal("the first key under the watched prefix was not delivered within 10s")
	}
}
