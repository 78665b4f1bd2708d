package passthrough

import (
	"encoding/binary"
	"hash/crc32"
	"sort"
	"strings"
)

// pointsPerWeight is nginx's number of ring points per unit of weight.
const pointsPerWeight = 160

// Ring is nginx's consistent-hash ring (ngx_stream_upstream_hash_module,
// `hash KEY consistent`), so that moving between nginx and this balancer
// does not reshuffle clients. It is immutable and safe for concurrent use.
type Ring struct {
	hashes  []uint32 // sorted, deduplicated
	servers []int    // index into the upstream list, per point
}

// NewRing builds the ring for servers, written as in nginx's server
// directive ("app1:443"), with their weights (zero counts as one).
//
// Point i of a server is the CRC32 of HOST "\0" PORT followed by point
// i-1's four bytes, little-endian (zero for the first): the ketama scheme
// nginx shares with Cache::Memcached::Fast.
func NewRing(servers []string, weights []int) *Ring {
	type point struct {
		hash   uint32
		server int
	}
	var pts []point
	for i, s := range servers {
		host, port := splitServer(s)
		w := 1
		if i < len(weights) && weights[i] > 0 {
			w = weights[i]
		}
		base := make([]byte, 0, len(host)+1+len(port)+4)
		base = append(append(append(base, host...), 0), port...)
		var prev [4]byte
		for range w * pointsPerWeight {
			h := crc32.ChecksumIEEE(append(base, prev[:]...))
			pts = append(pts, point{h, i})
			binary.LittleEndian.PutUint32(prev[:], h)
		}
	}
	// nginx sorts with qsort (not stable) and keeps the first of equal
	// hashes; collisions are one in millions per pair of points.
	sort.SliceStable(pts, func(a, b int) bool { return pts[a].hash < pts[b].hash })
	r := &Ring{}
	for i, p := range pts {
		if i > 0 && p.hash == pts[i-1].hash {
			continue
		}
		r.hashes = append(r.hashes, p.hash)
		r.servers = append(r.servers, p.server)
	}
	return r
}

// splitServer splits "host:port" as nginx does: the port is the digits
// after the last colon, if any.
func splitServer(s string) (host, port string) {
	if strings.HasPrefix(strings.ToLower(s), "unix:") {
		return s[5:], ""
	}
	for j := len(s) - 1; j >= 0; j-- {
		c := s[j]
		if c == ':' {
			return s[:j], s[j+1:]
		}
		if c < '0' || c > '9' {
			break
		}
	}
	return s, ""
}

// Start returns the index of the first point at or after key's hash (the
// CRC32 of the key, as nginx hashes $remote_addr). Candidates are then
// Server(start), Server(start+1), ...
func (r *Ring) Start(key string) int {
	h := crc32.ChecksumIEEE([]byte(key))
	return sort.Search(len(r.hashes), func(i int) bool { return r.hashes[i] >= h })
}

// Server returns the upstream index of point i, wrapping around the ring.
func (r *Ring) Server(i int) int {
	return r.servers[i%len(r.servers)]
}

// Len is the number of points.
func (r *Ring) Len() int { return len(r.hashes) }
