package dockerapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// API versions this client speaks (see the package documentation).
const (
	MinAPIVersion = "1.24"
	MaxAPIVersion = "1.52"
)

// Defaults.
const (
	DefaultSocket   = "/var/run/docker.sock"
	PluginSocket    = "/run/docker.sock"
	DefaultTimeout  = 10 * time.Second
	maxErrorBody    = 64 << 10
	maxInspectBytes = 16 << 20
)

// ErrNotFound is returned by Inspect for a container, and by
// InspectNetwork for a network, that the engine does not have.
var ErrNotFound = errors.New("not found")

// ErrStreamClosed is the error an event stream reports when the engine
// closed it cleanly (for example on shutdown).
var ErrStreamClosed = errors.New("event stream closed by the engine")

// Container is what Inspect returns.
type Container struct {
	// ID is the full 64-hex-digit container ID.
	ID string
	// Name is the container name without its leading "/".
	Name string
	// Env is Config.Env, "KEY=value" strings.
	Env []string
	// Labels is Config.Labels.
	Labels map[string]string
	// Running is State.Running.
	Running bool
	// Status is State.Status: "created", "running", "restarting",
	// "exited", ...
	Status string
	// EndpointIDs are the container's network endpoints (the IDs network
	// drivers get in CreateEndpoint and Join).
	EndpointIDs []string
	// Networks are the container's attachments (NetworkSettings.Networks).
	Networks []Attachment
}

// Attachment is one network a container is attached to. EndpointID is
// empty while the container has no endpoint on it (created, stopped, or
// starting and not yet recorded). NetworkID may be empty too for a
// container that was never connected (Docker 20.10 lists a created
// container's networks by name only): match on Name as well.
type Attachment struct {
	Name       string
	NetworkID  string
	EndpointID string
}

// Info is the part of GET /info that identifies the engine.
type Info struct {
	// ID is the engine's unique ID (stable across restarts of the same
	// engine, different on another engine).
	ID string
	// Name is the engine host's name.
	Name string
}

// Network is what InspectNetwork returns.
type Network struct {
	ID     string
	Name   string
	Driver string
	// Subnets are the subnets of the network's IPAM configuration, with
	// their IP ranges ("" for none); filled by ListNetworks only.
	Subnets []NetworkSubnet
}

// NetworkSubnet is one IPAM configuration entry of a network.
type NetworkSubnet struct {
	Subnet, IPRange string
}

// Summary is one entry of List.
type Summary struct {
	ID string
	// Names are the container's names without their leading "/".
	Names []string
	// Labels is the container's labels.
	Labels map[string]string
	// State is "created", "running", "exited", ...
	State string
	// EndpointIDs are the container's network endpoints.
	EndpointIDs []string
	// Networks are the container's attachments. The list is the engine's
	// view as of the container's last committed change: while a start is
	// in progress a container shows its previous state and no endpoint.
	Networks []Attachment
}

// Event is one message of the event stream.
type Event struct {
	// Type is "container", "network", ...
	Type string
	// Action is "start", "die", "destroy", "connect", ...
	Action string
	// ActorID is the object's ID: the container ID for container events,
	// the network ID for network events.
	ActorID string
	// Attributes holds the actor's attributes; a network connect event
	// names the container in Attributes["container"].
	Attributes map[string]string
	// Time is when the engine recorded the event.
	Time time.Time
}

// Client talks to one Docker engine. The zero value is not usable; build
// it with New.
type Client struct {
	// Timeout bounds each request except the event stream when the
	// caller's context has no earlier deadline. Set before first use.
	Timeout time.Duration

	socket string
	http   *http.Client

	mu      sync.Mutex // guards version
	version string     // negotiated, "" until then
}

// New returns a client for the engine listening on the unix socket at
// socketPath. It does not connect.
func New(socketPath string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socketPath)
		},
		MaxIdleConns:       4,
		IdleConnTimeout:    30 * time.Second,
		DisableCompression: true,
	}
	return &Client{
		Timeout: DefaultTimeout,
		socket:  socketPath,
		http:    &http.Client{Transport: tr},
	}
}

