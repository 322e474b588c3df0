#!/bin/sh
# Becomes PID 1 (a real systemd) of the packaging test's private PID, mount and
# UTS namespaces (systemd sets the hostname from /etc/hostname: only in there). Run it as
#
#   nsenter --net=/run/netns/NODE unshare --fork --pid --mount --uts --mount-proc \
#       --propagation private tests/packaging/boot-systemd.sh UNITS_DIR
#
# The file system is the host's: what dpkg installs here is installed for real,
# which is why the test purges the package again. What is private:
#   - /run (a tmpfs): systemd's own state, journald's volatile journal;
#   - the unit search path: only the units in UNITS_DIR (copied to /run/npk-units)
#     plus /etc/systemd/system, where `systemctl enable` puts its symlinks, so
#     nothing of the host's boot (tmpfiles, udev, sysctl, getty, …) ever runs;
#     netpold.service is reached through a link to where the package puts it;
#   - /usr/sbin/policy-rc.d, if the host has one that forbids starting services
#     (container images do), is replaced by one that allows it.
set -eu
units=$1

mount -t tmpfs -o mode=0755 npk-run /run
mkdir -p /run/lock /run/npk-units /run/npk-empty /run/systemd/journald.conf.d
cp "$units"/* /run/npk-units/
for u in systemd-journald.service systemd-journald.socket; do
	ln -s "/lib/systemd/system/$u" "/run/npk-units/$u"
done
# Dangling until the package is installed; systemd re-reads it on daemon-reload.
ln -s /lib/systemd/system/netpold.service /run/npk-units/netpold.service
printf '[Journal]\nStorage=volatile\n' > /run/systemd/journald.conf.d/npk.conf

if [ -e /usr/sbin/policy-rc.d ]; then
	printf '#!/bin/sh\nexit 0\n' > /run/npk-policy-rc.d
	chmod 0755 /run/npk-policy-rc.d
	mount --bind /run/npk-policy-rc.d /usr/sbin/policy-rc.d
fi

export SYSTEMD_UNIT_PATH=/run/npk-units:/etc/systemd/system
export SYSTEMD_GENERATOR_PATH=/run/npk-empty
export SYSTEMD_ENVIRONMENT_GENERATOR_PATH=/run/npk-empty
# Container mode: systemd leaves the console, kernel modules and the like alone.
export container=npk
exec /lib/systemd/systemd --system --unit=npk.target --show-status=no --log-target=journal
