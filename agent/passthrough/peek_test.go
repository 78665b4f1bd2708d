package passthrough

import (
	"bytes"
	"crypto/tls"
	"net"
	"slices"
	"testing"
	"time"
)

// clientHello captures the bytes Go's TLS client sends first.
func clientHello(t testing.TB, sni string) []byte {
	t.Helper()
	a, b := net.Pipe()
	go func() {
		c := tls.Client(a, &tls.Config{ServerName: sni, InsecureSkipVerify: true})
		c.SetDeadline(time.Now().Add(2 * time.Second))
		c.Handshake()
		a.Close()
	}()
	buf := make([]byte, 0, 4096)
	b.SetReadDeadline(time.Now().Add(2 * time.Second))
	for {
		tmp := make([]byte, 4096)
		n, err := b.Read(tmp)
		buf = append(buf, tmp[:n]...)
		if err != nil || len(buf) >= 5 && len(buf) >= 5+int(buf[3])<<8|int(buf[4]) {
			break
		}
	}
	b.Close()
	return buf
}

// chunked delivers data in pieces of size n, as separate reads.
type chunked struct {
	net.Conn
	data []byte
	n    int
}

func (c *chunked) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, net.ErrClosed
	}
	k := min(c.n, len(p), len(c.data))
	copy(p, c.data[:k])
	c.data = c.data[k:]
	return k, nil
}

func TestPeekClientHello(t *testing.T) {
	hello := clientHello(t, "chat.example.test")
	for _, size := range []int{1, 7, 100, len(hello)} {
		got, sni, err := peekClientHello(&chunked{data: append([]byte(nil), hello...), n: size})
		if err != nil || sni != "chat.example.test" || len(got) != len(hello) {
			t.Errorf("chunks of %d: sni %q, %d bytes, %v", size, sni, len(got), err)
		}
	}
	// The same hello split into two TLS records.
	body := hello[5:]
	split := append([]byte{0x16, 3, 1, 0, 50}, body[:50]...)
	rest := len(body) - 50
	split = append(split, 0x16, 3, 1, byte(rest>>8), byte(rest))
	split = append(split, body[50:]...)
	want := slices.Clone(split)
	got, sni, err := peekClientHello(&chunked{data: split, n: 13})
	if err != nil || sni != "chat.example.test" {
		t.Errorf("two records: %q %v", sni, err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("two records: replays %d bytes differing from the %d the client sent from byte %d on", len(got), len(want), firstDiff(got, want))
	}
	if _, _, err := peekClientHello(&chunked{data: []byte("GET / HTTP/1.1\r\n\r\n"), n: 100}); err == nil {
		t.Error("HTTP accepted as TLS")
	}
}

func FuzzPeekClientHello(f *testing.F) {
	f.Add(clientHello(f, "chat.example.test"), 3)
	f.Add([]byte{0x16, 3, 1, 0, 4, 1, 0, 0, 0}, 1)
	f.Fuzz(func(t *testing.T, data []byte, n int) {
		if n <= 0 {
			n = 1
		}
		got, _, err := peekClientHello(&chunked{data: append([]byte(nil), data...), n: n})
		if err == nil && len(got) > len(data) {
			t.Fatalf("returned %d bytes from %d", len(got), len(data))
		}
		// What is replayed to the upstream is what the client sent.
		if err == nil && !bytes.Equal(got, data[:len(got)]) {
			t.Fatalf("returned %d bytes differing from what the client sent from byte %d on", len(got), firstDiff(got, data))
		}
	})
}

// firstDiff is the first offset where a and b differ.
func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// BenchmarkHelloIn is the ClientHello parse every TLS connection costs
// the balancer: a hello in one record is parsed where it lies.
func BenchmarkHelloIn(b *testing.B) {
	hello := clientHello(b, "chat.example.test")
	b.ReportAllocs()
	for b.Loop() {
		if done, sni, err := helloIn(hello); !done || sni != "chat.example.test" || err != nil {
			b.Fatal(done, sni, err)
		}
	}
}
