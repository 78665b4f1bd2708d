// Package certs parses, validates and installs the TLS certificate and key
// that Mattermost serves.
//
// Parsing accepts what certificate authorities and tools actually hand out:
// a PEM certificate file holding the leaf and its intermediates in any order,
// and a PKCS#1, PKCS#8 or SEC1 key. Errors name the file and say what the
// administrator should do about it. Validation never reads the clock: the
// caller passes the time.
//
// Installation treats the destination directory as hostile, since it belongs
// to the mattermost user: it is opened once without following links and every
// file operation is relative to that descriptor. Files are written to a temp
// file that only root can read, given their final owner and mode through the
// descriptor, synced and renamed into place. The package does no TLS serving
// and knows nothing about Mattermost's configuration.
package certs
