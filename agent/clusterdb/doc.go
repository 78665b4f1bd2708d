// Package clusterdb keeps the certificate rollout in the cluster's own
// PostgreSQL, in a schema of mmtls's own: the published bundles (the chain,
// the private key sealed with the cluster key, fingerprints, the rollout
// state) and what each node's agent reports. A publish NOTIFYs; agents
// LISTEN, and also look at every reconcile, so a lost notification or a
// database restart loses nothing.
//
// It does not push anything or decide when: the agent's follower does.
// The private key is never stored, logged or passed in the clear: Key
// seals it (AES-256-GCM, the bundle's identity as additional data).
package clusterdb
