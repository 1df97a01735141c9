package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/docker/go-plugins-helpers/ipam"
	"github.com/docker/go-plugins-helpers/network"

	"consul-overlay/internal/hostid"
	coipam "consul-overlay/ipam"
	"consul-overlay/kvstore"
)

// contentType is what Docker's plugin clients expect; the engine does not
// check it, but other tooling does.
const contentType = "application/vnd.docker.plugins.v1.2+json"

// maxBody bounds a request body; Docker's largest requests are a few KiB.
const maxBody = 1 << 20

// route decodes one request body and calls the driver.
type route func(body []byte) (any, error)

// server serves the network driver and the IPAM driver on one socket.
// go-plugins-helpers gives each driver its own mux and its own
// /Plugin.Activate manifest, so a combined plugin needs this mux.
type server struct {
	log    *slog.Logger
	routes map[string]route
}

// ipamCapabilities is the IPAM GetCapabilities answer. go-plugins-helpers'
// type lacks RequiresRequestReplay, which Docker reads.
type ipamCapabilities struct {
	RequiresMACAddress    bool
	RequiresRequestReplay bool
}

func newServer(log *slog.Logger, nd network.Driver, id ipam.Ipam) *server {
	s := &server{log: log, routes: map[string]route{}}
	s.routes["/Plugin.Activate"] = func([]byte) (any, error) {
		return map[string][]string{"Implements": {"NetworkDriver", "IpamDriver"}}, nil
	}

	// Network driver.
	s.routes["/NetworkDriver.GetCapabilities"] = func([]byte) (any, error) { return nd.GetCapabilities() }
	s.routes["/NetworkDriver.CreateNetwork"] = call(func(r *network.CreateNetworkRequest) (any, error) {
		return struct{}{}, nd.CreateNetwork(r)
	})
	s.routes["/NetworkDriver.DeleteNetwork"] = call(func(r *network.DeleteNetworkRequest) (any, error) {
		return struct{}{}, nd.DeleteNetwork(r)
	})
	s.routes["/NetworkDriver.AllocateNetwork"] = call(func(r *network.AllocateNetworkRequest) (any, error) {
		return nd.AllocateNetwork(r)
	})
	s.routes["/NetworkDriver.FreeNetwork"] = call(func(r *network.FreeNetworkRequest) (any, error) {
		return struct{}{}, nd.FreeNetwork(r)
	})
	s.routes["/NetworkDriver.CreateEndpoint"] = call(func(r *network.CreateEndpointRequest) (any, error) {
		return nd.CreateEndpoint(r)
	})
	s.routes["/NetworkDriver.DeleteEndpoint"] = call(func(r *network.DeleteEndpointRequest) (any, error) {
		return struct{}{}, nd.DeleteEndpoint(r)
	})
	s.routes["/NetworkDriver.EndpointOperInfo"] = call(func(r *network.InfoRequest) (any, error) {
		return nd.EndpointInfo(r)
	})
	s.routes["/NetworkDriver.Join"] = call(func(r *network.JoinRequest) (any, error) { return nd.Join(r) })
	s.routes["/NetworkDriver.Leave"] = call(func(r *network.LeaveRequest) (any, error) {
		return struct{}{}, nd.Leave(r)
	})
	s.routes["/NetworkDriver.DiscoverNew"] = call(func(r *network.DiscoveryNotification) (any, error) {
		return struct{}{}, nd.DiscoverNew(r)
	})
	s.routes["/NetworkDriver.DiscoverDelete"] = call(func(r *network.DiscoveryNotification) (any, error) {
		return struct{}{}, nd.DiscoverDelete(r)
	})
	s.routes["/NetworkDriver.ProgramExternalConnectivity"] = call(func(r *network.ProgramExternalConnectivityRequest) (any, error) {
		return struct{}{}, nd.ProgramExternalConnectivity(r)
	})
	s.routes["/NetworkDriver.RevokeExternalConnectivity"] = call(func(r *network.RevokeExternalConnectivityRequest) (any, error) {
		return struct{}{}, nd.RevokeExternalConnectivity(r)
	})

	// IPAM driver.
	s.routes["/IpamDriver.GetCapabilities"] = func([]byte) (any, error) {
		c, err := id.GetCapabilities()
		if err != nil {
			return nil, err
		}
		return ipamCapabilities{RequiresMACAddress: c.RequiresMACAddress}, nil
	}
	s.routes["/IpamDriver.GetDefaultAddressSpaces"] = func([]byte) (any, error) { return id.GetDefaultAddressSpaces() }
	s.routes["/IpamDriver.RequestPool"] = call(func(r *ipam.RequestPoolRequest) (any, error) { return id.RequestPool(r) })
	s.routes["/IpamDriver.ReleasePool"] = call(func(r *ipam.ReleasePoolRequest) (any, error) {
		return struct{}{}, id.ReleasePool(r)
	})
	s.routes["/IpamDriver.RequestAddress"] = call(func(r *ipam.RequestAddressRequest) (any, error) {
		return id.RequestAddress(r)
	})
	s.routes["/IpamDriver.ReleaseAddress"] = call(func(r *ipam.ReleaseAddressRequest) (any, error) {
		return struct{}{}, id.ReleaseAddress(r)
	})
	return s
}

