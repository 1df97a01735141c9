// Package consulacl proves what the Consul token (CONSUL_HTTP_TOKEN) may
// do for consul-overlay: the least-privilege policy the plugin needs, and
// the probes that show, rule by rule, whether a token holds it. The plugin
// runs the probes at start, before it writes anything to the store;
// `consul-overlay doctor` runs the same probes and reports each missing
// rule with what to add.
//
// The probes leave nothing behind: the KV write probe is a compare-and-set
// that can never match (Consul checks the ACL before the index, so a
// refusal is a 403 and a grant is a "false" that writes nothing); the
// session probe creates a session with a short TTL and destroys it; the
// service probe registers a service named consul-overlay-probe on the local
// agent and deregisters it at once. Agent and node read are plain reads.
//
// The KV write probe talks to Consul's KV API directly rather than through
// package kvstore: it is not a store operation but a question to Consul's
// ACL system, and it must never write.
package consulacl
