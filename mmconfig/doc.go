// Package mmconfig finds, reads and edits Mattermost's configuration for the
// settings mmtls owns: ServiceSettings' ListenAddress, ConnectionSecurity,
// TLSCertFile, TLSKeyFile and UseLetsEncrypt (and SiteURL when asked).
//
// Edits are made to the JSON text itself, never through a decode and
// re-encode of model.Config, so keys this version of the Mattermost model
// does not know, plugin settings, order and formatting all survive. The
// typed model is used only to check the result the way Mattermost will.
//
// The package also reads what Mattermost's systemd service sees of its
// environment (Environment= and EnvironmentFile=), because MM_CONFIG and
// MM_SERVICESETTINGS_* there silently win over config.json. It does no file
// writing: callers own how bytes reach the disk.
package mmconfig
