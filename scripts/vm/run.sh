#!/usr/bin/env bash
# Runs shell commands inside a qemu VM (Debian kernel, TCG) that has SocketCAN and vcan0 up,
# for hosts whose own kernel has no CAN. Prints the guest console and exits with the exit
# status of the guest commands.
#
#   scripts/vm/run.sh [--file HOST_PATH[:GUEST_PATH]]... -- 'commands to run in the guest'
#
# --file copies a file (or a directory, recursively) into the guest, at the same path unless
# GUEST_PATH is given, with every shared library `ldd` lists for it (same paths). The
# directories of the copied files come first in the guest's PATH. The commands run with
# `sh -c` (dash, see VM_SHELL) as root, in /, once lo (127.0.0.1) and vcan0 are up; for several
# steps use `set -e`. Kernel modules: /lib/modules/<release>/ (can-bcm, can-gw, vxcan are
# there too, not inserted).
#
# Environment:
#   VM_TIMEOUT  seconds before qemu is killed (default 300)
#   VM_MEM      guest memory in MiB (default 512, raised to 2 x initramfs + 384 when the
#               initramfs needs it; it lives in memory, unpacked)
#   VM_SMP      guest CPUs (default 2)
#   VM_STRIP    1 (default): strip debug info from copied ELF files (keeps symbols, so
#               backtraces still name functions); 0: copy as they are
#   VM_CAN_SETUP 0: do not insert the CAN modules nor create vcan0 (to test a setup script;
#               `modprobe vcan` works in the guest)
#   VM_KERNEL_IMAGE  vmlinux (default when prepare.sh could extract it: PVH boot, no
#               decompression under TCG) or vmlinuz (the packaged bzImage, slower)
#   VM_APPEND   extra kernel command line arguments
#   VM_IPROUTE2 1 (default): copy the host's iproute2 `ip` in (when it has one), so that
#               `ip -d link` / `ip -s link` work; 0: busybox's `ip` only
#   VM_SHELL    dash (default when the host has /bin/dash): the guest's /bin/sh, which runs
#               the commands, is the host's dash; busybox: busybox ash. busybox-static's ash
#               runs its own applet for a command name even when PATH holds a program of
#               that name (`ip` stayed busybox's with iproute2's in /usr/sbin); dash follows
#               PATH. busybox's applets are on PATH either way.
#   VM_DISK     a raw disk image: attached as /dev/vda (virtio, host cache writeback), its
#               modules (virtio, ext4) inserted; the guest mounts it itself. Killing qemu
#               (VM_PIDFILE) then loses the guest's page cache as a power cut does, and
#               keeps what the guest flushed.
#   VM_PIDFILE  write qemu's pid there once it runs (to kill it: a power cut)
#   VM_KEEP     1: keep the work directory (initramfs, console log) and print its path
#   VM_CACHE, VM_KERNEL_VERSION: see scripts/vm/prepare.sh
#
# Exit status: the guest's; 124 on timeout; 125 when the VM ended without reporting one
# (kernel panic, /init crash); 2 on a usage error.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }
die() { echo "vm-run: error: $*" >&2; exit 2; }

files=()
while [ $# -gt 0 ]; do
    case "$1" in
        --file) [ $# -ge 2 ] || usage; files+=("$2"); shift 2 ;;
        --file=*) files+=("${1#--file=}"); shift ;;
        --) shift; break ;;
        -h|--help) usage ;;
        *) echo "vm-run: unexpected argument: $1 (commands go after --)" >&2; usage ;;
    esac
