package discovery

import (
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"

	"consul-overlay/internal/dockerapi"
)

// TestHandleEvent checks which events lead to an inspection: a start or
// network connect of a container that has an endpoint waiting for
// metadata, and nothing else.
func TestHandleEvent(t *testing.T) {
	client, err := api.NewClient(&api.Config{Address: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	r, err := New(Config{Node: "n", Agent: client, Docker: dockerapi.New("/nonexistent.sock")})
	if err != nil {
		t.Fatal(err)
	}
	waiting := "aaaaaaaaaaaa" + strings.Repeat("1", 52)
	known := "bbbbbbbbbbbb" + strings.Repeat("2", 52)
	other := "cccccccccccc" + strings.Repeat("3", 52)
	r.Register(Endpoint{ID: "e1", ContainerID: waiting[:12], Register: true})
	r.Register(Endpoint{ID: "e2", ContainerID: known[:12], Register: true})
	r.mu.Lock()
	r.setMetaLocked(&dockerapi.Container{ID: known, Name: "k"})
	r.mu.Unlock()

	tests := []struct {
		name string
		ev   dockerapi.Event
		want []string
	}{
		{"start of a waiting container", dockerapi.Event{Type: "container", Action: "start", ActorID: waiting}, []string{waiting}},
		{"network connect of a waiting container", dockerapi.Event{Type: "network", Action: "connect", ActorID: "net",
			Attributes: map[string]string{"container": waiting}}, []string{waiting}},
		{"start of a container whose metadata is known", dockerapi.Event{Type: "container", Action: "start", ActorID: known}, nil},
		{"start of a container without endpoints", dockerapi.Event{Type: "container", Action: "start", ActorID: other}, nil},
		{"die", dockerapi.Event{Type: "container", Action: "die", ActorID: waiting}, nil},
		{"network disconnect", dockerapi.Event{Type: "network", Action: "disconnect", ActorID: "net",
			Attributes: map[string]string{"container": waiting}}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r.handleEvent(tt.ev)
			var got []string
			for len(r.inspectC) > 0 {
				cid := <-r.inspectC
				r.mu.Lock()
				delete(r.inspectOn, cid)
				r.mu.Unlock()
				got = append(got, cid)
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("queued %v, want %v", got, tt.want)
			}
		})
	}

	// destroy forgets the cached metadata; a later endpoint of that ID
	// waits for an event again.
	r.handleEvent(dockerapi.Event{Type: "container", Action: "destroy", ActorID: known})
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.metaLocked(Endpoint{ID: "e-destroyed", ContainerID: known[:12]}) != nil {
		t.Error("metadata kept after destroy")
	}
	if r.eps["e2"].info == nil {
		t.Error("an endpoint lost metadata it already had")
	}
}
