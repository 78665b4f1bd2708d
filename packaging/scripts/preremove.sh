#!/bin/sh
# On removal (not upgrade), stop and disable the agent. An upgrade leaves
# it running the old binary until the administrator restarts it.
case "$1" in
remove|0)
	if [ -d /run/systemd/system ]; then
		systemctl disable --now mmtls.service >/dev/null 2>&1 || true
	fi
	;;
esac
exit 0
