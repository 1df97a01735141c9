package main

import (
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestServerEmptyBody: a call that takes arguments sent without a body (the
// engine's retry after the plugin restarted under the call) is refused with
// an error that says so, before any driver method sees a request that
// names nothing; an argument-less call still answers without one.
func TestServerEmptyBody(t *testing.T) {
	s := newServer(slog.New(slog.NewTextHandler(io.Discard, nil)), nil, nil)
	post := func(method, body string) (int, map[string]any) {
		t.Helper()
		w := httptest.NewRecorder()
		s.ServeHTTP(w, httptest.NewRequest(http.MethodPost, method, strings.NewReader(body)))
		var out map[string]any
		if err := json.Unmarshal(w.Body.Bytes(), &out); err != nil {
			t.Fatalf("%s: answer %q is not JSON: %v", method, w.Body.String(), err)
		}
		return w.Code, out
	}
	for _, method := range []string{"/NetworkDriver.CreateEndpoint", "/NetworkDriver.Join", "/IpamDriver.RequestAddress", "/IpamDriver.ReleasePool"} {
		for _, body := range []string{"", " \n"} {
			code, out := post(method, body)
			msg, _ := out["Err"].(string)
			if code != http.StatusBadRequest || !strings.Contains(msg, "empty request body") || !strings.Contains(msg, "restarted") {
				t.Errorf("%s with body %q: %d %v; want 400 naming the empty body and the restart", method, body, code, out)
			}
		}
	}
	if code, out := post("/Plugin.Activate", ""); code != http.StatusOK || out["Implements"] == nil {
		t.Errorf("/Plugin.Activate without a body: %d %v", code, out)
	}
}
