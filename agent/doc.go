// Package agent is mmtls's daemon: what `mmtls watch`, `mmtls run` and the
// OS service run. It watches the source pair (certbot's live/ links and
// the like) and hands each new consistent pair to the push pipeline, with
// a quiet period, backoff, a restart cap, a periodic reconcile and a daily
// expiry warning; it coordinates restarts across a cluster (a PostgreSQL
// advisory lock, or a random splay); it exports Prometheus metrics; it
// reads the agent's TOML config file; and it runs the balancer service
// beside the watch loop when the config asks for it.
//
// It does not install, configure, restart or verify anything itself: that
// is package push, which knows nothing of file notifications, databases,
// metrics or service managers. Nor does it balance connections: that is
// package balance over package passthrough. Time comes from a clock.Clock,
// so every timer of the daemon can be driven by a test.
package agent
