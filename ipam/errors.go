package ipam

import "errors"

// Sentinel errors callers branch on with errors.Is. Wrapped errors name the
// pool (by ID) and the address concerned.
var (
	// ErrPoolExhausted: no free address is left in the pool (or its
	// sub-range), or no free subnet is left in the default range.
	ErrPoolExhausted = errors.New("pool exhausted")
	// ErrPoolOverlap: the requested subnet overlaps a pool in use on some
	// host, or the same subnet is in use with a different sub-range.
	ErrPoolOverlap = errors.New("pool overlaps a pool in use")
	// ErrAddressInUse: the requested address is held by someone else.
	ErrAddressInUse = errors.New("address in use")
	// ErrAddressOutOfRange: the address is outside the pool, or is the
	// network, broadcast or subnet-router anycast address.
	ErrAddressOutOfRange = errors.New("address out of range")
	// ErrUnknownPool: no pool with this ID is held by any host.
	ErrUnknownPool = errors.New("unknown pool")
	// ErrInvalidRequest: the request is malformed (bad CIDR, wrong family,
	// pool too large, unknown address space...).
	ErrInvalidRequest = errors.New("invalid request")
)
