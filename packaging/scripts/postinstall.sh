#!/bin/sh
# Make systemd see the unit. Nothing is enabled, started or restarted:
# the administrator edits /etc/mmtls/mmtls.toml, then
# `systemctl enable --now mmtls`.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
