#!/usr/bin/env bash
# Sets up a virtual CAN interface on a box whose kernel has vcan (a normal Debian/Ubuntu
# kernel does; the CI hosts here do not: there, use scripts/vm/run.sh).
#
#   sudo scripts/vcan-setup.sh [NAME]      # NAME defaults to vcan0
#
# Loads can, can-raw, can-dev and vcan (in that order: vcan needs can-dev), creates NAME if
# it does not exist yet and brings it up. Safe to run again.
set -euo pipefail

name="${1:-vcan0}"
case "$name" in
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

if [ "$(id -u)" -ne 0 ]; then
    echo "vcan-setup: needs root (modprobe, ip link add): run  sudo $0 $name" >&2
    exit 1
fi
command -v modprobe >/dev/null 2>&1 || { echo "vcan-setup: modprobe not found: apt-get install kmod" >&2; exit 1; }
command -v ip >/dev/null 2>&1 || { echo "vcan-setup: ip not found: apt-get install iproute2" >&2; exit 1; }

for m in can can-raw can-dev vcan; do
    # Built into the kernel counts as present (/sys/module/<name> exists without modprobe).
    [ -d "/sys/module/${m//-/_}" ] && continue
    if ! modprobe "$m" 2>/dev/null; then
        echo "vcan-setup: kernel module $m is not available for kernel $(uname -r)" >&2
        echo "  (modprobe $m failed: this kernel has no CAN support, or its modules are not" >&2
        echo "   installed; on Debian/Ubuntu install linux-modules-extra-\$(uname -r) or the" >&2
        echo "   distribution's generic kernel; without CAN in the kernel use scripts/vm/run.sh)" >&2
        exit 1
    fi
done

if ! ip link show dev "$name" >/dev/null 2>&1; then
    ip link add dev "$name" type vcan
fi
ip link set up "$name"
echo "vcan-setup: $name is up"
ip -details link show dev "$name"
