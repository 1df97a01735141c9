package linklocal

import (
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/url"
)

// NewAPIProxy returns the handler that passes every request on to the
// Consul agent's HTTP API at target (scheme and host:port) through rt
// (nil: http.DefaultTransport), as it came: method, path, query, body and
// headers, the caller's X-Consul-Token and Authorization included. It adds
// no token and no X-Forwarded-* header; answers stream through (blocking
// queries, /v1/agent/monitor). An agent that does not answer gives 502
// with the reason.
func NewAPIProxy(target *url.URL, rt http.RoundTripper, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
		},
		Transport:     rt,
		FlushInterval: -1,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			log.Debug("consul api proxy: agent did not answer", "path", r.URL.Path, "error", err)
			http.Error(w, fmt.Sprintf("consul-overlay: the host's Consul agent (%s) did not answer: %v", target.Host, err), http.StatusBadGateway)
		},
	}
}
