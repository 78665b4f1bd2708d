package passthrough

import (
	"fmt"
	"os"
	"testing"
)

// TestMain runs every test twice: with TCP listeners served by the event
// loops (loop.go), then by a goroutine per direction (serve.go, copy.go),
// which serves other listeners and upstreams given by name.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		fmt.Println("again, with a goroutine per direction")
		goroutinesOnly = true
		code = m.Run()
	}
	os.Exit(code)
}
