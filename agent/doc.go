// Package agent runs mmtls's pipelines: a push (validate, plan, install,
// configure, restart, verify, then commit or roll back), under a lock in a
// root-owned state directory.
//
// It composes package certs (the pair and its installation) and package
// mmconfig (Mattermost's configuration); it owns the order of the steps,
// what is backed up, and what is put back when a step fails.
package agent
