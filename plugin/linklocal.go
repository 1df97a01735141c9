package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/miekg/dns"

	"consul-overlay/kvstore"
	"consul-overlay/linklocal"
)

// The settings of the well-known address (issue 14; package linklocal).
const (
	envLinkLocalAddr      = "LINKLOCAL_ADDR"
	envLinkLocalDomain    = "LINKLOCAL_DOMAIN"
	envLinkLocalConsulDNS = "LINKLOCAL_CONSUL_DNS"
	envLinkLocalUpstream  = "LINKLOCAL_UPSTREAM"
	// resolvConf is where the default upstream resolvers come from: the
	// host's file, which Docker mounts into a managed plugin.
	resolvConf = "/etc/resolv.conf"
)

// linkLocalSettings are the validated LINKLOCAL_* settings.
type linkLocalSettings struct {
	Addr      netip.Addr // invalid: off
	Domain    string
	ConsulDNS string
	// Upstreams, or nil for the nameservers of resolvConf.
	Upstreams []string
	// NoUpstream: LINKLOCAL_UPSTREAM=none.
	NoUpstream bool
}

// linkLocalFromEnv reads the settings. LINKLOCAL_ADDR empty or "off"
// turns the address off (the managed plugin's config.json sets
// 169.254.1.1); a bad value is an error naming the setting.
func linkLocalFromEnv(getenv func(string) string) (linkLocalSettings, error) {
	var s linkLocalSettings
	switch v := strings.TrimSpace(getenv(envLinkLocalAddr)); strings.ToLower(v) {
	case "", "off", "none", "false":
		return s, nil
	default:
		a, err := netip.ParseAddr(v)
		if err != nil || !a.Unmap().Is4() || a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() {
			return s, fmt.Errorf("%s=%q: want a unicast IPv4 address (169.254.1.1 is the usual one), or off", envLinkLocalAddr, v)
		}
		s.Addr = a.Unmap()
	}
	s.Domain = strings.TrimSpace(getenv(envLinkLocalDomain))
	if s.Domain == "" {
		s.Domain = linklocal.DefaultDomain
	}
	var err error
	if s.ConsulDNS, err = dnsServer(envLinkLocalConsulDNS, getenv(envLinkLocalConsulDNS), linklocal.DefaultConsulDNS); err != nil {
		return s, err
	}
	switch v := strings.TrimSpace(getenv(envLinkLocalUpstream)); strings.ToLower(v) {
	case "":
	case "none":
		s.NoUpstream = true
	default:
		for _, f := range strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == ' ' }) {
			a, err := dnsServer(envLinkLocalUpstream, f, "")
			if err != nil {
				return s, err
			}
			s.Upstreams = append(s.Upstreams, a)
		}
	}
	return s, nil
}

// dnsServer validates one DNS server setting: an IP address (port 53) or
// IP:port; "" is def.
func dnsServer(name, v, def string) (string, error) {
	v = strings.TrimSpace(v)
	if v == "" {
		return def, nil
	}
	if a, err := netip.ParseAddr(v); err == nil {
		return netip.AddrPortFrom(a, 53).String(), nil
	}
	if ap, err := netip.ParseAddrPort(v); err == nil && ap.Port() != 0 {
		return ap.String(), nil
	}
	return "", fmt.Errorf("%s=%q: want IP or IP:port of a DNS server", name, v)
}

// resolvConfUpstreams are the nameservers of the host's resolv.conf but
// the well-known address itself (a host whose resolver points at it) and
// Docker's embedded DNS.
func resolvConfUpstreams(path string, self netip.Addr) ([]string, error) {
	cc, err := dns.ClientConfigFromFile(path)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, s := range cc.Servers {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Unmap() == self || a == netip.MustParseAddr("127.0.0.11") {
			continue
		}
		out = append(out, net.JoinHostPort(a.String(), cc.Port))
	}
	return out, nil
}

// startLinkLocal serves the well-known address: DNS, and the Consul API
// proxy when the plugin talks to a Consul agent. It returns the address
// (invalid when off) and the function that stops the server. A port that
// cannot be bound is an error naming the address and the setting.
func startLinkLocal(ctx context.Context, log *slog.Logger, s linkLocalSettings, ccfg kvstore.ConsulConfig, useConsul bool) (netip.Addr, func(), error) {
	if !s.Addr.IsValid() {
		log.Info("link-local address off (" + envLinkLocalAddr + ")")
		return netip.Addr{}, func() {}, nil
	}
	upstreams := s.Upstreams
	if upstreams == nil && !s.NoUpstream {
		var err error
		if upstreams, err = resolvConfUpstreams(resolvConf, s.Addr); err != nil {
			log.Warn("no upstream resolvers: names outside the Consul domain get SERVFAIL; set "+envLinkLocalUpstream, "file", resolvConf, "error", err)
		} else if len(upstreams) == 0 {
			log.Warn("no upstream resolvers in "+resolvConf+" (but the link-local address itself): names outside the Consul domain get SERVFAIL; set "+envLinkLocalUpstream, "address", s.Addr)
		}
	}
	cfg := linklocal.Config{
		Addr: s.Addr,
		DNS: linklocal.ForwarderConfig{
			Domain: s.Domain, ConsulDNS: s.ConsulDNS, Upstreams: upstreams, Logger: log,
		},
		Logger: log,
	}
	apiTarget := ""
	if useConsul {
		h, err := consulAPIProxy(ccfg, log)
		if err != nil {
			return netip.Addr{}, nil, fmt.Errorf("%s=%s: consul api proxy: %w", envLinkLocalAddr, s.Addr, err)
		}
		cfg.API = h
		apiTarget = ccfg.Address
	}
	srv, err := linklocal.Listen(ctx, cfg)
	if err != nil {
		var be *linklocal.BindError
		if errors.As(err, &be) {
			return netip.Addr{}, nil, fmt.Errorf("%s=%s: %w; stop what holds the port, or set %s to another address or to off", envLinkLocalAddr, s.Addr, err, envLinkLocalAddr)
		}
		return netip.Addr{}, nil, fmt.Errorf("%s=%s: %w", envLinkLocalAddr, s.Addr, err)
	}
	srv.Serve()
	log.Info("link-local address ready", "address", s.Addr, "consul_domain", s.Domain, "consul_dns", s.ConsulDNS,
		"upstreams", upstreams, "consul_api", apiTarget)
	return s.Addr, func() {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Close(cctx); err != nil {
			log.Warn("link-local server did not stop cleanly", "error", err)
		}
	}, nil
}

// consulAPIProxy is the handler that passes containers' requests to the
// agent the plugin uses (CONSUL_HTTP_ADDR, its scheme and TLS files), with
// the caller's token and never CONSUL_HTTP_TOKEN.
func consulAPIProxy(ccfg kvstore.ConsulConfig, log *slog.Logger) (http.Handler, error) {
	addr := ccfg.Address
	if addr == "" {
		addr = kvstore.DefaultConsulAddress
	}
	scheme := strings.ToLower(ccfg.Scheme)
	if scheme == "" {
		scheme = "http"
	}
	tlsCfg, err := api.SetupTLSConfig(&api.TLSConfig{
		Address: ccfg.TLSServerName, CAFile: ccfg.CAFile, CertFile: ccfg.CertFile, KeyFile: ccfg.KeyFile,
	})
	if err != nil {
		return nil, fmt.Errorf("tls: %w", err)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = tlsCfg
	tr.Proxy = nil
	return linklocal.NewAPIProxy(&url.URL{Scheme: scheme, Host: addr}, tr, log), nil
}
