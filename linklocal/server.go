package linklocal

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"
)

// Default ports on the well-known address.
const (
	DNSPort = 53
	APIPort = 8500
)

// Config configures a Server.
type Config struct {
	// Addr is the well-known address (required).
	Addr netip.Addr
	// DNSPort and APIPort are the ports served (zero: 53 and 8500).
	DNSPort, APIPort int
	// DNS is the forwarder's configuration.
	DNS ForwarderConfig
	// API, if set, serves the Consul HTTP API proxy on APIPort (nil: no
	// listener, so connections are refused).
	API    http.Handler
	Logger *slog.Logger
}

// BindError reports that a port of the well-known address could not be
// bound, naming the address and port.
type BindError struct {
	Addr  netip.AddrPort
	Proto string // "udp" or "tcp"
	What  string // "DNS" or "the Consul API"
	Err   error
}

func (e *BindError) Error() string {
	msg := fmt.Sprintf("serve %s on %s/%s: %v", e.What, e.Addr, e.Proto, e.Err)
	if errors.Is(e.Err, syscall.EADDRINUSE) {
		msg += fmt.Sprintf(" (another program already serves port %d/%s on %s or on all addresses)", e.Addr.Port(), e.Proto, e.Addr.Addr())
	}
	return msg
}

func (e *BindError) Unwrap() error { return e.Err }

// Server serves DNS (UDP and TCP) and, optionally, the Consul API proxy on
// the well-known address.
type Server struct {
	cfg    Config
	log    *slog.Logger
	fwd    *Forwarder
	udp    *dns.Server
	tcp    *dns.Server
	api    *http.Server
	apiL   net.Listener
	wg     sync.WaitGroup
	closed bool
	mu     sync.Mutex
}

// Listen binds every socket of the server (so a port that is taken fails
// here, as a *BindError) without serving yet. The sockets use IP_FREEBIND:
// the address need not exist yet.
func Listen(ctx context.Context, cfg Config) (_ *Server, retErr error) {
	if !cfg.Addr.IsValid() {
		return nil, errors.New("link-local server: no address")
	}
	if cfg.DNSPort == 0 {
		cfg.DNSPort = DNSPort
	}
	if cfg.APIPort == 0 {
		cfg.APIPort = APIPort
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.DNS.Logger == nil {
		cfg.DNS.Logger = cfg.Logger
	}
	fwd, err := NewForwarder(cfg.DNS)
	if err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: cfg.Logger, fwd: fwd}
	var closers []func() error
	defer func() {
		if retErr != nil {
			for _, c := range closers {
				_ = c()
			}
		}
	}()
	lc := net.ListenConfig{Control: freebind}
	dnsAddr := netip.AddrPortFrom(cfg.Addr, uint16(cfg.DNSPort))
	pc, err := lc.ListenPacket(ctx, "udp", dnsAddr.String())
	if err != nil {
		return nil, &BindError{Addr: dnsAddr, Proto: "udp", What: "DNS", Err: err}
	}
	closers = append(closers, pc.Close)
	tl, err := lc.Listen(ctx, "tcp", dnsAddr.String())
	if err != nil {
		return nil, &BindError{Addr: dnsAddr, Proto: "tcp", What: "DNS", Err: err}
	}
	closers = append(closers, tl.Close)
	s.udp = &dns.Server{PacketConn: pc, Handler: fwd}
	s.tcp = &dns.Server{Listener: tl, Handler: fwd, ReadTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second}
	if cfg.API != nil {
		apiAddr := netip.AddrPortFrom(cfg.Addr, uint16(cfg.APIPort))
		al, err := lc.Listen(ctx, "tcp", apiAddr.String())
		if err != nil {
			return nil, &BindError{Addr: apiAddr, Proto: "tcp", What: "the Consul API", Err: err}
		}
		s.apiL = al
		s.api = &http.Server{Handler: cfg.API, ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelDebug)}
	}
	return s, nil
}

// freebind sets IP_FREEBIND: bind to an address the namespace does not
// have (yet).
func freebind(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_FREEBIND, 1)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("set IP_FREEBIND: %w", serr)
	}
	return nil
}

// Forwarder is the server's DNS forwarder.
func (s *Server) Forwarder() *Forwarder { return s.fwd }

// Addrs are the bound addresses: DNS, and the API's (invalid without it).
func (s *Server) Addrs() (dnsAddr, api netip.AddrPort) {
	dnsAddr = netip.MustParseAddrPort(s.udp.PacketConn.LocalAddr().String())
	if s.apiL != nil {
		api = netip.MustParseAddrPort(s.apiL.Addr().String())
	}
	return dnsAddr, api
}

// Serve starts serving in the background until Close.
func (s *Server) Serve() {
	start := func(name string, f func() error) {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if err := f(); err != nil && !errors.Is(err, http.ErrServerClosed) && !s.isClosed() {
				s.log.Error("link-local server stopped", "server", name, "error", err)
			}
		}()
	}
	start("dns/udp", s.udp.ActivateAndServe)
	start("dns/tcp", s.tcp.ActivateAndServe)
	if s.api != nil {
		start("consul-api", func() error { return s.api.Serve(s.apiL) })
	}
	dnsAddr, api := s.Addrs()
	s.log.Info("link-local address served", "dns", dnsAddr, "consul_api", api)
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Close stops serving and closes the sockets; in-flight API requests get
// until ctx ends.
func (s *Server) Close(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	var errs []error
	for _, d := range []*dns.Server{s.udp, s.tcp} {
		if err := d.ShutdownContext(ctx); err != nil && !isNotStarted(err) {
			errs = append(errs, err)
		}
	}
	if s.api != nil {
		if err := s.api.Shutdown(ctx); err != nil {
			errs = append(errs, err)
			_ = s.api.Close()
		}
		_ = s.apiL.Close()
	}
	// Closing the sockets also ends a serve loop that started after the
	// shutdown above.
	_ = s.udp.PacketConn.Close()
	_ = s.tcp.Listener.Close()
	s.wg.Wait()
	return errors.Join(errs...)
}

// isNotStarted: ShutdownContext of a server that never served.
func isNotStarted(err error) bool {
	return err != nil && err.Error() == "dns: server not started"
}
