package passthrough

import (
	"fmt"
	"hash/crc32"
	"testing"
)

func TestSplitServer(t *testing.T) {
	for in, want := range map[string][2]string{
		"app1:443": {"app1", "443"}, "127.0.0.1:8443": {"127.0.0.1", "8443"},
		"[::1]:443": {"[::1]", "443"}, "app1": {"app1", ""}, "unix:/run/mm.sock": {"/run/mm.sock", ""},
	} {
		if h, p := splitServer(in); h != want[0] || p != want[1] {
			t.Errorf("splitServer(%q) = %q, %q; want %q", in, h, p, want)
		}
	}
}

// The first points of a server are nginx's: crc32("app1\x00443" + prev).
func TestRingPoints(t *testing.T) {
	r := NewRing([]string{"app1:443"}, nil)
	if r.Len() != 160 {
		t.Fatalf("%d points, want 160", r.Len())
	}
	first := crc32.ChecksumIEEE([]byte("app1\x00443\x00\x00\x00\x00"))
	found := false
	for _, h := range r.hashes {
		if h == first {
			found = true
		}
	}
	if !found {
		t.Errorf("point %08x missing", first)
	}
	if w := NewRing([]string{"a:1", "b:1"}, []int{3, 1}); w.Len() != 640 {
		t.Errorf("weighted ring has %d points, want 640", w.Len())
	}
}

// Clients spread over the servers, and removing one server moves only
// the clients it had.
func TestRingSpreadAndMinimalRemap(t *testing.T) {
	servers := []string{"app1:443", "app2:443", "app3:443"}
	full := NewRing(servers, nil)
	less := NewRing(servers[:2], nil)
	count := map[int]int{}
	moved := 0
	const n = 30000
	for i := range n {
		key := fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255)
		a := full.Server(full.Start(key))
		count[a]++
		b := less.Server(less.Start(key))
		if a != 2 && servers[a] != servers[b] {
			moved++
		}
	}
	for s, c := range count {
		if c < n/3*7/10 || c > n/3*13/10 {
			t.Errorf("server %s got %d of %d clients", servers[s], c, n)
		}
	}
	if moved != 0 {
		t.Errorf("%d clients of the remaining servers moved when app3 left", moved)
	}
}

func FuzzRing(f *testing.F) {
	f.Add("app1:443", "app2:443", 1, 2, "192.0.2.1")
	f.Fuzz(func(t *testing.T, a, b string, wa, wb int, key string) {
		wa, wb = wa%8, wb%8
		r := NewRing([]string{a, b}, []int{wa, wb})
		if r.Len() == 0 {
			t.Fatal("empty ring")
		}
		s := r.Server(r.Start(key))
		if s != 0 && s != 1 {
			t.Fatalf("server index %d", s)
		}
	})
}