// SocketPath returns the engine's socket path: the path of a unix://
// DOCKER_HOST (read through getenv), else DefaultSocket if it exists, else
// PluginSocket if it exists, else DefaultSocket. Any other DOCKER_HOST
// scheme is an error.
func SocketPath(getenv func(string) string) (string, error) {
	if h := strings.TrimSpace(getenv("DOCKER_HOST")); h != "" {
		p, ok := strings.CutPrefix(h, "unix://")
		if !ok || p == "" {
			return "", fmt.Errorf("DOCKER_HOST=%q: only unix:///path is supported", h)
		}
		return p, nil
	}
	for _, p := range []string{DefaultSocket, PluginSocket} {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return DefaultSocket, nil
}

// Socket returns the socket path the client dials.
func (c *Client) Socket() string { return c.socket }

// Close releases idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// Negotiate asks the engine for its API version and settles on the lower
// of it and MaxAPIVersion. It returns the version in use. An engine older
// than MinAPIVersion is an error. After a success later calls return the
// cached version without asking again.
func (c *Client) Negotiate(ctx context.Context) (string, error) {
	c.mu.Lock()
	v := c.version
	c.mu.Unlock()
	if v != "" {
		return v, nil
	}
	var ver struct {
		APIVersion string `json:"ApiVersion"`
	}
	if err := c.do(ctx, http.MethodGet, "/version", nil, &ver); err != nil {
		return "", fmt.Errorf("docker negotiate api version via %s: %w", c.socket, err)
	}
	v, err := pickVersion(ver.APIVersion)
	if err != nil {
		return "", fmt.Errorf("docker negotiate api version via %s: %w", c.socket, err)
	}
	c.mu.Lock()
	c.version = v
	c.mu.Unlock()
	return v, nil
}

// pickVersion caps the server's version at MaxAPIVersion and refuses one
// below MinAPIVersion.
func pickVersion(server string) (string, error) {
	sv, err := parseVersion(server)
	if err != nil {
		return "", fmt.Errorf("engine api version %q: %w", server, err)
	}
	minV, _ := parseVersion(MinAPIVersion)
	maxV, _ := parseVersion(MaxAPIVersion)
	switch {
	case sv.less(minV):
		return "", fmt.Errorf("engine api version %s is older than %s", server, MinAPIVersion)
	case maxV.less(sv):
		return MaxAPIVersion, nil
	}
	return sv.String(), nil
}

type apiVersion struct{ major, minor int }

func (v apiVersion) less(o apiVersion) bool {
	return v.major < o.major || (v.major == o.major && v.minor < o.minor)
}

func (v apiVersion) String() string { return fmt.Sprintf("%d.%d", v.major, v.minor) }

func parseVersion(s string) (apiVersion, error) {
	maj, min, ok := strings.Cut(s, ".")
	if !ok {
		return apiVersion{}, errors.New("want MAJOR.MINOR")
	}
	a, err1 := strconv.Atoi(maj)
	b, err2 := strconv.Atoi(min)
	if err1 != nil || err2 != nil || a < 0 || b < 0 {
		return apiVersion{}, errors.New("want MAJOR.MINOR")
	}
	return apiVersion{a, b}, nil
}

// Inspect returns the container with this ID, full or a unique prefix, or
// a name. A container the engine does not know is ErrNotFound.
func (c *Client) Inspect(ctx context.Context, id string) (Container, error) {
	if id == "" || strings.ContainsAny(id, "/?#") {
		return Container{}, fmt.Errorf("docker inspect container %q: invalid id", id)
	}
	var raw struct {
		ID     string `json:"Id"`
		Name   string
		Config struct {
			Env    []string
			Labels map[string]string
		}
		State struct {
			Running bool
			Status  string
		}
		NetworkSettings networkSettings
	}
	if err := c.call(ctx, http.MethodGet, "/containers/"+url.PathEscape(id)+"/json", &raw); err != nil {
		if se := (*StatusError)(nil); errors.As(err, &se) && se.Code == http.StatusNotFound {
			return Container{}, fmt.Errorf("docker inspect container %q: %w", id, ErrNotFound)
		}
		return Container{}, fmt.Errorf("docker inspect container %q: %w", id, err)
	}
	return Container{
		ID:      raw.ID,
		Name:    strings.TrimPrefix(raw.Name, "/"),
		Env:     raw.Config.Env,
		Labels:  raw.Config.Labels,
		Running: raw.State.Running,
		Status:  raw.State.Status,

		EndpointIDs: raw.NetworkSettings.endpointIDs(),
		Networks:    raw.NetworkSettings.attachments(),
	}, nil
}

// networkSettings is the part of NetworkSettings that names the
// container's endpoints, in both inspect and list answers.
type networkSettings struct {
	Networks map[string]struct{ NetworkID, EndpointID string }
}

// attachments lists the networks sorted by name.
func (n networkSettings) attachments() []Attachment {
	var out []Attachment
	for name, nw := range n.Networks {
		out = append(out, Attachment{Name: name, NetworkID: nw.NetworkID, EndpointID: nw.EndpointID})
	}
	slices.SortFunc(out, func(a, b Attachment) int { return strings.Compare(a.Name, b.Name) })
	return out
}

func (n networkSettings) endpointIDs() []string {
	var ids []string
	for _, nw := range n.Networks {
		if nw.EndpointID != "" {
			ids = append(ids, nw.EndpointID)
		}
	}
	return ids
}

// List returns all containers the engine has, running or not (all=true).
func (c *Client) List(ctx context.Context) ([]Summary, error) {
	var raw []struct {
		ID              string `json:"Id"`
		Names           []string
		Labels          map[string]string
		State           string
		NetworkSettings networkSettings
	}
	if err := c.call(ctx, http.MethodGet, "/containers/json?all=true", &raw); err != nil {
		return nil, fmt.Errorf("docker list containers: %w", err)
	}
	out := make([]Summary, 0, len(raw))
	for _, r := range raw {
		s := Summary{ID: r.ID, Labels: r.Labels, State: r.State,
			EndpointIDs: r.NetworkSettings.endpointIDs(), Networks: r.NetworkSettings.attachments()}
		for _, n := range r.Names {
			s.Names = append(s.Names, strings.TrimPrefix(n, "/"))
		}
		out = append(out, s)
	}
	return out, nil
}

// NetworkContainers counts the containers attached to network id (named
// name), created and stopped ones included: the engine's network inspect
// lists only running ones, and a stopped container of a removed network
// cannot start again. A container created and never started names the
// network only by name, so the filter has both.
func (c *Client) NetworkContainers(ctx context.Context, id, name string) (int, error) {
	f, err := json.Marshal(map[string][]string{"network": {id, name}})
	if err != nil {
		return 0, err
	}
	var raw []struct {
		ID string `json:"Id"`
	}
	if err := c.call(ctx, http.MethodGet, "/containers/json?all=true&filters="+url.QueryEscape(string(f)), &raw); err != nil {
		return 0, fmt.Errorf("docker list containers of network %s: %w", id, err)
	}
	return len(raw), nil
}

// Info returns the engine's identity (GET /info).
func (c *Client) Info(ctx context.Context) (Info, error) {
	var raw struct {
		ID   string
		Name string
	}
	if err := c.call(ctx, http.MethodGet, "/info", &raw); err != nil {
		return Info{}, fmt.Errorf("docker info: %w", err)
	}
	if raw.ID == "" {
		return Info{}, errors.New("docker info: the engine answered without an ID")
	}
	return Info{ID: raw.ID, Name: raw.Name}, nil
}

// InspectNetwork returns the network with this ID (full or a unique
// prefix) or name. A network the engine does not know is ErrNotFound.
func (c *Client) InspectNetwork(ctx context.Context, id string) (Network, error) {
	if id == "" || strings.ContainsAny(id, "/?#") {
		return Network{}, fmt.Errorf("docker inspect network %q: invalid id", id)
	}
	var raw struct {
		ID     string `json:"Id"`
		Name   string
		Driver string
	}
	if err := c.call(ctx, http.MethodGet, "/networks/"+url.PathEscape(id), &raw); err != nil {
		if se := (*StatusError)(nil); errors.As(err, &se) && se.Code == http.StatusNotFound {
			return Network{}, fmt.Errorf("docker inspect network %q: %w", id, ErrNotFound)
		}
		return Network{}, fmt.Errorf("docker inspect network %q: %w", id, err)
	}
	return Network{ID: raw.ID, Name: raw.Name, Driver: raw.Driver}, nil
}

// ListNetworks lists every network of the engine with its IPAM subnets.
func (c *Client) ListNetworks(ctx context.Context) ([]Network, error) {
	var raw []struct {
		ID     string `json:"Id"`
		Name   string
		Driver string
		IPAM   struct {
			Config []struct{ Subnet, IPRange string }
		}
	}
	if err := c.call(ctx, http.MethodGet, "/networks", &raw); err != nil {
		return nil, fmt.Errorf("docker list networks: %w", err)
	}
	out := make([]Network, 0, len(raw))
	for _, r := range raw {
		n := Network{ID: r.ID, Name: r.Name, Driver: r.Driver}
		for _, c := range r.IPAM.Config {
			n.Subnets = append(n.Subnets, NetworkSubnet{Subnet: c.Subnet, IPRange: c.IPRange})
		}
		out = append(out, n)
	}
	return out, nil
}

// Events subscribes to the engine's event stream. since, when not zero,
// asks the engine to replay the events it still holds from that time on
// (the engine keeps a short in-memory log), which closes the gap between
// a subscription and the caller's catch-up, and between two
// subscriptions. filters is the engine's filter map, for example
// {"type": {"container"}, "event": {"start", "destroy"}}.
//
// The returned error reports a failed subscription (engine unreachable,
// refused request). After a nil error events arrive on the first channel
// until the stream ends; then the second channel receives exactly one
// error saying why (ctx.Err() when ctx ended, ErrStreamClosed when the
// engine closed it) and both channels are closed. The stream's goroutine
// stops when ctx ends, also while the caller is not receiving.
func (c *Client) Events(ctx context.Context, since time.Time, filters map[string][]string) (<-chan Event, <-chan error, error) {
	v, err := c.Negotiate(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("docker events: %w", err)
	}
	q := url.Values{}
	if len(filters) > 0 {
		b, err := json.Marshal(filters)
		if err != nil {
			return nil, nil, fmt.Errorf("docker events: filters: %w", err)
		}
		q.Set("filters", string(b))
	}
	if !since.IsZero() {
		q.Set("since", fmt.Sprintf("%d.%09d", since.Unix(), since.Nanosecond()))
	}
	path := "/v" + v + "/events"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker"+path, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("docker events: %w", err)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, nil, fmt.Errorf("docker events via %s: %w", c.socket, err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		return nil, nil, fmt.Errorf("docker events: %w", statusError(resp))
	}
	events := make(chan Event)
	errc := make(chan error, 1)
	go func() {
		defer close(errc)
		defer close(events)
		defer resp.Body.Close()
		errc <- readEvents(ctx, resp.Body, events)
	}()
	return events, errc, nil
}