// errDecode marks a request body that is not the JSON the method takes.
var errDecode = errors.New("malformed request")

// errEmptyBody is a call that takes arguments sent without a body. The
// engine does that when the plugin restarted under the call: its plugin
// client retries a failed connection with the request body it already
// spent on the first try (moby pkg/plugins, Client.callWithRetry).
var errEmptyBody = fmt.Errorf("%w: empty request body (the engine resends a call without its body when the plugin restarted under it)", errDecode)

// call adapts a typed driver method to a route. Every such method takes
// arguments (Docker sends no body only for argument-less calls, which are
// not routed through call), so an empty body is refused (errEmptyBody)
// instead of being taken for a request that names nothing.
func call[Req any](fn func(*Req) (any, error)) route {
	return func(body []byte) (any, error) {
		if len(bytes.TrimSpace(body)) == 0 {
			return nil, errEmptyBody
		}
		req := new(Req)
		if err := json.Unmarshal(body, req); err != nil {
			return nil, fmt.Errorf("%w: %v", errDecode, err)
		}
		return fn(req)
	}
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	method := r.URL.Path
	rt, ok := s.routes[method]
	if !ok {
		// 404 lets Docker tell "not implemented" from a failure.
		writeJSON(w, http.StatusNotFound, map[string]string{"Err": fmt.Sprintf("%s: not implemented by consul-overlay", method)})
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody))
	if err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"Err": fmt.Sprintf("%s: read request: %v", method, err)})
		return
	}
	start := time.Now()
	resp, err := s.invoke(method, rt, body)
	observeRequest(method, err, time.Since(start)) // OPS hook (issue 18): request metrics
	if err != nil {
		status := http.StatusInternalServerError
		if errors.Is(err, errDecode) {
			status = http.StatusBadRequest
		}
		s.log.Error("request failed", "method", method, "error", err, "hint", errorHint(err), "duration", time.Since(start), "request", string(body))
		// Docker reads {"Err": ...} from any non-200 answer, for both the
		// network and the IPAM subsystem.
		writeJSON(w, status, map[string]string{"Err": err.Error()})
		return
	}
	s.log.Debug("request", "method", method, "duration", time.Since(start))
	writeJSON(w, http.StatusOK, resp)
}

