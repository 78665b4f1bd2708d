// Package packaging holds what ships mmtls: the systemd unit template (the
// one source for `mmtls service install` and the .deb/.rpm), the example
// agent config, and the nfpm definition that builds the packages.
package packaging
