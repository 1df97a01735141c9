package kvstore

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"consul-overlay/internal/testenv"
)

// connCounter counts the connections a test server accepted.
type connCounter struct{ n atomic.Int32 }

func (c *connCounter) track(srv *httptest.Server) {
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			c.n.Add(1)
		}
	}
}

// blocked counts the requests to /block being served.
var blocked atomic.Int32

// watchTestServer serves /ok (a short answer), /big (an answer larger than
// the connection's buffer, chunked), /close (an answer that closes the
// connection) and /block (an answer only when release is closed).
func watchTestServer(t *testing.T, tlsOn bool) (*httptest.Server, *connCounter, chan struct{}) {
	t.Helper()
	release := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/ok", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok "+r.URL.RawQuery) })
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		for range 64 {
			io.WriteString(w, strings.Repeat("x", 1000))
			w.(http.Flusher).Flush()
		}
	})
	mux.HandleFunc("/close", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		io.WriteString(w, "bye")
	})
	mux.HandleFunc("/block", func(w http.ResponseWriter, r *http.Request) {
		blocked.Add(1)
		select {
		case <-release:
		case <-r.Context().Done():
		}
		io.WriteString(w, "released")
	})
	srv := httptest.NewUnstartedServer(mux)
	cc := &connCounter{}
	cc.track(srv)
	if tlsOn {
		// An agent that offers HTTP/2 too, as Go's servers do over TLS.
		srv.EnableHTTP2 = true
		srv.StartTLS()
	} else {
		srv.Start()
	}
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
		srv.Close()
	})
	return srv, cc, release
}

func newTestWatchTransport(t *testing.T, srv *httptest.Server, fallback http.RoundTripper) *watchTransport {
	t.Helper()
	u, err := url.Parse(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	var tlsCfg *tls.Config
	if u.Scheme == "https" {
		tlsCfg = srv.Client().Transport.(*http.Transport).TLSClientConfig.Clone()
		tlsCfg.NextProtos = []string{"h2", "http/1.1"} // as the shared transport's config becomes
	}
	wt := newWatchTransport(u.Host, (&net.Dialer{Timeout: time.Second}).DialContext, tlsCfg, time.Second, fallback)
	t.Cleanup(wt.closeAll)
	return wt
}

func get(t *testing.T, c *http.Client, ctx context.Context, u string) (string, error) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// TestWatchTransportReuse: answers read to their end give their connection
// back, over plain HTTP and TLS (HTTP/1.1 also where HTTP/2 is offered): a run of requests, short and long (chunked),
// uses one connection; an answer that says Connection: close, or a body
// closed before its end, costs no wrong answer after it.
func TestWatchTransportReuse(t *testing.T) {
	for _, tlsOn := range []bool{false, true} {
		name := "http"
		if tlsOn {
			name = "https"
		}
		t.Run(name, func(t *testing.T) {
			srv, cc, _ := watchTestServer(t, tlsOn)
			c := &http.Client{Transport: newTestWatchTransport(t, srv, nil)}
			ctx := context.Background()
			for i := range 5 {
				got, err := get(t, c, ctx, srv.URL+"/ok?i="+string(rune('0'+i)))
				if err != nil || got != "ok i="+string(rune('0'+i)) {
					t.Fatalf("request %d: %q, %v", i, got, err)
				}
				got, err = get(t, c, ctx, srv.URL+"/big")
				if err != nil || len(got) != 64000 {
					t.Fatalf("big answer %d: %d bytes, %v", i, len(got), err)
				}
			}
			if n := cc.n.Load(); n != 1 {
				t.Fatalf("10 requests in a row used %d connections, want 1", n)
			}
			if got, err := get(t, c, ctx, srv.URL+"/close"); err != nil || got != "bye" {
				t.Fatalf("close answer: %q, %v", got, err)
			}
			// A body closed unread: drained, and the next answer is its own.
			req, _ := http.NewRequest(http.MethodGet, srv.URL+"/big", nil)
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 10)
			if _, err := io.ReadFull(resp.Body, buf); err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if _, err := resp.Body.Read(buf); !errors.Is(err, errWatchConnClosed) {
				t.Fatalf("read after close: %v, want %v", err, errWatchConnClosed)
			}
			if got, err := get(t, c, ctx, srv.URL+"/ok?after"); err != nil || got != "ok after" {
				t.Fatalf("after a body closed early: %q, %v", got, err)
			}
			if n := cc.n.Load(); n != 2 {
				t.Fatalf("connections: %d, want 2 (one more after Connection: close)", n)
			}
		})
	}
}