// errorHint says what an operator can do about a failed call, from the
// cause's sentinel; the error itself names the object.
func errorHint(err error) string {
	switch {
	case errors.Is(err, errEmptyBody):
		return "the plugin restarted while the engine sent this call, and the engine's retry lost the call's content: run the command again"
	case errors.Is(err, errDecode):
		return "the request does not match the plugin API: check that the Docker engine is a supported version"
	case errors.Is(err, kvstore.ErrPermissionDenied):
		return "the Consul token lacks a permission: run `consul-overlay doctor` and grant what it names"
	case errors.Is(err, kvstore.ErrUnavailable):
		return "the state store is unreachable: check CONSUL_HTTP_ADDR and the Consul agent (`consul-overlay doctor`), then retry"
	case errors.Is(err, kvstore.ErrConflict):
		return "another host changed the same record meanwhile: retry the command"
	case errors.Is(err, coipam.ErrPoolExhausted):
		return "no address is left in the subnet: remove unused containers or create the network with a larger subnet"
	case errors.Is(err, coipam.ErrPoolOverlap):
		return "the subnet overlaps a network of another host: choose another --subnet (`consul-overlay status` lists the networks)"
	case errors.Is(err, coipam.ErrAddressInUse):
		return "the address is held by another container: choose another --ip or leave it to IPAM"
	case errors.Is(err, coipam.ErrUnknownPool):
		return "the network's pool is gone from the store: remove the network and create it again"
	}
	return "the error names the object and the failing step; `consul-overlay status` shows drift and `consul-overlay doctor` checks the host"
}

// invoke runs a route and turns a panic into an error: a driver bug must
// never take the daemon's plugin down.
func (s *server) invoke(method string, rt route, body []byte) (resp any, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%s: internal error: %v", method, p)
		}
	}()
	return rt(body)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", contentType)
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// listenUnix opens the plugin socket, replacing a stale one. A socket that
// a live process listens on is another instance's: it is left alone and
// the error names that process. The directory is created if missing
// (Docker looks in /run/docker/plugins). exited is the pid of a listener
// that had exited while a program it was starting still held the socket
// (0: none); its socket was replaced.
func listenUnix(path string) (l net.Listener, exited int, err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, 0, fmt.Errorf("create socket directory %q: %w", filepath.Dir(path), err)
	}
	// A socket whose listener exited is stale even if a program that
	// listener was starting still holds it (hostid.Exited): a new socket
	// replaces the path.
	if pid, _, err := hostid.Peer(path); err == nil {
		if !hostid.Exited(pid) {
			return nil, 0, fmt.Errorf("socket %q is %w (pid %d): stop it, or set another SOCKET", path, hostid.ErrInUse, pid)
		}
		exited = pid
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, 0, fmt.Errorf("remove stale socket %q: %w", path, err)
	}
	l, err = net.Listen("unix", path)
	if err != nil {
		return nil, 0, fmt.Errorf("listen on %q: %w", path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		l.Close()
		return nil, 0, fmt.Errorf("chmod socket %q: %w", path, err)
	}
	return l, exited, nil
}

// logWaited says that the previous instance was killed while it started a
// program, which held what it held for a moment (hostid.Exited).
func logWaited(log *slog.Logger, what string, w hostid.Waited) {
	if w.Pid == 0 {
		return
	}
	log.Warn("the previous instance was killed while it started a program, which held its "+what+" for a moment after it; taken once the program let it go",
		"previous_pid", w.Pid, "waited", w.For.Round(time.Millisecond))
}

// startWait is how long a driver call made during start-up waits for the
// drivers (or the failure) before it is told the plugin is still starting.
const startWait = 5 * time.Second

// switchHandler serves with whichever handler was set last: the start-up
// answers, then the drivers or the failure (final). Until final, a call
// other than the handshake waits up to startWait, so a call that arrives
// during a normal start gets the drivers' answer.
type switchHandler struct {
	h     atomic.Pointer[http.Handler]
	once  sync.Once
	final chan struct{}
}

func newSwitchHandler(starting http.Handler) *switchHandler {
	s := &switchHandler{final: make(chan struct{})}
	s.h.Store(&starting)
	return s
}

// setFinal switches to h for good.
func (s *switchHandler) setFinal(h http.Handler) {
	s.h.Store(&h)
	s.once.Do(func() { close(s.final) })
}

func (s *switchHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/Plugin.Activate", "/NetworkDriver.GetCapabilities", "/IpamDriver.GetDefaultAddressSpaces":
	default:
		t := time.NewTimer(startWait)
		select {
		case <-s.final:
		case <-t.C:
		case <-r.Context().Done():
		}
		t.Stop()
	}
	(*s.h.Load()).ServeHTTP(w, r)
}

// serve runs the HTTP server until ctx is done, then shuts it down.
func serve(ctx context.Context, l net.Listener, h http.Handler) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		<-errc
		return nil
	}
}
