// Command mmtls makes TLS on Mattermost app servers a one-command,
// self-checking operation. See `mmtls --help`.
package main

import "os"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
