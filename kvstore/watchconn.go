package kvstore

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// watchTransport carries the blocking queries of the store's watches. Each
// watch holds a request open for minutes on a connection of its own (HTTP/1.1
// cannot share one between long polls), and net/http's Transport runs two
// goroutines a connection beside the caller's, a reader and a writer: on a
// host with a hundred networks, two hundred goroutines and their buffers that
// only wait. Here the caller's goroutine writes the request and reads the
// answer itself, on a connection taken from a small pool of idle ones and put
// back once the answer was read to its end.
//
// It speaks HTTP/1.1 through net/http's own Request.Write and ReadResponse,
// to the agent's one address only, directly: a request to another address,
// or one the environment sends through a proxy (HTTP_PROXY, NO_PROXY), goes
// to fallback, the shared transport.
type watchTransport struct {
	addr     string // the agent's host:port
	dial     func(ctx context.Context, network, addr string) (net.Conn, error)
	tls      *tls.Config // nil: plain HTTP
	timeout  time.Duration
	fallback http.RoundTripper
	proxy    func(*http.Request) (*url.URL, error) // nil: none
	maxIdle  int

	dials atomic.Int64 // connections made, for tests

	mu     sync.Mutex
	idle   []*watchConn // guarded by mu; the newest last
	closed bool         // guarded by mu
}

// ownConnKey marks the context of a goroutine whose requests go through
// the watch transport: a watch's, which holds a blocking query most of the
// time and reads what changed between two.
type ownConnKey struct{}

// onOwnConn is ctx for requests that run on the caller's goroutine alone
// (see watchTransport): the blocking queries of a watch and the reads its
// goroutine makes between them.
func onOwnConn(ctx context.Context) context.Context {
	return context.WithValue(ctx, ownConnKey{}, true)
}

// routeTransport sends a request whose context onOwnConn marked to own,
// the rest to shared.
type routeTransport struct {
	shared, own http.RoundTripper
}

func (r routeTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if own, _ := req.Context().Value(ownConnKey{}).(bool); own {
		return r.own.RoundTrip(req)
	}
	return r.shared.RoundTrip(req)
}

// watchConn is one connection with its buffers.
type watchConn struct {
	net.Conn
	raw net.Conn // the TCP connection under TLS, or Conn
	br  *bufio.Reader
	bw  *bufio.Writer
}

// alive tells, without blocking, whether an idle connection is still open:
// the agent sends nothing between answers, so anything to read (its end of
// the connection, a TLS alert) means it closed it.
func (wc *watchConn) alive() bool {
	if wc.br.Buffered() > 0 {
		return false
	}
	sc, ok := wc.raw.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	alive := false
	var b [1]byte
	err = rc.Read(func(fd uintptr) bool {
		// Nothing to read yet is the one answer of an open connection:
		// data, its end (0 bytes) or an error are not.
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		alive = errors.Is(err, syscall.EAGAIN)
		return true // never wait for the connection to become readable
	})
	return err == nil && alive
}

// longAgo is a deadline in the past: it ends a blocked read or write at once.
var longAgo = time.Unix(1, 0)

// errWatchConnClosed is a read of a body already closed.
var errWatchConnClosed = errors.New("read on a closed response body")

func newWatchTransport(addr string, dial func(context.Context, string, string) (net.Conn, error), tlsCfg *tls.Config, timeout time.Duration, fallback http.RoundTripper) *watchTransport {
	if tlsCfg != nil {
		// A copy: the shared transport adds HTTP/2 to its own config's
		// protocols, and this one speaks HTTP/1.1 only.
		tlsCfg = tlsCfg.Clone()
		tlsCfg.NextProtos = []string{"http/1.1"}
		if tlsCfg.ServerName == "" {
			if host, _, err := net.SplitHostPort(addr); err == nil {
				tlsCfg.ServerName = host
			}
		}
	}
	return &watchTransport{addr: addr, dial: dial, tls: tlsCfg, timeout: timeout, fallback: fallback, maxIdle: 16}
}

// RoundTrip sends req and reads the answer's header on the caller's
// goroutine; the body is read from the connection as the caller reads it.
// Cancelling req's context ends a request in flight at once. A connection
// that sat idle and turns out closed by the agent before it answered anything
// is replaced once by a new one, for a request that can be sent again (see
// rewound).
func (t *watchTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL == nil || req.URL.Host != t.addr || (req.URL.Scheme == "https") != (t.tls != nil) {
		return t.fallback.RoundTrip(req)
	}
	if t.proxy != nil {
		if u, err := t.proxy(req); err != nil || u != nil {
			return t.fallback.RoundTrip(req)
		}
	}
	ctx := req.Context()
	for attempt := 0; ; attempt++ {
		wc, reused, err := t.get(ctx)
		if err != nil {
			if req.Body != nil {
				req.Body.Close()
			}
			return nil, err
		}
		resp, answered, err := t.exchange(ctx, wc, req)
		if err == nil {
			return resp, nil
		}
		wc.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if reused && !answered && attempt == 0 {
			if again, ok := rewound(req); ok {
				req = again
				continue
			}
		}
		return nil, err
	}
}

