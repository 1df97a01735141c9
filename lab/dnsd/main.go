// Command dnsd is the lab's "outside world" resolver: a small DNS server
// (UDP and TCP) for the zone lab.test, run by lab/up.sh in the Consul
// server's namespace. The plugins of both lab hosts use it as their
// upstream (LINKLOCAL_UPSTREAM), so the names a container resolves
// through the well-known address that are not Consul's come from here:
//
//	outside.lab.test.  A 203.0.113.80, AAAA 2001:db8::80 (TTL 60)
//	big.lab.test.      60 A records 203.0.113.1-60 (too big for 512 bytes of UDP)
//	anything else      NXDOMAIN with the zone's SOA (minimum 30 s)
//
// Usage: dnsd -listen 198.51.100.3:5353
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/miekg/dns"
)

const zone = "lab.test."

func rr(s string) dns.RR {
	r, err := dns.NewRR(s)
	if err != nil {
		panic(err)
	}
	return r
}

// answer fills m for the question q.
func answer(m *dns.Msg, q dns.Question) {
	name := strings.ToLower(q.Name)
	if !dns.IsSubDomain(zone, name) {
		m.Rcode = dns.RcodeRefused
		return
	}
	var rrs []dns.RR
	switch name {
	case "outside." + zone:
		rrs = []dns.RR{rr(q.Name + " 60 IN A 203.0.113.80"), rr(q.Name + " 60 IN AAAA 2001:db8::80")}
	case "big." + zone:
		for i := 1; i <= 60; i++ {
			rrs = append(rrs, rr(fmt.Sprintf("%s 60 IN A 203.0.113.%d", q.Name, i)))
		}
	case zone:
	default:
		m.Rcode = dns.RcodeNameError
	}
	m.Authoritative = true
	for _, r := range rrs {
		if r.Header().Rrtype == q.Qtype {
			m.Answer = append(m.Answer, r)
		}
	}
	if len(m.Answer) == 0 {
		m.Ns = []dns.RR{rr(zone + " 30 IN SOA ns." + zone + " hostmaster." + zone + " 1 3600 600 86400 30")}
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:5353", "address:port to serve on (UDP and TCP)")
	flag.Parse()
	h := dns.HandlerFunc(func(w dns.ResponseWriter, req *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(req)
		if len(req.Question) == 1 {
			answer(m, req.Question[0])
		} else {
			m.Rcode = dns.RcodeFormatError
		}
		if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
			size := dns.MinMsgSize
			if o := req.IsEdns0(); o != nil {
				size = max(size, int(o.UDPSize()))
			}
			m.Truncate(size)
		}
		_ = w.WriteMsg(m)
	})
	errc := make(chan error, 2)
	for _, proto := range []string{"udp", "tcp"} {
		s := &dns.Server{Addr: *listen, Net: proto, Handler: h}
		go func() { errc <- s.ListenAndServe() }()
	}
	log.Printf("dnsd: serving %s on %s (udp, tcp)", zone, *listen)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case err := <-errc:
		log.Fatalf("dnsd: %v", err)
	case s := <-sig:
		log.Printf("dnsd: %v: stopping", s)
	}
}