// TestWatchTransportIdleClosed: a connection the server closed while it was
// idle in the pool is dropped before use, for a read as for a write (which
// is never sent twice: this is what spares it), over HTTP and TLS.
func TestWatchTransportIdleClosed(t *testing.T) {
	for _, tlsOn := range []bool{false, true} {
		srv, cc, _ := watchTestServer(t, tlsOn)
		c := &http.Client{Transport: newTestWatchTransport(t, srv, nil)}
		ctx := context.Background()
		if _, err := get(t, c, ctx, srv.URL+"/ok"); err != nil {
			t.Fatal(err)
		}
		srv.CloseClientConnections()
		time.Sleep(20 * time.Millisecond) // the close reaches our end
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/ok?write", strings.NewReader("{}"))
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("tls %v: a write after the server closed the idle connection: %v", tlsOn, err)
		}
		resp.Body.Close()
		srv.CloseClientConnections()
		time.Sleep(20 * time.Millisecond)
		if got, err := get(t, c, ctx, srv.URL+"/ok?again"); err != nil || got != "ok again" {
			t.Fatalf("tls %v: a read after the server closed the idle connection: %q, %v", tlsOn, got, err)
		}
		if n := cc.n.Load(); n != 3 {
			t.Fatalf("tls %v: connections: %d, want 3", tlsOn, n)
		}
	}
}

// TestWatchTransportCancel: a blocking request ends as soon as its context
// does, with the context's error, and its connection is not reused.
func TestWatchTransportCancel(t *testing.T) {
	srv, cc, _ := watchTestServer(t, false)
	c := &http.Client{Transport: newTestWatchTransport(t, srv, nil)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := get(t, c, ctx, srv.URL+"/block")
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled request: %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a cancelled request did not end")
	}
	// A deadline that passes while the answer's header is awaited.
	dctx, dcancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer dcancel()
	if _, err := get(t, c, dctx, srv.URL+"/block"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("request past its deadline: %v, want context.DeadlineExceeded", err)
	}
	if got, err := get(t, c, context.Background(), srv.URL+"/ok"); err != nil || got != "ok " {
		t.Fatalf("after cancelled requests: %q, %v", got, err)
	}
	if n := cc.n.Load(); n != 3 {
		t.Fatalf("connections: %d, want 3 (a cancelled request's connection is not reused)", n)
	}
}

// TestWatchTransportGoroutines: what the transport is for. Requests held
// open cost no goroutine of the transport's, where net/http's Transport runs
// a reader and a writer a connection (counted the same way as a check).
func TestWatchTransportGoroutines(t *testing.T) {
	const held = 20
	for _, tc := range []struct {
		name string
		rt   func(*httptest.Server) http.RoundTripper
		want int
	}{
		{"watch transport", func(srv *httptest.Server) http.RoundTripper { return newTestWatchTransport(t, srv, nil) }, 0},
		{"net/http transport", func(*httptest.Server) http.RoundTripper {
			return &http.Transport{MaxIdleConnsPerHost: held}
		}, 2 * held},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, _, release := watchTestServer(t, false)
			c := &http.Client{Transport: tc.rt(srv)}
			errs := make(chan error, held)
			for range held {
				go func() {
					got, err := get(t, c, context.Background(), srv.URL+"/block")
					if err == nil && got != "released" {
						err = errors.New("answer " + got)
					}
					errs <- err
				}()
			}
			deadline := time.Now().Add(5 * time.Second)
			for blocked.Load() < held && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			if n := blocked.Load(); n < held {
				t.Fatalf("%d of %d requests reached the server", n, held)
			}
			if n := transportGoroutines(); n != tc.want {
				t.Fatalf("%d requests held open: %d goroutines of net/http's connections, want %d", held, n, tc.want)
			}
			close(release)
			for range held {
				if err := <-errs; err != nil {
					t.Fatal(err)
				}
			}
			blocked.Store(0)
		})
	}
}

