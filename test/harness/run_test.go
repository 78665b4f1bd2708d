package main

import (
	"fmt"
	"slices"
	"testing"
)

// Over n repetitions each target runs once in each position; for an even
// n each target also follows each other target once, and from the n-th
// repetition on the rows are mirrored.
func TestRepOrder(t *testing.T) {
	for n := 1; n <= 6; n++ {
		targets := make([]int, n)
		for i := range targets {
			targets[i] = i
		}
		at := map[[2]int]int{}      // (target, position) -> times
		follows := map[[2]int]int{} // (before, after) -> times
		for rep := range n {
			order := repOrder(targets, rep)
			if got := slices.Sorted(slices.Values(order)); !slices.Equal(got, targets) {
				t.Fatalf("n=%d rep %d: order %v is not a permutation", n, rep, order)
			}
			for i, v := range order {
				at[[2]int{v, i}]++
				if i > 0 {
					follows[[2]int{order[i-1], v}]++
				}
			}
			mirrored := repOrder(targets, rep+n)
			slices.Reverse(mirrored)
			if !slices.Equal(mirrored, order) {
				t.Errorf("n=%d rep %d: %v, mirrored in rep %d: %v", n, rep, order, rep+n, repOrder(targets, rep+n))
			}
		}
		for v := range n {
			for i := range n {
				if at[[2]int{v, i}] != 1 {
					t.Errorf("n=%d: target %d in position %d %d times in %d repetitions", n, v, i, at[[2]int{v, i}], n)
				}
				if n%2 == 0 && v != i && follows[[2]int{i, v}] != 1 {
					t.Errorf("n=%d: target %d right after %d %d times", n, v, i, follows[[2]int{i, v}])
				}
			}
		}
	}
	if got := fmt.Sprint(repOrder([]string{"direct", "mmtls", "nginx", "haproxy"}, 2)); got != "[nginx haproxy mmtls direct]" {
		t.Errorf("the third TLS repetition runs %s", got)
	}
}