done
[ $# -gt 0 ] || usage
cmds="$*"

timeout_s="${VM_TIMEOUT:-300}"
mem="${VM_MEM:-512}"
smp="${VM_SMP:-2}"
strip_debug="${VM_STRIP:-1}"

t0=$(date +%s.%N)
kdir="$("$here/prepare.sh" | tail -1)"
[ -f "$kdir/ok" ] || die "preparation failed"
release="$(cat "$kdir/release")"
kimage="$kdir/${VM_KERNEL_IMAGE:-vmlinux}"
[ -f "$kimage" ] || kimage="$kdir/vmlinuz"

work="$(mktemp -d "${TMPDIR:-/tmp}/servogate-vm.XXXXXX")"
cleanup() {
    if [ -n "${qpid:-}" ]; then kill -TERM "$qpid" 2>/dev/null || true; wait 2>/dev/null || true; fi
    if [ "${VM_KEEP:-0}" = 1 ]; then echo "vm-run: work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
root="$work/root"
mkdir -p "$root"

# --- root filesystem ---------------------------------------------------------------------
# Mirror the host's merged-/usr layout (/lib -> usr/lib, ...) so that paths from ldd and
# the ELF interpreter (/lib64/ld-linux-x86-64.so.2) resolve the same way in the guest.
for d in bin sbin lib lib64; do
    if [ -L "/$d" ]; then
        t="$(readlink "/$d")"
        mkdir -p "$root/${t#/}"
        ln -s "$t" "$root/$d"
    fi
done
mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,bin,sbin,lib,etc,proc,sys,dev,tmp,run,root,var/tmp,var/run,mnt}

# busybox-static; /init links its applets at boot (`busybox --install -s` leaves existing
# files alone, so a --file at /usr/bin/NAME wins over the applet NAME).
cp /bin/busybox "$root/bin/busybox"
declare -A injected=()   # files added by this script: not put on PATH
if [ "${VM_SHELL:-dash}" = dash ] && [ -x /bin/dash ]; then
    files=("/bin/dash:/bin/sh" ${files[@]+"${files[@]}"})
    injected["/bin/dash:/bin/sh"]=1
fi

# Kernel modules.
mdir="$root/lib/modules/$release"
mkdir -p "$mdir"
cp "$kdir"/modules/*.ko "$mdir/"
cp "$kdir/modules.order" "$mdir/servogate-vm.order"
cp "$kdir/disk.order" "$mdir/servogate-disk.order"
# modules.dep for busybox modprobe (from each module's "depends=").
for ko in "$mdir"/*.ko; do
    deps="$(tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | head -1)"
    line="$(basename "$ko"):"
    for d in ${deps//,/ }; do line="$line ${d//_/-}.ko"; done
    echo "$line"
done >"$mdir/modules.dep"

# Minimal /etc: root, nobody and mosquitto users (mosquitto run as root drops privileges to
# the "mosquitto" user), localhost, NSS from files.
cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
mosquitto:x:100:101:mosquitto:/var/lib/mosquitto:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
mosquitto:x:101:
nogroup:x:65534:
EOF
printf '127.0.0.1 localhost servogate-vm\n::1 localhost ip6-localhost\n' >"$root/etc/hosts"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files\n' >"$root/etc/nsswitch.conf"
echo servogate-vm >"$root/etc/hostname"
mkdir -p "$root/var/lib/mosquitto"   # chowned by /init: the archive makes every file root's

# --file arguments, their shared libraries.
is_elf() { [ -f "$1" ] && [ "$(head -c 4 "$1" | od -An -c | tr -d ' ')" = '177ELF' ]; }
copy_file() {   # copy_file SRC DST: dereferenced, debug info stripped from ELF if asked
    mkdir -p "$(dirname "$2")"
    rm -f "$2"
    if [ "$strip_debug" = 1 ] && is_elf "$1"; then
        strip --strip-debug -o "$2" "$1" 2>/dev/null || cp -L "$1" "$2"
        chmod --reference="$1" "$2"
    else
        cp -L "$1" "$2"
    fi
}
declare -A libs=()
add_libs() {   # add_libs ELF: record the libraries ldd lists for it
    local out line p
    out="$(ldd "$1" 2>&1)" || return 0      # static, or not a program: nothing to add
    if grep -q 'not found' <<<"$out"; then
        echo "vm-run: warning: $1 has missing libraries:" >&2
        grep 'not found' <<<"$out" >&2
    fi
    while read -r line; do
        p="$(sed -nE 's/.*=> (\/[^ ]+) \(0x.*/\1/p; t; s/^(\/[^ ]+) \(0x.*/\1/p' <<<"$line")"
        [ -n "$p" ] && libs["$p"]=1
    done <<<"$out"
}
# iproute2's ip: busybox's has no -d / -s (CAN details, statistics).
if [ "${VM_IPROUTE2:-1}" = 1 ]; then
    for ipbin in /usr/sbin/ip /sbin/ip /usr/bin/ip /bin/ip; do
        if [ -x "$ipbin" ] && is_elf "$ipbin" && [ "$(readlink -f "$ipbin")" != "$(readlink -f /bin/busybox)" ]; then
            files=("$ipbin:/usr/sbin/ip" ${files[@]+"${files[@]}"})
            injected["$ipbin:/usr/sbin/ip"]=1
            break
        fi
    done
fi
declare -A pathdirs=()
for spec in ${files[@]+"${files[@]}"}; do
    src="${spec%%:*}"
    dst="$src"
    [[ "$spec" == *:* ]] && dst="${spec#*:}"
    [ -e "$src" ] || die "--file $src: no such file"
    [[ "$dst" == /* ]] || dst="/$dst"
    [[ "$src" == /* ]] || [ "$dst" != "/$src" ] || dst="$(cd "$(dirname "$src")" && pwd)/$(basename "$src")"
    if [ -d "$src" ]; then
        mkdir -p "$root$dst"
        cp -a "$src/." "$root$dst/"
        while IFS= read -r -d '' f; do
            is_elf "$f" && add_libs "$f"
        done < <(find "$src" -type f -perm -u+x -print0)
    else
        copy_file "$src" "$root$dst"
        if is_elf "$src"; then add_libs "$src"; fi
        [ -x "$src" ] && [ -z "${injected[$spec]:-}" ] && pathdirs["$(dirname "$dst")"]=1
    fi
done
for l in "${!libs[@]}"; do
    [ -e "$root$l" ] || copy_file "$l" "$root$l"
done

guest_path=""
for d in "${!pathdirs[@]}"; do guest_path="$guest_path$d:"; done
guest_path="${guest_path}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The commands, and /init.
printf '%s\n' "$cmds" >"$root/vm-commands.sh"
nonce="$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')"
cat >"$root/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s
echo
export PATH='$guest_path'
export HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
# No tmpfs on /tmp: the root is already in RAM, and a --file under /tmp (a checkout in
# /tmp) would be hidden under it.
chmod 1777 /tmp
mount -t tmpfs tmpfs /run
hostname servogate-vm
chown mosquitto:mosquitto /var/lib/mosquitto
vm_fail() { echo "vm-init: \$*"; echo "VM-EXIT-STATUS=125 (run $nonce)"; poweroff -f; }
busybox ip link set lo up || vm_fail "lo did not come up"
busybox ip addr add 127.0.0.1/8 dev lo 2>/dev/null
if [ "${VM_CAN_SETUP:-1}" = 1 ]; then
    for m in \$(cat /lib/modules/$release/servogate-vm.order); do
        insmod /lib/modules/$release/\$m.ko || vm_fail "insmod \$m failed"
    done
    busybox ip link add dev vcan0 type vcan && busybox ip link set up vcan0 || vm_fail "vcan0 could not be created"
    what="vcan0 up"
else
    what="no CAN set up (VM_CAN_SETUP=0)"
fi
if [ -n "${VM_DISK:-}" ]; then
    for m in \$(cat /lib/modules/$release/servogate-disk.order); do
        insmod /lib/modules/$release/\$m.ko || vm_fail "insmod \$m failed"
    done
    i=0
    while [ ! -b /dev/vda ] && [ \$i -lt 100 ]; do sleep 0.05; i=\$((i + 1)); done
    [ -b /dev/vda ] || vm_fail "no /dev/vda"
fi
echo "vm-init: up in \$(cut -d' ' -f1 /proc/uptime) s (kernel \$(uname -r), \$what); running the commands"
cd /
/bin/sh -c "\$(cat /vm-commands.sh)" </dev/null
rc=\$?
echo "VM-EXIT-STATUS=\$rc (run $nonce)"
sync
poweroff -f
EOF
chmod 755 "$root/init"

size_kb=$(du -sk "$root" | cut -f1)
# The guest holds the initramfs twice while unpacking it (the archive and the files), next
# to the kernel's ~200 MiB: without room it fails with "Initramfs unpacking failed: write
# error" and then "No working init found".
need=$((size_kb / 1024 * 2 + 384))
if [ -z "${VM_MEM:-}" ] && [ "$need" -gt "$mem" ]; then
    mem="$need"
elif [ "$need" -gt "$mem" ]; then
    echo "vm-run: warning: the initramfs holds $((size_kb / 1024)) MiB: VM_MEM=$mem is probably too small (try $need)" >&2
fi
# Uncompressed cpio: under TCG, decompressing in the guest costs more than loading it.
(cd "$root" && find . -print0 | cpio --null -o -H newc --owner=0:0 --quiet) >"$work/initramfs.cpio"
t1=$(date +%s.%N)

# --- boot --------------------------------------------------------------------------------
log="$work/console.log"
echo "vm-run: booting $release ($(basename "$kimage"), $mem MiB, initramfs $((size_kb / 1024)) MiB, prepared in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s, timeout ${timeout_s} s)" >&2
mkfifo "$work/console.fifo"
sed -u -e 's/\r$//' -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' -e 's/\x1bc//g' <"$work/console.fifo" | tee "$log" &
# stdin from /dev/null: qemu must not take the caller's terminal (or its input). qemu runs
# in the background so that an interrupt of this script can stop it (the trap below).
timeout -k 5 "$timeout_s" qemu-system-x86_64 \
    -accel tcg -cpu max -smp "$smp" -m "$mem" \
    -nographic -no-reboot -nic none \
    -kernel "$kimage" -initrd "$work/initramfs.cpio" \
    ${VM_DISK:+-drive "file=$VM_DISK,format=raw,if=virtio,cache=writeback"} \
    -append "console=ttyS0 quiet panic=-1 rdinit=/init ${VM_APPEND:-}" \
    </dev/null >"$work/console.fifo" 2>&1 &
qpid=$!
if [ -n "${VM_PIDFILE:-}" ]; then
    # qemu is timeout's child: its pid, for a kill that leaves timeout and this script be.
    for _ in $(seq 50); do
        qemu_pid="$(pgrep -P "$qpid" -f qemu-system || true)"
        [ -n "$qemu_pid" ] && break
        sleep 0.1
    done
    echo "${qemu_pid:-}" >"$VM_PIDFILE"
fi
set +e
wait "$qpid"
qrc=$?
set -e
qpid=""
wait   # the console pipeline: all output is in $log
t2=$(date +%s.%N)
took="$(awk -v a="$t0" -v b="$t2" -v c="$t1" 'BEGIN { printf "%.1f s (boot and run %.1f s)", b - a, b - c }')"

status="$(sed -nE "s/.*VM-EXIT-STATUS=([0-9]+) \\(run $nonce\\).*/\\1/p" "$log" | tail -1)"
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    echo "vm-run: FAIL: timeout after ${timeout_s} s (VM_TIMEOUT), qemu killed" >&2
    exit 124
fi
if [ -z "$status" ] && grep -q -e 'Initramfs unpacking failed' -e 'No working init found' "$log"; then
    echo "vm-run: FAIL: the guest could not unpack the initramfs ($((size_kb / 1024)) MiB) into $mem MiB: raise VM_MEM, or keep VM_STRIP=1" >&2
    exit 125
fi
if [ -z "$status" ] && grep -q 'Kernel panic' "$log"; then
    echo "vm-run: FAIL: kernel panic in the guest, no exit status reported (see the console output above)" >&2
    exit 125
fi
if [ -z "$status" ]; then
    echo "vm-run: FAIL: the VM ended without reporting an exit status (qemu exit $qrc): kernel panic, /init failure or qemu error; see the console output above" >&2
    exit 125
fi
if [ "$status" = 0 ]; then
    echo "vm-run: guest commands succeeded, $took" >&2
else
    echo "vm-run: FAIL: guest commands exited with status $status, $took" >&2
fi
exit "$status"