// transportGoroutines counts the goroutines running net/http's client
// connection loops.
func transportGoroutines() int {
	stacks := allStacks()
	return strings.Count(stacks, "net/http.(*persistConn).readLoop(") + strings.Count(stacks, "net/http.(*persistConn).writeLoop(")
}

// TestWatchTransportFallback: a request to another address, or one the
// environment's proxy setting takes, goes to the fallback transport.
func TestWatchTransportFallback(t *testing.T) {
	srv, conns, _ := watchTestServer(t, false)
	other, otherConns, _ := watchTestServer(t, false)
	fb := &countingRT{base: http.DefaultTransport}
	wt := newTestWatchTransport(t, srv, fb)
	c := &http.Client{Transport: wt}
	if got, err := get(t, c, context.Background(), other.URL+"/ok"); err != nil || got != "ok " {
		t.Fatalf("other address: %q, %v", got, err)
	}
	if otherConns.n.Load() != 1 || fb.n.Load() != 1 || len(wt.idle) != 0 {
		t.Fatalf("other address: %d connections to it, %d fallback requests, %d idle in the watch pool", otherConns.n.Load(), fb.n.Load(), len(wt.idle))
	}
	// A proxy setting that covers the agent: the shared transport, which
	// applies it (this one reaches the server directly).
	wt.proxy = func(*http.Request) (*url.URL, error) { return url.Parse(srv.URL) }
	if got, err := get(t, c, context.Background(), srv.URL+"/ok?proxied"); err != nil || got != "ok proxied" {
		t.Fatalf("proxied: %q, %v", got, err)
	}
	if fb.n.Load() != 2 || len(wt.idle) != 0 {
		t.Fatalf("proxied: %d fallback requests, %d idle in the watch pool", fb.n.Load(), len(wt.idle))
	}
	wt.proxy = func(*http.Request) (*url.URL, error) { return nil, nil }
	if got, err := get(t, c, context.Background(), srv.URL+"/ok?direct"); err != nil || got != "ok direct" {
		t.Fatalf("direct: %q, %v", got, err)
	}
	if fb.n.Load() != 2 || len(wt.idle) != 1 || conns.n.Load() != 2 {
		t.Fatalf("direct: %d fallback requests, %d idle in the watch pool, %d connections", fb.n.Load(), len(wt.idle), conns.n.Load())
	}
}

// countingRT counts the requests it passes to base.
type countingRT struct {
	base http.RoundTripper
	n    atomic.Int32
}

func (c *countingRT) RoundTrip(req *http.Request) (*http.Response, error) {
	c.n.Add(1)
	return c.base.RoundTrip(req)
}

// TestConsulTLS runs the store's contract against an agent that answers
// over HTTPS only (with HTTP/2 offered, as Consul's API does over TLS),
// the store checking the agent's certificate against CAFile: the watches'
// own transport carries their blocking queries over TLS, the shared one the
// rest.
func TestConsulTLS(t *testing.T) {
	agent := testenv.StartConsul(t, testenv.WithHTTPS())
	var stores []*Consul
	backend := func(t *testing.T) openFunc {
		root := "tls-" + randomHex(t) + "/"
		return func(t *testing.T, prefix string) Store {
			s := newConsul(t, ConsulConfig{Address: "https://" + agent.HTTPSAddr, CAFile: agent.CAFile, Prefix: root + prefix})
			stores = append(stores, s)
			return s
		}
	}
	t.Run("Contract", func(t *testing.T) { runContract(t, backend) })
	t.Run("LeanWatchContract", func(t *testing.T) { runContract(t, leanBackend(backend)) })
	var dials int64
	for _, s := range stores {
		dials += s.watchTr.dials.Load()
	}
	if dials == 0 {
		t.Fatalf("no watch used its own transport over TLS (%d stores)", len(stores))
	}
	// A store that does not trust the agent's certificate is refused.
	s := newConsul(t, ConsulConfig{Address: "https://" + agent.HTTPSAddr, Prefix: "tls-untrusted/"})
	if _, err := s.List(bg(t), ""); err == nil {
		t.Fatal("a store without the agent's CA listed keys over TLS")
	}
}