// readEvents decodes messages from body onto out until the stream or ctx
// ends.
func readEvents(ctx context.Context, body io.Reader, out chan<- Event) error {
	dec := json.NewDecoder(body)
	for {
		var m struct {
			Type   string
			Action string
			Status string `json:"status"`
			ID     string `json:"id"`
			Actor  struct {
				ID         string
				Attributes map[string]string
			}
			TimeNano int64 `json:"timeNano"`
		}
		if err := dec.Decode(&m); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, io.EOF) {
				return ErrStreamClosed
			}
			return fmt.Errorf("docker events: decode: %w", err)
		}
		ev := Event{
			Type:       m.Type,
			Action:     m.Action,
			ActorID:    m.Actor.ID,
			Attributes: m.Actor.Attributes,
			Time:       time.Unix(0, m.TimeNano),
		}
		// Very old engines sent only status and id.
		if ev.Action == "" {
			ev.Action = m.Status
		}
		if ev.ActorID == "" {
			ev.ActorID = m.ID
		}
		select {
		case out <- ev:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// call negotiates if needed and does a versioned request.
func (c *Client) call(ctx context.Context, method, path string, out any) error {
	v, err := c.Negotiate(ctx)
	if err != nil {
		return err
	}
	return c.do(ctx, method, "/v"+v+path, nil, out)
}

// do runs one bounded request and decodes a 2xx JSON answer into out.
func (c *Client) do(ctx context.Context, method, path string, body io.Reader, out any) error {
	if c.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.Timeout)
		defer cancel()
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://docker"+path, body)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s via %s: %w", method, path, c.socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return statusError(resp)
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxInspectBytes)).Decode(out); err != nil {
		return fmt.Errorf("%s %s: decode answer: %w", method, path, err)
	}
	return nil
}

// StatusError is an answer of the engine outside 2xx.
type StatusError struct {
	Code    int
	Status  string
	Message string // the engine's "message", or the body
}

func (e *StatusError) Error() string {
	if e.Message == "" {
		return "engine answered " + e.Status
	}
	return "engine answered " + e.Status + ": " + e.Message
}

// statusError reads a non-2xx answer into a *StatusError.
func statusError(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	msg := strings.TrimSpace(string(b))
	var m struct {
		Message string `json:"message"`
	}
	if json.Unmarshal(b, &m) == nil && m.Message != "" {
		msg = m.Message
	}
	return &StatusError{Code: resp.StatusCode, Status: resp.Status, Message: msg}
}
