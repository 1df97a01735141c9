package dockerapi

// The network calls the cluster-wide network syncer needs: the full
// Docker-side description of networks (list and inspect), create, remove,
// and the installed plugins (to learn the name this plugin is installed
// under). Fields read here (Id, Name, Created, Driver, EnableIPv6,
// Internal, Attachable, IPAM.{Driver,Options,Config}, Options, Labels,
// Containers; Name, Enabled, Config.Interface.{Types,Socket} of plugins)
// are the same from 1.24 to 1.52.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// ErrConflict is returned by CreateNetwork when the engine already has a
// network of that name, and by RemoveNetwork when the network is in use.
var ErrConflict = errors.New("conflict")

// NetworkDetail is a network as the engine describes it.
type NetworkDetail struct {
	ID         string
	Name       string
	Created    time.Time
	Driver     string
	Internal   bool
	Attachable bool
	EnableIPv6 bool
	IPAM       NetworkIPAM
	Options    map[string]string
	Labels     map[string]string
	// Containers counts the containers attached (inspect only; a list
	// answer leaves it -1).
	Containers int
}

// NetworkIPAM is a network's IPAM section.
type NetworkIPAM struct {
	Driver  string
	Options map[string]string
	Config  []NetworkIPAMConfig
}

// NetworkIPAMConfig is one IPAM configuration entry.
type NetworkIPAMConfig struct {
	Subnet             string            `json:",omitempty"`
	IPRange            string            `json:",omitempty"`
	Gateway            string            `json:",omitempty"`
	AuxiliaryAddresses map[string]string `json:"AuxiliaryAddresses,omitempty"`
}

// NetworkCreate is a request to create a network.
type NetworkCreate struct {
	Name       string
	Driver     string
	Internal   bool
	Attachable bool
	EnableIPv6 bool
	IPAM       NetworkIPAM
	Options    map[string]string
	Labels     map[string]string
}

type rawNetwork struct {
	ID         string `json:"Id"`
	Name       string
	Created    time.Time
	Driver     string
	Internal   bool
	Attachable bool
	EnableIPv6 bool
	IPAM       struct {
		Driver  string
		Options map[string]string
		Config  []NetworkIPAMConfig
	}
	Options    map[string]string
	Labels     map[string]string
	Containers map[string]json.RawMessage
}

func (r rawNetwork) detail(containers int) NetworkDetail {
	return NetworkDetail{
		ID: r.ID, Name: r.Name, Created: r.Created, Driver: r.Driver,
		Internal: r.Internal, Attachable: r.Attachable, EnableIPv6: r.EnableIPv6,
		IPAM:    NetworkIPAM{Driver: r.IPAM.Driver, Options: r.IPAM.Options, Config: r.IPAM.Config},
		Options: r.Options, Labels: r.Labels, Containers: containers,
	}
}

// ListNetworkDetails lists every network of the engine, fully described
// (Containers is -1: the list does not say).
func (c *Client) ListNetworkDetails(ctx context.Context) ([]NetworkDetail, error) {
	var raw []rawNetwork
	if err := c.call(ctx, http.MethodGet, "/networks", &raw); err != nil {
		return nil, fmt.Errorf("docker list networks: %w", err)
	}
	out := make([]NetworkDetail, 0, len(raw))
	for _, r := range raw {
		out = append(out, r.detail(-1))
	}
	return out, nil
}

// InspectNetworkDetail describes one network, by ID or name; a network
// the engine does not have is ErrNotFound.
func (c *Client) InspectNetworkDetail(ctx context.Context, id string) (NetworkDetail, error) {
	if id == "" || strings.ContainsAny(id, "/?#") {
		return NetworkDetail{}, fmt.Errorf("docker inspect network %q: invalid id", id)
	}
	var raw rawNetwork
	if err := c.call(ctx, http.MethodGet, "/networks/"+url.PathEscape(id), &raw); err != nil {
		if se := (*StatusError)(nil); errors.As(err, &se) && se.Code == http.StatusNotFound {
			return NetworkDetail{}, fmt.Errorf("docker inspect network %q: %w", id, ErrNotFound)
		}
		return NetworkDetail{}, fmt.Errorf("docker inspect network %q: %w", id, err)
	}
	return raw.detail(len(raw.Containers)), nil
}

// CreateNetwork creates a network and returns its ID. A name the engine
// already has is ErrConflict.
func (c *Client) CreateNetwork(ctx context.Context, req NetworkCreate) (string, error) {
	body := struct {
		NetworkCreate
		CheckDuplicate bool
	}{req, true}
	var out struct {
		ID string `json:"Id"`
	}
	if err := c.postJSON(ctx, "/networks/create", body, &out); err != nil {
		if se := (*StatusError)(nil); errors.As(err, &se) && se.Code == http.StatusConflict {
			return "", fmt.Errorf("docker create network %q: %w: %w", req.Name, ErrConflict, err)
		}
		return "", fmt.Errorf("docker create network %q: %w", req.Name, err)
	}
	return out.ID, nil
}

// RemoveNetwork removes a network by ID or name. A network the engine
// does not have is success; one in use is ErrConflict.
func (c *Client) RemoveNetwork(ctx context.Context, id string) error {
	if id == "" || strings.ContainsAny(id, "/?#") {
		return fmt.Errorf("docker remove network %q: invalid id", id)
	}
	err := c.call(ctx, http.MethodDelete, "/networks/"+url.PathEscape(id), nil)
	if se := (*StatusError)(nil); errors.As(err, &se) {
		switch se.Code {
		case http.StatusNotFound:
			return nil
		case http.StatusConflict, http.StatusForbidden:
			return fmt.Errorf("docker remove network %q: %w: %w", id, ErrConflict, err)
		}
	}
	if err != nil {
		return fmt.Errorf("docker remove network %q: %w", id, err)
	}
	return nil
}

// Plugin is one installed managed plugin.
type Plugin struct {
	Name    string
	Enabled bool
	// Socket is the socket file name the plugin listens on, inside its
	// rootfs's /run/docker/plugins.
	Socket string
	// Types are the interfaces it implements ("docker.networkdriver/1.0").
	Types []string
	// Env are its settings ("NAME=value"), as `docker plugin set` left
	// them: the environment its process runs with.
	Env []string
}

// Plugins lists the managed plugins.
func (c *Client) Plugins(ctx context.Context) ([]Plugin, error) {
	var raw []struct {
		Name    string
		Enabled bool
		Config  struct {
			Interface struct {
				Socket string
				Types  []string
			}
		}
		Settings struct {
			Env []string
		}
	}
	if err := c.call(ctx, http.MethodGet, "/plugins", &raw); err != nil {
		return nil, fmt.Errorf("docker list plugins: %w", err)
	}
	out := make([]Plugin, 0, len(raw))
	for _, r := range raw {
		out = append(out, Plugin{Name: r.Name, Enabled: r.Enabled, Socket: r.Config.Interface.Socket, Types: r.Config.Interface.Types, Env: r.Settings.Env})
	}
	return out, nil
}

// postJSON sends a versioned POST with a JSON body and decodes the answer.
func (c *Client) postJSON(ctx context.Context, path string, in, out any) error {
	v, err := c.Negotiate(ctx)
	if err != nil {
		return err
	}
	b, err := json.Marshal(in)
	if err != nil {
		return err
	}
	if c.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.Timeout)
		defer cancel()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://docker/v"+v+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("POST %s via %s: %w", path, c.socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return statusError(resp)
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("POST %s: decode answer: %w", path, err)
	}
	return nil
}