// TestWatchTransportRoute: requests whose context onOwnConn marked take the
// watch transport, the rest the shared one.
func TestWatchTransportRoute(t *testing.T) {
	srv, _, _ := watchTestServer(t, false)
	shared := &countingRT{base: http.DefaultTransport}
	wt := newTestWatchTransport(t, srv, nil)
	c := &http.Client{Transport: routeTransport{shared: shared, own: wt}}
	if got, err := get(t, c, context.Background(), srv.URL+"/ok?shared"); err != nil || got != "ok shared" || shared.n.Load() != 1 || wt.dials.Load() != 0 {
		t.Fatalf("unmarked: %q, %v; shared transport %d requests, watch transport %d connections", got, err, shared.n.Load(), wt.dials.Load())
	}
	if got, err := get(t, c, onOwnConn(context.Background()), srv.URL+"/ok?own"); err != nil || got != "ok own" || shared.n.Load() != 1 || wt.dials.Load() != 1 {
		t.Fatalf("marked: %q, %v; shared transport %d requests, watch transport %d connections", got, err, shared.n.Load(), wt.dials.Load())
	}
}

// TestWatchTransportResend: a connection that looked open but ends before
// any answer to the request written on it (the agent closed it as the
// request left) costs a read nothing: it is sent again on a new one; a
// write is not sent twice.
func TestWatchTransportResend(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var accepted atomic.Int32
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			n := accepted.Add(1)
			go func() {
				defer conn.Close()
				br := bufio.NewReader(conn)
				for i := 0; ; i++ {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body)
					// Every connection but the last made answers its
					// first request only, and closes on the second.
					if i > 0 && n%2 == 1 {
						return
					}
					io.WriteString(conn, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
				}
			}()
		}
	}()
	wt := newWatchTransport(l.Addr().String(), (&net.Dialer{Timeout: time.Second}).DialContext, nil, time.Second, nil)
	defer wt.closeAll()
	c := &http.Client{Transport: wt}
	base := "http://" + l.Addr().String()
	do := func(method string) error {
		var body io.Reader
		if method == http.MethodPost {
			body = strings.NewReader("{}")
		}
		req, _ := http.NewRequest(method, base+"/", body)
		resp, err := c.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err == nil && string(b) != "ok" {
			err = errors.New("answer " + string(b))
		}
		return err
	}
	// Connection 1 answers, then closes on the read: sent again on 2.
	if err := do(http.MethodGet); err != nil {
		t.Fatal(err)
	}
	if err := do(http.MethodGet); err != nil {
		t.Fatalf("a read whose connection closed before answering: %v", err)
	}
	if n := accepted.Load(); n != 2 {
		t.Fatalf("connections: %d, want 2", n)
	}
	// Connection 2 answered and was kept; 3 answers, then closes on the
	// write, which fails rather than go out twice.
	wt.closeAll()
	wt = newWatchTransport(l.Addr().String(), (&net.Dialer{Timeout: time.Second}).DialContext, nil, time.Second, nil)
	defer wt.closeAll()
	c.Transport = wt
	if err := do(http.MethodPost); err != nil {
		t.Fatal(err)
	}
	if err := do(http.MethodPost); err == nil {
		t.Fatal("a write whose connection closed before answering was sent again")
	}
	if n := accepted.Load(); n != 3 {
		t.Fatalf("connections: %d, want 3", n)
	}
}