// rewound is req ready to be sent again, as net/http's Transport would:
// only a request that changes nothing (GET, HEAD), itself without a body, a
// copy with a new body where the request can make one (GetBody). A write
// (a transaction) is not sent twice: the agent may have applied it before
// the connection failed.
func rewound(req *http.Request) (*http.Request, bool) {
	if req.Method != "" && req.Method != http.MethodGet && req.Method != http.MethodHead {
		return nil, false
	}
	if req.Body == nil || req.Body == http.NoBody {
		return req, true
	}
	if req.GetBody == nil {
		return nil, false
	}
	body, err := req.GetBody()
	if err != nil {
		return nil, false
	}
	again := *req
	again.Body = body
	return &again, true
}

// get takes an idle connection (reused) or dials a new one.
func (t *watchTransport) get(ctx context.Context) (wc *watchConn, reused bool, err error) {
	for {
		t.mu.Lock()
		n := len(t.idle)
		if n == 0 {
			t.mu.Unlock()
			break
		}
		wc = t.idle[n-1]
		t.idle[n-1] = nil
		t.idle = t.idle[:n-1]
		t.mu.Unlock()
		// One the agent closed while it waited (a restart, its idle
		// timeout) is dropped here, as net/http's reader would have.
		if wc.alive() {
			return wc, true, nil
		}
		wc.Close()
	}
	conn, err := t.dial(ctx, "tcp", t.addr)
	if err != nil {
		return nil, false, err
	}
	t.dials.Add(1)
	raw := conn
	if t.tls != nil {
		tc := tls.Client(conn, t.tls)
		hctx, cancel := context.WithTimeout(ctx, t.timeout)
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			conn.Close()
			return nil, false, fmt.Errorf("tls handshake with %s: %w", t.addr, err)
		}
		conn = tc
	}
	// The buffers' sizes are the shared transport's (see NewConsul).
	return &watchConn{Conn: conn, raw: raw, br: bufio.NewReaderSize(conn, 1024), bw: bufio.NewWriterSize(conn, 1024)}, false, nil
}

// exchange writes req on wc and reads the answer's header. answered tells
// whether any of the answer arrived, for RoundTrip's retry.
func (t *watchTransport) exchange(ctx context.Context, wc *watchConn, req *http.Request) (resp *http.Response, answered bool, err error) {
	stop := context.AfterFunc(ctx, func() { _ = wc.SetDeadline(longAgo) })
	fail := func(answered bool, err error) (*http.Response, bool, error) {
		stop()
		return nil, answered, err
	}
	if err := req.Write(wc.bw); err != nil {
		return fail(false, err)
	}
	if err := wc.bw.Flush(); err != nil {
		return fail(false, err)
	}
	if _, err := wc.br.Peek(1); err != nil {
		return fail(false, err)
	}
	resp, err = http.ReadResponse(wc.br, req)
	if err != nil {
		return fail(true, err)
	}
	resp.Body = &watchBody{rc: resp.Body, wc: wc, t: t, stop: stop, keep: !resp.Close}
	return resp, true, nil
}

// put keeps wc for the next request, unless the pool is full or closed.
func (t *watchTransport) put(wc *watchConn) {
	t.mu.Lock()
	if !t.closed && len(t.idle) < t.maxIdle {
		t.idle = append(t.idle, wc)
		t.mu.Unlock()
		return
	}
	t.mu.Unlock()
	wc.Close()
}

// closeAll closes the idle connections, and every one put back from then
// on: the store is closed.
func (t *watchTransport) closeAll() {
	t.mu.Lock()
	idle := t.idle
	t.idle, t.closed = nil, true
	t.mu.Unlock()
	for _, wc := range idle {
		wc.Close()
	}
}

// watchBody is an answer's body. Closing it reads what is left of it (as
// net/http's own body does) and gives the connection back when the answer
// ended cleanly, the agent keeps it open and the request was not cancelled.
type watchBody struct {
	rc     io.ReadCloser
	wc     *watchConn
	t      *watchTransport
	stop   func() bool
	keep   bool
	closed bool
}

func (b *watchBody) Read(p []byte) (int, error) {
	if b.closed {
		return 0, errWatchConnClosed
	}
	return b.rc.Read(p)
}

func (b *watchBody) Close() error {
	if b.closed {
		return nil
	}
	b.closed = true
	err := b.rc.Close()
	// stop is false once the context's end set the deadline: the
	// connection is then spent whatever was read.
	if !b.stop() || err != nil || !b.keep || b.wc.br.Buffered() > 0 {
		b.wc.Close()
		return err
	}
	b.t.put(b.wc)
	return nil
}
