package dockerapi

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"testing"
)

func TestNetworkCalls(t *testing.T) {
	var created map[string]any
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1.52/networks/create", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Content-Type") != "application/json" {
			http.Error(w, `{"message":"Content-Type specified () must be 'application/json'"}`, http.StatusBadRequest)
			return
		}
		if err := json.NewDecoder(r.Body).Decode(&created); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if created["Name"] == "taken" {
			w.WriteHeader(http.StatusConflict)
			w.Write([]byte(`{"message":"network with name taken already exists"}`))
			return
		}
		w.Write([]byte(`{"Id":"n1"}`))
	})
	mux.HandleFunc("GET /v1.52/networks/{id}", func(w http.ResponseWriter, r *http.Request) {
		if r.PathValue("id") != "app" {
			http.Error(w, `{"message":"network not found"}`, http.StatusNotFound)
			return
		}
		w.Write([]byte(`{"Id":"n1","Name":"app","Driver":"co:latest","Created":"2026-01-02T03:04:05.123Z","Internal":true,
			"IPAM":{"Driver":"co:latest","Config":[{"Subnet":"10.1.0.0/24","Gateway":"10.1.0.1","AuxiliaryAddresses":{"a":"10.1.0.9"}}]},
			"Options":{"register":"false"},"Labels":{"l":"v"},"Containers":{"c1":{},"c2":{}}}`))
	})
	mux.HandleFunc("DELETE /v1.52/networks/{id}", func(w http.ResponseWriter, r *http.Request) {
		switch r.PathValue("id") {
		case "gone":
			http.Error(w, `{"message":"network gone not found"}`, http.StatusNotFound)
		case "used":
			http.Error(w, `{"message":"error while removing network: network used has active endpoints"}`, http.StatusForbidden)
		default:
			w.WriteHeader(http.StatusNoContent)
		}
	})
	mux.HandleFunc("GET /v1.52/plugins", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`[{"Name":"co:latest","Enabled":true,"Config":{"Interface":{"Socket":"co.sock","Types":["docker.networkdriver/1.0","docker.ipamdriver/1.0"]}}}]`))
	})
	c := New(fakeEngine(t, versionHandler("1.52", mux)))
	ctx := context.Background()

	id, err := c.CreateNetwork(ctx, NetworkCreate{Name: "app", Driver: "co:latest", Labels: map[string]string{"l": "v"},
		IPAM: NetworkIPAM{Driver: "co:latest", Config: []NetworkIPAMConfig{{Subnet: "10.1.0.0/24"}}}})
	if err != nil || id != "n1" {
		t.Fatalf("create: %q %v", id, err)
	}
	if created["Driver"] != "co:latest" || created["IPAM"].(map[string]any)["Config"].([]any)[0].(map[string]any)["Subnet"] != "10.1.0.0/24" {
		t.Errorf("create sent %v", created)
	}
	if _, err := c.CreateNetwork(ctx, NetworkCreate{Name: "taken"}); !errors.Is(err, ErrConflict) {
		t.Errorf("create of a taken name: %v, want ErrConflict", err)
	}
	n, err := c.InspectNetworkDetail(ctx, "app")
	if err != nil {
		t.Fatal(err)
	}
	if n.Containers != 2 || !n.Internal || n.IPAM.Config[0].AuxiliaryAddresses["a"] != "10.1.0.9" || n.Labels["l"] != "v" || n.Created.IsZero() {
		t.Errorf("inspect: %+v", n)
	}
	if _, err := c.InspectNetworkDetail(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("inspect of a missing network: %v", err)
	}
	if err := c.RemoveNetwork(ctx, "gone"); err != nil {
		t.Errorf("remove of a missing network: %v, want success", err)
	}
	if err := c.RemoveNetwork(ctx, "used"); !errors.Is(err, ErrConflict) {
		t.Errorf("remove of a used network: %v, want ErrConflict", err)
	}
	if err := c.RemoveNetwork(ctx, "n1"); err != nil {
		t.Errorf("remove: %v", err)
	}
	ps, err := c.Plugins(ctx)
	if err != nil || len(ps) != 1 || ps[0].Socket != "co.sock" || ps[0].Types[0] != "docker.networkdriver/1.0" || !ps[0].Enabled {
		t.Errorf("plugins: %+v %v", ps, err)
	}
}
