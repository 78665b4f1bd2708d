#!/bin/sh
# On purge (Debian: "purge"; RPM has none, an erase is "0"), remove the
# state directory: it holds backups of earlier private keys, which must not
# outlive the package. A plain remove keeps it, as it keeps the config.
case "$1" in
purge)
	rm -rf /var/lib/mmtls
	# What `mmtls service install` wrote beside the package's unit.
	rm -f /etc/systemd/system/mmtls.service.d/50-mmtls-install.conf
	rmdir /etc/systemd/system/mmtls.service.d 2>/dev/null || true
	if grep -qs 'Rendered by `mmtls service install`' /etc/systemd/system/mmtls.service; then
		rm -f /etc/systemd/system/mmtls.service
	fi
	;;
esac
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
