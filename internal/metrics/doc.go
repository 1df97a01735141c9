// Package metrics holds consul-overlay's Prometheus registry and the
// definitions of its metrics. It knows the names and the labels; the
// plugin calls its Observe methods at the points it instruments (the
// HTTP routes, the store through kvstore.Metered, the data plane's peer
// syncs and reconciles) and hands it functions that read state lazily at
// scrape time (the kernel's overlays, the IPAM allocations, the underlay
// filter's drop counter).
//
// The metrics, all prefixed consul_overlay_:
//
//	requests_total{method,result}                 driver calls (result ok|error)
//	request_duration_seconds{method}              their latency (histogram)
//	store_operations_total{op,result}             store calls (result ok|not_found|conflict|unavailable|permission_denied|error)
//	store_operation_duration_seconds{op}          their latency (histogram)
//	store_cas_conflicts_total{op}                 compare-and-set and transaction conflicts
//	store_watch_updates_total                     snapshots delivered by store watches
//	reconcile_runs_total{kind,result}             data-plane syncs (kind peers|full|vtep)
//	reconcile_changes_total{kind}                 kernel writes they made
//	network_local_endpoints{vni}                  local endpoints (bridge ports) per overlay
//	network_peers{vni}                            remote endpoint addresses programmed (neighbour entries)
//	network_remote_vteps{vni}                     remote hosts in the flood list
//	ipam_addresses_allocated{space,subnet}        allocated addresses per pool, cluster-wide
//	vxlan_underlay_drops_total                    VXLAN packets dropped by the underlay allowlist
//
// plus the Go runtime and process collectors. The registry is private
// (never prometheus.DefaultRegisterer), so tests build as many as they
// like.
package metrics
