package linklocal

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// Defaults of ForwarderConfig.
const (
	DefaultDomain          = "consul"
	DefaultConsulDNS       = "127.0.0.1:8600"
	DefaultConsulTimeout   = 700 * time.Millisecond
	DefaultUpstreamTimeout = 2 * time.Second
	defaultCacheSize       = 10000
)

// ForwarderConfig configures a Forwarder. Zero values take the documented
// defaults.
type ForwarderConfig struct {
	// Domain is the Consul domain: its names (and itself) go to ConsulDNS
	// (zero: "consul").
	Domain string
	// ConsulDNS is host:port of the host's Consul agent's DNS interface
	// (zero: 127.0.0.1:8600).
	ConsulDNS string
	// Upstreams are host:port of the resolvers for every other name, tried
	// in order. None: such names get SERVFAIL.
	Upstreams []string
	// ConsulTimeout bounds one question to the agent, over UDP and then
	// TCP together (zero: 700ms), so that a stopped or hung agent gives
	// SERVFAIL within a second.
	ConsulTimeout time.Duration
	// UpstreamTimeout bounds one question to one upstream (zero: 2s).
	UpstreamTimeout time.Duration
	// CacheSize is the most answers kept (zero: 10000).
	CacheSize int
	// Now is the clock (nil: time.Now); tests set it.
	Now    func() time.Time
	Logger *slog.Logger
}

// isDomain reports whether s is a fully qualified domain name (ending in
// '.') of labels of 1 to 63 lower-case letters, digits, '-' and '_' that
// neither begin nor end with '-'. It is the regular expression
// `^([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)+$` written out: compiled,
// its bounded repetition cost every plugin some 100 KiB of heap at start.
func isDomain(s string) bool {
	if s == "" || s[len(s)-1] != '.' {
		return false
	}
	for _, label := range strings.Split(s[:len(s)-1], ".") {
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '_' || c == '-') {
				return false
			}
		}
	}
	return true
}

// Forwarder answers DNS questions by asking the Consul agent or the
// upstream resolvers, with a cache. It is a dns.Handler.
type Forwarder struct {
	cfg    ForwarderConfig
	domain string // lower-case, fully qualified
	cache  *cache
	log    *slog.Logger
}

var _ dns.Handler = (*Forwarder)(nil)

// NewForwarder returns a Forwarder.
func NewForwarder(cfg ForwarderConfig) (*Forwarder, error) {
	if cfg.Domain == "" {
		cfg.Domain = DefaultDomain
	}
	domain := dns.Fqdn(strings.ToLower(strings.TrimSpace(cfg.Domain)))
	if !isDomain(domain) {
		return nil, fmt.Errorf("consul domain %q: not a domain name", cfg.Domain)
	}
	if cfg.ConsulDNS == "" {
		cfg.ConsulDNS = DefaultConsulDNS
	}
	for _, a := range append([]string{cfg.ConsulDNS}, cfg.Upstreams...) {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return nil, fmt.Errorf("dns server %q: want host:port: %w", a, err)
		}
	}
	if cfg.ConsulTimeout <= 0 {
		cfg.ConsulTimeout = DefaultConsulTimeout
	}
	if cfg.UpstreamTimeout <= 0 {
		cfg.UpstreamTimeout = DefaultUpstreamTimeout
	}
	if cfg.CacheSize <= 0 {
		cfg.CacheSize = defaultCacheSize
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Forwarder{cfg: cfg, domain: domain, cache: newCache(cfg.CacheSize), log: cfg.Logger}, nil
}

// ServeDNS answers one request. Over UDP the answer is cut to the client's
// buffer (512 bytes, or its EDNS size) with the TC bit set, so the client
// asks again over TCP.
func (f *Forwarder) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	tcp := false
	if a := w.LocalAddr(); a != nil {
		tcp = a.Network() == "tcp"
	}
	resp := f.Resolve(context.Background(), req)
	if !tcp {
		size := dns.MinMsgSize
		if o := req.IsEdns0(); o != nil && int(o.UDPSize()) > size {
			size = int(o.UDPSize())
		}
		resp.Truncate(size)
	}
	if err := w.WriteMsg(resp); err != nil {
		f.log.Debug("dns answer not sent", "client", w.RemoteAddr(), "error", err)
	}
}

// Resolve returns the whole answer to req (never truncated for size by
// the forwarder itself), from the cache or from the server that the name
// belongs to; SERVFAIL when that server does not answer.
func (f *Forwarder) Resolve(ctx context.Context, req *dns.Msg) *dns.Msg {
	if len(req.Question) != 1 || req.Opcode != dns.OpcodeQuery {
		m := new(dns.Msg)
		m.SetRcode(req, dns.RcodeFormatError)
		if req.Opcode != dns.OpcodeQuery {
			m.SetRcode(req, dns.RcodeNotImplemented)
		}
		return m
	}
	key := keyOf(req)
	now := f.cfg.Now()
	if m := f.cache.get(key, now); m != nil {
		m.Id = req.Id
		return m
	}
	servers, timeout := f.cfg.Upstreams, f.cfg.UpstreamTimeout
	consul := f.IsConsul(req.Question[0].Name)
	if consul {
		servers, timeout = []string{f.cfg.ConsulDNS}, f.cfg.ConsulTimeout
	}
	var errs []error
	for _, s := range servers {
		resp, err := exchange(ctx, req, s, timeout)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		resp.Id = req.Id
		f.cache.put(key, resp, now)
		return resp
	}
	if len(servers) == 0 {
		errs = append(errs, errors.New("no upstream resolver"))
	}
	f.log.Debug("dns question failed", "name", req.Question[0].Name, "type", dns.TypeToString[req.Question[0].Qtype], "consul", consul, "error", errors.Join(errs...))
	m := new(dns.Msg)
	m.SetRcode(req, dns.RcodeServerFailure)
	m.RecursionAvailable = true
	return m
}

// IsConsul reports whether name is in the Consul domain.
func (f *Forwarder) IsConsul(name string) bool {
	return dns.IsSubDomain(f.domain, dns.Fqdn(strings.ToLower(name)))
}

// exchange asks server over UDP, and again over TCP if the UDP answer is
// truncated, all within timeout.
func exchange(ctx context.Context, req *dns.Msg, server string, timeout time.Duration) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	q := req.Copy()
	c := &dns.Client{Net: "udp", Timeout: timeout}
	resp, _, err := c.ExchangeContext(ctx, q, server)
	if err == nil && resp.Truncated {
		c.Net = "tcp"
		resp, _, err = c.ExchangeContext(ctx, q, server)
	}
	if err != nil {
		return nil, fmt.Errorf("ask %s: %w", server, err)
	}
	return resp, nil
}
