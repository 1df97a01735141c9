package kvstore

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"
)

// Defaults of ConsulConfig.
const (
	DefaultConsulAddress = "127.0.0.1:8500"
	DefaultTimeout       = 5 * time.Second
)

// ConsulConfig says how to reach Consul. Zero values are the defaults
// named on each field.
type ConsulConfig struct {
	// Address is host:port of the agent's HTTP API. An "http://" or
	// "https://" prefix is accepted; "https://" implies Scheme https.
	// Zero: DefaultConsulAddress.
	Address string
	// Scheme is "http" or "https". Zero: http (or https per Address).
	Scheme string
	// Token is the ACL token sent with every request. Zero: none (the
	// Consul client library then still honours CONSUL_HTTP_TOKEN and
	// CONSUL_HTTP_TOKEN_FILE from the process environment).
	Token string
	// CAFile verifies the agent's certificate (https). Zero: system roots.
	CAFile string
	// CertFile and KeyFile are the client certificate for mutual TLS; both
	// or neither.
	CertFile string
	KeyFile  string
	// TLSServerName is the name expected in the agent's certificate.
	// Zero: the host of Address.
	TLSServerName string
	// Prefix is prepended to every key. Zero: DefaultPrefix. A trailing
	// "/" is added and a leading one removed.
	Prefix string
	// Timeout bounds every request except Watch's blocking queries (which
	// get their wait time plus Timeout). Zero: DefaultTimeout.
	Timeout time.Duration
}

// Environment variables read by ConsulConfigFromEnv. The CONSUL_* ones mean
// what they mean to the consul CLI.
const (
	EnvConsulAddr      = "CONSUL_HTTP_ADDR"
	EnvConsulToken     = "CONSUL_HTTP_TOKEN"
	EnvConsulSSL       = "CONSUL_HTTP_SSL"
	EnvConsulCACert    = "CONSUL_CACERT"
	EnvConsulCert      = "CONSUL_CLIENT_CERT"
	EnvConsulKey       = "CONSUL_CLIENT_KEY"
	EnvConsulTLSServer = "CONSUL_TLS_SERVER_NAME"
	EnvKVPrefix        = "KV_PREFIX"
)

// ConsulConfigFromEnv builds a ConsulConfig from environment variables read
// through getenv (os.Getenv in production). found reports whether
// CONSUL_HTTP_ADDR was set, which is how the plugin chooses Consul over the
// embedded store. Invalid values are an error naming the variable; the
// returned Prefix is normalised and defaults to DefaultPrefix.
func ConsulConfigFromEnv(getenv func(string) string) (cfg ConsulConfig, found bool, err error) {
	if raw := strings.TrimSpace(getenv(EnvConsulAddr)); raw != "" {
		found = true
		scheme, hostport, err := parseConsulAddress(raw)
		if err != nil {
			return ConsulConfig{}, found, fmt.Errorf("%s=%q: %w", EnvConsulAddr, raw, err)
		}
		cfg.Address, cfg.Scheme = hostport, scheme
	}
	if raw := strings.TrimSpace(getenv(EnvConsulSSL)); raw != "" {
		ssl, err := strconv.ParseBool(raw)
		if err != nil {
			return ConsulConfig{}, found, fmt.Errorf("%s=%q: not a boolean", EnvConsulSSL, raw)
		}
		// Like the consul CLI: an https:// address stays https.
		if ssl {
			cfg.Scheme = "https"
		}
	}
	cfg.Token = strings.TrimSpace(getenv(EnvConsulToken))
	if strings.ContainsAny(cfg.Token, " \t\r\n") {
		return ConsulConfig{}, found, fmt.Errorf("%s: token contains whitespace", EnvConsulToken)
	}
	cfg.CAFile = getenv(EnvConsulCACert)
	cfg.CertFile = getenv(EnvConsulCert)
	cfg.KeyFile = getenv(EnvConsulKey)
	if (cfg.CertFile == "") != (cfg.KeyFile == "") {
		return ConsulConfig{}, found, fmt.Errorf("%s and %s: set both or neither", EnvConsulCert, EnvConsulKey)
	}
	cfg.TLSServerName = getenv(EnvConsulTLSServer)
	cfg.Prefix, err = normalizePrefix(getenv(EnvKVPrefix))
	if err != nil {
		return ConsulConfig{}, found, fmt.Errorf("%s: %w", EnvKVPrefix, err)
	}
	return cfg, found, nil
}

// parseConsulAddress accepts host:port, http://host:port and
// https://host:port and returns the scheme ("" when not given) and
// host:port.
func parseConsulAddress(raw string) (scheme, hostport string, err error) {
	hostport = raw
	if i := strings.Index(raw, "://"); i >= 0 {
		scheme, hostport = strings.ToLower(raw[:i]), raw[i+3:]
		if scheme != "http" && scheme != "https" {
			return "", "", fmt.Errorf("unsupported scheme %q (want http or https)", scheme)
		}
	}
	hostport = strings.TrimSuffix(hostport, "/")
	if strings.ContainsAny(hostport, "/?#@ ") {
		return "", "", fmt.Errorf("want host:port, got %q", hostport)
	}
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return "", "", fmt.Errorf("want host:port: %w", err)
	}
	if host == "" {
		return "", "", fmt.Errorf("want host:port, got %q: empty host", hostport)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
		return "", "", fmt.Errorf("want host:port, got %q: bad port %q", hostport, port)
	}
	return scheme, hostport, nil
}

// normalize validates cfg and fills in defaults.
func (cfg ConsulConfig) normalize() (ConsulConfig, error) {
	if cfg.Address == "" {
		cfg.Address = DefaultConsulAddress
	}
	scheme, hostport, err := parseConsulAddress(cfg.Address)
	if err != nil {
		return cfg, fmt.Errorf("address %q: %w", cfg.Address, err)
	}
	cfg.Address = hostport
	switch strings.ToLower(cfg.Scheme) {
	case "":
		cfg.Scheme = "http"
	case "http", "https":
		cfg.Scheme = strings.ToLower(cfg.Scheme)
	default:
		return cfg, fmt.Errorf("scheme %q: want http or https", cfg.Scheme)
	}
	if scheme == "https" {
		cfg.Scheme = "https"
	}
	if (cfg.CertFile == "") != (cfg.KeyFile == "") {
		return cfg, fmt.Errorf("client certificate %q and key %q: set both or neither", cfg.CertFile, cfg.KeyFile)
	}
	if cfg.Prefix, err = normalizePrefix(cfg.Prefix); err != nil {
		return cfg, err
	}
	switch {
	case cfg.Timeout == 0:
		cfg.Timeout = DefaultTimeout
	case cfg.Timeout < 0:
		return cfg, fmt.Errorf("timeout %s: negative", cfg.Timeout)
	}
	return cfg, nil
}
