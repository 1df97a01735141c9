//go:build tools

// Package tools pins the Consul agent that tests run against. It is built
// by `make consul` into bin/consul and never linked into the plugin.
package tools

import _ "github.com/hashicorp/consul"
