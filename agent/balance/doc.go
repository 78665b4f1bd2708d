// Package balance runs the passthrough balancer as mmtls runs it: its
// options (flags and the config file's [balance] section, with their
// defaults), its listeners and root-only control socket, reload on SIGHUP,
// and the plain-HTTP listener that redirects to SiteURL and answers ACME
// HTTP-01 challenges.
//
// The balancing itself is package passthrough; metrics are the caller's
// (Service.Started hands it the balancer).
package balance
