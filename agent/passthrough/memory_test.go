package passthrough

import (
	"context"
	"io"
	"net"
	"runtime"
	"testing"
	"time"
)

// BenchmarkIdleConnMemory measures what one idle proxied connection costs
// the balancer's Go heap and goroutine stacks, after one small exchange
// each: the part of the per-connection memory that is the balancer's own
// (the rest is kernel socket buffers). It reports KiB per connection.
func BenchmarkIdleConnMemory(b *testing.B) {
	const n = 1000
	bal, addr := echoThroughBalancer(b)
	var stack, heap, goroutines float64
	for b.Loop() {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		g0 := runtime.NumGoroutine()
		conns := make([]net.Conn, 0, n)
		for range n {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				b.Fatal(err)
			}
			c.Write([]byte("hello"))
			io.ReadFull(c, make([]byte, 5))
			conns = append(conns, c)
		}
		for bal.ActiveConns() < n {
			time.Sleep(time.Millisecond)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		// The echo backend's goroutines and the client's conns live in this
		// process too: count only the balancer's side, below.
		stack = float64(after.StackInuse-before.StackInuse) / n / 1024
		heap = float64(after.HeapInuse-before.HeapInuse) / n / 1024
		goroutines = float64(runtime.NumGoroutine()-g0) / n
		for _, c := range conns {
			c.Close()
		}
		for bal.ActiveConns() > 0 {
			time.Sleep(time.Millisecond)
		}
	}
	// Each proxied connection here also has one echo goroutine (stack) and
	// client/backend sockets (heap) of the test's own.
	b.ReportMetric(stack, "stack-KiB/conn")
	b.ReportMetric(heap, "heap-KiB/conn")
	b.ReportMetric(goroutines, "goroutines/conn")
}

// BenchmarkConnect times one proxied connection with a small request and
// reply, client to echo backend through the balancer, all in process.
func BenchmarkConnect(b *testing.B) {
	_, addr := echoThroughBalancer(b)
	buf := make([]byte, 16)
	b.ReportAllocs()
	for b.Loop() {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		c.Write(buf)
		io.ReadFull(c, buf)
		c.Close()
	}
}

// echoThroughBalancer runs an echo backend and a balancer in front of it
// on loopback, for the benchmarks; it returns the balancer and its address.
func echoThroughBalancer(b *testing.B) (*Balancer, string) {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	return balancerFor(b, ln.Addr().String())
}

// balancerFor runs a raw balancer in front of upstream on loopback, for
// the benchmarks; it returns the balancer and its address.
func balancerFor(b *testing.B, upstream string) (*Balancer, string) {
	b.Helper()
	bal, err := New(Config{DisableSNIPeek: true, Upstreams: []Upstream{{Addr: upstream}}})
	if err != nil {
		b.Fatal(err)
	}
	front, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go bal.Serve(context.Background(), front)
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		bal.Shutdown(ctx)
	})
	return bal, front.Addr().String()
}
