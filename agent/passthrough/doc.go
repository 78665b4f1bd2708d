// Package passthrough is a layer-4 TLS-passthrough balancer: it forwards
// TCP connections to upstream Mattermost nodes without terminating TLS,
// as an nginx stream {} block with proxy_pass does.
//
// It balances by consistent hashing on the client address with exactly
// nginx's mapping for `hash $remote_addr consistent` (or round-robin, or
// least connections), tries the next upstream on a connect error or
// timeout, takes failing upstreams out passively (max_fails, fail_timeout)
// and actively (TCP, TLS or Mattermost ping health checks), drains an
// upstream on request, and shuts down gracefully. It can peek at the TLS
// ClientHello to log or filter the server name, without consuming or
// terminating anything.
//
// Connections on TCP listeners are served by event loops on epoll (one
// per CPU but one): an idle connection is its two sockets and a small
// struct, with no goroutine; bulk transfers move by splice(2) through
// pipes borrowed only while bytes flow. Other listeners, and upstreams
// given by host name (dialled through Go's resolver), are served by a
// goroutine per direction, with the same rules.
//
// It does not terminate TLS, speak the PROXY protocol or look at HTTP:
// Mattermost sees the balancer's address as the client's. It imports
// nothing of mmtls.
package passthrough
