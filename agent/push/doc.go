// Package push is mmtls's push pipeline: validate a certificate and key,
// plan, install them symlink-safely, edit Mattermost's config, give it the
// privilege to bind its port, restart it, verify with real handshakes and
// its ping, then commit, or put the previous pair and config back and
// verify that. A journal in a root-owned state directory lets the next run
// finish or roll back a push that was killed half-way; a lock there
// serialises runs.
//
// It composes package certs (the pair and its installation) and package
// mmconfig (Mattermost's configuration); it owns the order of the steps,
// what is backed up, and what is put back when a step fails. It knows
// nothing of file notifications, PostgreSQL, Prometheus or service
// managers: a cluster-wide restart lock is handed in as a RestartLock.
package push
