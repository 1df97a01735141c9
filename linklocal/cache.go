package linklocal

import (
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// maxCacheTTL caps how long any answer is kept, whatever its TTL says.
const maxCacheTTL = time.Hour

// cacheKey identifies a question and the parts of the request that change
// the answer's form: whether the client speaks EDNS, and the DO and CD bits.
type cacheKey struct {
	name          string // lower-case
	qtype, qclass uint16
	edns, do, cd  bool
}

func keyOf(req *dns.Msg) cacheKey {
	q := req.Question[0]
	k := cacheKey{name: strings.ToLower(q.Name), qtype: q.Qtype, qclass: q.Qclass, cd: req.CheckingDisabled}
	if o := req.IsEdns0(); o != nil {
		k.edns, k.do = true, o.Do()
	}
	return k
}

type cacheEntry struct {
	msg     *dns.Msg
	stored  time.Time
	expires time.Time
}

// cache keeps answers for as long as their TTLs allow. It is safe for
// concurrent use.
type cache struct {
	mu  sync.Mutex
	m   map[cacheKey]cacheEntry
	max int
}

func newCache(max int) *cache {
	return &cache{m: map[cacheKey]cacheEntry{}, max: max}
}

// ttlOf is how long msg may be cached: the smallest TTL of its records
// (the OPT pseudo-record aside); for a negative answer (NXDOMAIN, or no
// answer records) the SOA's TTL or minimum, whichever is smaller (RFC
// 2308). Zero: not cacheable (SERVFAIL and other errors, truncated
// answers, negative answers without a SOA).
func ttlOf(msg *dns.Msg) time.Duration {
	if msg.Truncated || (msg.Rcode != dns.RcodeSuccess && msg.Rcode != dns.RcodeNameError) {
		return 0
	}
	negative := msg.Rcode == dns.RcodeNameError || len(msg.Answer) == 0
	lo, seen := uint32(0), false
	take := func(t uint32) {
		if !seen || t < lo {
			lo, seen = t, true
		}
	}
	if negative {
		for _, rr := range msg.Ns {
			if soa, ok := rr.(*dns.SOA); ok {
				take(soa.Hdr.Ttl)
				take(soa.Minttl)
			}
		}
	} else {
		for _, sec := range [][]dns.RR{msg.Answer, msg.Ns, msg.Extra} {
			for _, rr := range sec {
				if rr.Header().Rrtype == dns.TypeOPT {
					continue
				}
				take(rr.Header().Ttl)
			}
		}
	}
	if !seen {
		return 0
	}
	return min(time.Duration(lo)*time.Second, maxCacheTTL)
}

// get returns a copy of the cached answer to k with its TTLs lowered by
// the time it spent in the cache, or nil.
func (c *cache) get(k cacheKey, now time.Time) *dns.Msg {
	c.mu.Lock()
	e, ok := c.m[k]
	if ok && !now.Before(e.expires) {
		delete(c.m, k)
		ok = false
	}
	c.mu.Unlock()
	if !ok {
		return nil
	}
	msg := e.msg.Copy()
	age := uint32(now.Sub(e.stored) / time.Second)
	for _, sec := range [][]dns.RR{msg.Answer, msg.Ns, msg.Extra} {
		for _, rr := range sec {
			h := rr.Header()
			if h.Rrtype == dns.TypeOPT {
				continue
			}
			if h.Ttl > age {
				h.Ttl -= age
			} else {
				h.Ttl = 0
			}
		}
	}
	return msg
}

// put keeps msg for its TTL (ttlOf); an answer that may not be cached is
// ignored. When the cache is full, expired entries go first, then
// arbitrary ones.
func (c *cache) put(k cacheKey, msg *dns.Msg, now time.Time) {
	ttl := ttlOf(msg)
	if ttl <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= c.max {
		for key, e := range c.m {
			if !now.Before(e.expires) {
				delete(c.m, key)
			}
		}
		for key := range c.m {
			if len(c.m) < c.max {
				break
			}
			delete(c.m, key)
		}
	}
	c.m[k] = cacheEntry{msg: msg.Copy(), stored: now, expires: now.Add(ttl)}
}

// len is the number of entries, expired ones included.
func (c *cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}
