#!/usr/bin/env bash
# Proves the servogate .deb on a Debian system booted under systemd: builds (once, cached)
# a debootstrap'd Debian root with systemd, mosquitto and socat as an ext4 disk image,
# boots it in qemu (TCG) with the Debian kernel scripts/vm/prepare.sh caches, installs the
# package and runs hil/vm/deb-test-guest.sh inside: user, enabled-not-started, the
# unedited-config gate, DevicePolicy=closed, start against servosim on a socat pty with
# availability online on the local mosquitto, sandbox, restart, clean stop with
# "online":false, bad config. See hil/vm/systemd.md.
#
#   scripts/vm/deb-test.sh [--arch amd64|arm64] [--deb PATH|none] [--guest SCRIPT] [--payload DIR]
#
# --deb: the package to test (default: build it with scripts/package.sh [--arch arm64]);
#   none: no package (for another guest script).
# --guest: the script the VM runs instead of hil/vm/deb-test-guest.sh, with the same
#   contract (PASS:/FAIL: lines, then DEB-TEST-EXIT=N (run NONCE)); --payload: a directory
#   the guest finds at /mnt/payload/files (scripts/vm/can-tests.sh --arch arm64 uses both).
# --arch arm64: the arm64 package in an emulated arm64 VM (qemu-system-aarch64 -M virt,
# TCG), its own cached image, debootstrap'd through qemu-user and binfmt_misc, with the
# kernel apt installs in it (linux-image-arm64); see hil/vm/arm64.md. Default: amd64.
#
# Prints the guest's PASS:/FAIL: lines (the whole console with DEB_TEST_VERBOSE=1) and
# exits 0 only if every check passed and the guest reported so.
#
# Environment:
#   DEB_TEST_NOTIFY   1 (default): the unit as shipped (Type=notify, watchdog), with checks
#                     that READY=1 and WATCHDOG=1 come; 0: a drop-in with Type=simple and
#                     WatchdogSec=0 (to test a build whose notifications are broken)
#   DEB_TEST_TIMEOUT  seconds for the VM run (boot, checks, power-off); default 600
#   DEB_TEST_MIRROR   Debian mirror for debootstrap (default: the host's apt source)
#   DEB_TEST_SUITE    Debian suite of the image (default: the host's, e.g. bookworm)
#   DEB_TEST_VERBOSE  1: print the whole guest console
#   DEB_TEST_KEEP     1: keep the work directory (overlay disk, console log)
#   VM_CACHE, VM_KERNEL_VERSION: see scripts/vm/prepare.sh (kernel and cache directory;
#                     the arm64 run uses VM_CACHE only)
#
# Exit status: 0 all checks passed; 1 a check failed; 124 timeout; 125 the VM ended
# without reporting (boot failure); 2 usage or preparation error.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
guest_script="$repo/hil/vm/deb-test-guest.sh"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }
log() { echo "deb-test: $*" >&2; }
die() { echo "deb-test: error: $*" >&2; exit 2; }
is_root() { [ "$(id -u)" -eq 0 ]; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

deb=""
arch=amd64
payload=""
while [ $# -gt 0 ]; do
    case "$1" in
        --deb) [ $# -ge 2 ] || usage; deb="$2"; shift 2 ;;
        --deb=*) deb="${1#--deb=}"; shift ;;
        --arch) [ $# -ge 2 ] || usage; arch="$2"; shift 2 ;;
        --guest) [ $# -ge 2 ] || usage; guest_script="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
        --payload) [ $# -ge 2 ] || usage; payload="$2"; shift 2 ;;
        --arch=*) arch="${1#--arch=}"; shift ;;
        -h|--help) usage ;;
        *) echo "deb-test: unexpected argument: $1" >&2; usage ;;
    esac
done

t_start="$(now)"
notify="${DEB_TEST_NOTIFY:-1}"
timeout_s="${DEB_TEST_TIMEOUT:-600}"
case "$notify" in 0|1) ;; *) die "DEB_TEST_NOTIFY must be 0 or 1" ;; esac
suite="${DEB_TEST_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}"

# What differs between the architectures: the emulator and its machine, the guest's
# console UART, the kernel (amd64: scripts/vm/prepare.sh's cached .deb, booted from the
# host; arm64: installed in the image by apt, booted from a copy next to the image), the
# initramfs's disk modules (arm64's virt machine also has virtio-mmio), where the image is
# cached and what the package build is told.
case "$arch" in
    amd64)
        qemu=(qemu-system-x86_64 -accel tcg -cpu max)
        qemu_pkg=qemu-system-x86; console_tty=ttyS0; sim_uart=/dev/ttyS1; disk_modules="virtio_pci virtio_blk ext4"
        images_name=systemd-image; package_args=(); in_vm="in the VM" ;;
    arm64)
        qemu=(qemu-system-aarch64 -M virt -accel tcg -cpu max)
        qemu_pkg=qemu-system-arm; console_tty=ttyAMA0; sim_uart=/dev/ttyAMA1; disk_modules="virtio_pci virtio_mmio virtio_blk ext4"
        images_name=systemd-image-arm64; package_args=(--arch arm64); in_vm="in the arm64 VM" ;;
    *) echo "deb-test: unknown --arch $arch (amd64 or arm64)" >&2; usage ;;
esac

# The host's own Debian mirror for $suite, from its apt sources (one-line or deb822).
host_mirror() {
    local m
    m="$(sed -nE "s/^deb +(\[[^]]*\] +)?([a-z]+:[^ ]+) +$1( .*)?$/\2/p" \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -1)"
    [ -n "$m" ] || m="$(awk -v s="$1" 'BEGIN { RS = "" } {
            uri = ""; ok = 0; on = 1
            n = split($0, line, "\n")
            for (i = 1; i <= n; i++) {
                if (line[i] ~ /^URIs:/) { split(line[i], w, " "); uri = w[2] }
                if (line[i] ~ /^Suites:/) { m = split(line[i], w, " "); for (j = 2; j <= m; j++) if (w[j] == s) ok = 1 }
                if (line[i] ~ /^Enabled: *no/) on = 0
            }
            if (ok && on && uri != "") { print uri; exit }
        }' /etc/apt/sources.list.d/*.sources 2>/dev/null)"
    echo "$m"
}

# --- host tools --------------------------------------------------------------------------
missing=()
apt_args=()
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
if [ "$arch" = amd64 ]; then
    command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
    command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
else
    # qemu-user-binfmt: the debootstrap second stage and apt run arm64 programs in the
    # chroot. The cable needs the second UART of QEMU 10's virt machine (bookworm's QEMU
    # 7.2 has one): when the suite's own QEMU is older, QEMU comes from $suite-backports,
    # whose apt source is added (/etc/apt/sources.list.d/servogate-backports.sources) if
    # apt does not know it. QEMU's packages require each other's exact version, so those
    # already installed come along from the same source.
    need_qemu=0
    command -v "${qemu[0]}" >/dev/null 2>&1 || need_qemu=1
    command -v qemu-img >/dev/null 2>&1 || need_qemu=1
    [ -f /usr/lib/binfmt.d/qemu-aarch64.conf ] || need_qemu=1
    if [ "$need_qemu" = 1 ]; then
        missing+=("$qemu_pkg" qemu-utils qemu-user-binfmt)
        for p in qemu-system-x86 qemu-system-common qemu-user; do
            dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' && missing+=("$p")
        done
        candidate="$(apt-cache policy "$qemu_pkg" 2>/dev/null | sed -nE 's/^ *Candidate: ([0-9]+:)?([0-9]+)\..*/\2/p')"
        [ "${candidate:-0}" -ge 10 ] || apt_args=(-t "$suite-backports")
    fi
fi
command -v mkfs.ext4 >/dev/null 2>&1 || [ -x /usr/sbin/mkfs.ext4 ] || missing+=(e2fsprogs)
if [ ${#missing[@]} -gt 0 ]; then
    if is_root && command -v apt-get >/dev/null 2>&1; then
        log "installing ${apt_args[*]}${apt_args[*]:+ }${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if [ ${#apt_args[@]} -gt 0 ] && ! apt-cache policy 2>/dev/null | grep -q " $suite-backports/"; then
            bmirror="$(host_mirror "$suite")"
            [ -n "$bmirror" ] || die "no Debian mirror for $suite in the host's apt sources (for $suite-backports)"
            log "adding $suite-backports ($bmirror) to apt's sources: QEMU 10 for the arm64 VM"
            printf 'Types: deb\nURIs: %s\nSuites: %s-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
                "$bmirror" "$suite" >/etc/apt/sources.list.d/servogate-backports.sources
            apt-get update -qq
        fi
        apt-get install -y -qq --no-install-recommends "${apt_args[@]}" "${missing[@]}" >/dev/null \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${apt_args[@]}" "${missing[@]}" >/dev/null; }
    else
        die "missing host packages: ${missing[*]}; install them with:   sudo apt-get install ${apt_args[*]}${apt_args[*]:+ }${missing[*]}"
    fi
fi
# debootstrap, chroot and the image's file ownership need root.
is_root || die "run as root (debootstrap and chroot need it)"
export PATH="$PATH:/usr/sbin:/sbin"

if [ "$arch" = arm64 ]; then
    qemu_major="$("${qemu[0]}" --version | sed -nE '1s/.*version ([0-9]+)\..*/\1/p')"
    [ "${qemu_major:-0}" -ge 10 ] || die "$("${qemu[0]}" --version | head -1): its virt machine has one UART, the test's cable needs a second (QEMU 10 or newer; bookworm: apt-get install -t bookworm-backports $qemu_pkg qemu-utils qemu-user-binfmt)"
    # arm64 programs in the image's chroot: qemu-user through binfmt_misc. Without systemd
    # as PID 1 nothing registers the handler the package ships; its F flag (the emulator
    # opened now, not looked up in the chroot) is what makes it usable in a chroot.
    binfmt=/proc/sys/fs/binfmt_misc
    [ -e "$binfmt/register" ] || mount -t binfmt_misc binfmt_misc "$binfmt" \
        || die "cannot mount binfmt_misc on $binfmt"
    if [ ! -e "$binfmt/qemu-aarch64" ]; then
        log "registering the qemu-aarch64 binfmt_misc handler (/usr/lib/binfmt.d/qemu-aarch64.conf)"
        cat /usr/lib/binfmt.d/qemu-aarch64.conf >"$binfmt/register" \
            || die "cannot register /usr/lib/binfmt.d/qemu-aarch64.conf in $binfmt"
    fi
    grep -qx enabled "$binfmt/qemu-aarch64" || die "the qemu-aarch64 binfmt_misc handler is disabled (echo 1 > $binfmt/qemu-aarch64)"
    grep -q '^flags:.*F' "$binfmt/qemu-aarch64" \
        || die "the qemu-aarch64 binfmt_misc handler lacks the F flag (unusable in a chroot): echo -1 > $binfmt/qemu-aarch64, and run again"
fi

# --- the kernel (shared with scripts/vm/run.sh) -------------------------------------------
if [ "$arch" = amd64 ]; then
    kdir="$("$here/prepare.sh" | tail -1)"
    [ -f "$kdir/ok" ] || die "scripts/vm/prepare.sh failed"
    cache="$(dirname "$(dirname "$kdir")")"
    release="$(cat "$kdir/release")"
    kdeb="$cache/deb/$(awk '{ print $2 }' "$kdir/ok")"
    [ -f "$kdeb" ] || die "the kernel package $kdeb is not in the cache (remove $kdir and run again)"
    kimage="$kdir/vmlinux"
    [ -f "$kimage" ] || kimage="$kdir/vmlinuz"
else
    # The same cache directory as prepare.sh's; the kernel comes with the image.
    cache="${VM_CACHE:-$repo/hil/vm/cache}"
    mkdir -p "$cache"
    cache="$(cd "$cache" && pwd)"
fi

# --- the package -------------------------------------------------------------------------
if [ "$deb" = none ]; then
    deb=""
elif [ -z "$deb" ]; then
    log "building the package (scripts/package.sh${package_args[*]:+ }${package_args[*]})"
    deb="$("$repo/scripts/package.sh" "${package_args[@]}" | tail -1)"
fi
if [ -n "$deb" ]; then
    [ -f "$deb" ] || die "no package at $deb"
    deb="$(cd "$(dirname "$deb")" && pwd)/$(basename "$deb")"
    deb_arch="$(dpkg-deb -f "$deb" Architecture 2>/dev/null || true)"
    [ "$deb_arch" = "$arch" ] || die "$deb is a package for ${deb_arch:-no architecture}, not $arch (--arch $deb_arch?)"
    log "package: $(basename "$deb")"
fi
[ -f "$guest_script" ] || die "no guest script at $guest_script"
[ -z "$payload" ] || [ -d "$payload" ] || die "--payload $payload: not a directory"

# --- the Debian image (cached) ------------------------------------------------------------

# What goes into the image. systemd as PID 1 (systemd-sysv), udev (device nodes and their
# groups, as on a real box), dbus (logind), the kernel's needs (kmod, linux-base,
# initramfs-tools), adduser (the package's postinst), the test's tools (iproute2: vcan).
packages=systemd,systemd-sysv,udev,dbus,kmod,linux-base,initramfs-tools,adduser,procps,iproute2,mosquitto,mosquitto-clients,socat

# configure_root ROOT: everything done to the debootstrap'd tree before it becomes a disk.
configure_root() {
    local root="$1"
    echo servogate-vm >"$root/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 servogate-vm\n::1 localhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
    # root= comes from the kernel command line; no fsck (the disk is a fresh overlay).
    echo '/dev/vda / ext4 rw,errors=remount-ro 0 0' >"$root/etc/fstab"
    # A small initramfs with the modules that mount the root disk (the kernel has virtio
    # and ext4 as modules), gzip (always present).
    sed -i 's/^MODULES=.*/MODULES=list/; s/^COMPRESS=.*/COMPRESS=gzip/' "$root/etc/initramfs-tools/initramfs.conf" || return 1
    # shellcheck disable=SC2086 # one module a word
    printf '%s\n' $disk_modules >>"$root/etc/initramfs-tools/modules" || return 1
    # Quiet, quick boots: no login prompts on the console, no timers doing maintenance.
    local u
    for u in "serial-getty@$console_tty.service" getty@tty1.service apt-daily.timer apt-daily-upgrade.timer \
        man-db.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer dpkg-db-backup.timer \
        systemd-tmpfiles-clean.timer; do
        ln -sf /dev/null "$root/etc/systemd/system/$u"
    done
    # The payload runner: mounts the second disk (made per run) and runs its "run" script.
    # Type=exec, so that boot finishes while it runs (a oneshot would hold the boot, and
    # the checks wait for it); it powers the VM off when it ends, either way.
    cat >"$root/etc/systemd/system/vm-payload.service" <<EOF
[Unit]
Description=deb-test payload (scripts/vm/deb-test.sh)
After=multi-user.target
ConditionPathExists=/dev/vdb
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=exec
ExecStartPre=/bin/mkdir -p /mnt/payload
ExecStartPre=/bin/mount -o ro /dev/vdb /mnt/payload
ExecStart=/bin/sh /mnt/payload/run
# Straight to the serial console, unprefixed: the host reads PASS:/FAIL: lines there.
StandardInput=null
StandardOutput=tty
StandardError=tty
TTYPath=/dev/$console_tty
TTYReset=no
TTYVHangup=no

[Install]
WantedBy=multi-user.target
EOF
    ln -sf /etc/systemd/system/vm-payload.service "$root/etc/systemd/system/multi-user.target.wants/vm-payload.service"
    # The kernel, as an installed package (modules, initramfs): amd64 from the cached
    # .deb, arm64 from the suite with apt (emulated; the image's apt source is the mirror).
    # (Called in an || list, where set -e is off: each step returns on failure itself.)
    local install_kernel=(dpkg -i /tmp/linux-image.deb)
    if [ "$arch" = amd64 ]; then
        cp "$kdeb" "$root/tmp/linux-image.deb" || return 1
    else
        install_kernel=(sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends linux-image-arm64')
    fi
    mount -t proc proc "$root/proc" || return 1
    chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive "${install_kernel[@]}" >&2 \
        || { umount "$root/proc"; return 1; }
    umount "$root/proc" || return 1
    rm -f "$root/tmp/linux-image.deb"
    # Space and time: no documentation, no apt lists, no package cache.
    rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/var/cache/apt/archives/*.deb \
        "$root"/var/lib/apt/lists/*
}

# The cache key: everything that decides the image's contents (arm64: the kernel is the
# suite's linux-image-arm64 of the day the image is built).
if [ "$arch" = amd64 ]; then
    key_of="$suite $packages $release $(basename "$kdeb")"
    debootstrap_arch=()
else
    key_of="$suite $arch $packages linux-image-arm64 $console_tty $disk_modules"
    debootstrap_arch=(--arch="$arch")
fi
key="$( { echo "$key_of"; declare -f configure_root; } | sha256sum | cut -c1-16)"
images="$cache/$images_name"
idir="$images/$suite-$key"
mkdir -p "$images"
exec 8>"$images/.lock"
flock 8
if [ ! -f "$idir/ok" ]; then
    t_image="$(now)"
    mirror="${DEB_TEST_MIRROR:-$(host_mirror "$suite")}"
    [ -n "$mirror" ] || die "no Debian mirror for $suite in the host's apt sources: set DEB_TEST_MIRROR"
    tmp="$(mktemp -d "$images/.build.XXXXXX")"
    trap 'umount "$tmp/root/proc" 2>/dev/null || true; rm -rf "$tmp"' EXIT
    log "building the Debian $suite ${debootstrap_arch[*]:+$arch }image (debootstrap, once; cached in ${idir#"$repo"/})"
    debootstrap "${debootstrap_arch[@]}" --variant=minbase --include="$packages" "$suite" "$tmp/root" "$mirror" \
        >"$tmp/debootstrap.log" 2>&1 || { tail -30 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }
    log "debootstrap done ($(since "$t_image")); installing the kernel in the image"
    configure_root "$tmp/root" >"$tmp/configure.log" 2>&1 || { tail -30 "$tmp/configure.log" >&2; die "configuring the image failed"; }
    mkdir -p "$tmp/out"
    if [ "$arch" != amd64 ]; then
        # The kernel apt installed (the newest, should there be two), booted from a copy.
        release="$(ls "$tmp/root/lib/modules" 2>/dev/null | sort -V | tail -1 || true)"
        [ -f "$tmp/root/boot/vmlinuz-$release" ] || die "the image has no kernel in /boot (see $tmp/configure.log)"
        cp "$tmp/root/boot/vmlinuz-$release" "$tmp/out/vmlinuz"
    fi
    initrd="$(ls "$tmp/root/boot/initrd.img-$release" 2>/dev/null || true)"
    [ -n "$initrd" ] || die "the image has no /boot/initrd.img-$release (see $tmp/configure.log)"
    cp "$initrd" "$tmp/out/initrd.img"
    # The disk: the tree plus 512 MiB free, made without mounting (mkfs.ext4 -d).
    size_mb=$(( $(du -sm "$tmp/root" | cut -f1) + 512 ))
    mkfs.ext4 -q -F -L servogate-vm -d "$tmp/root" "$tmp/out/root.img" "${size_mb}M" >/dev/null \
        || die "mkfs.ext4 -d failed"
    echo "$suite $release $(date -u +%FT%TZ) $packages" >"$tmp/out/ok"
    rm -rf "$images/$suite-"*     # older images (another key): replaced
    mv "$tmp/out" "$idir"
    rm -rf "$tmp"
    trap - EXIT
    log "image ready: ${size_mb} MiB disk, built in $(since "$t_image")"
fi
flock -u 8
if [ "$arch" != amd64 ]; then
    release="$(awk '{ print $2 }' "$idir/ok")"
    kimage="$idir/vmlinuz"
fi

# --- one run -----------------------------------------------------------------------------
work="$(mktemp -d "${TMPDIR:-/tmp}/servogate-deb-test.XXXXXX")"
qpid=""
stop_qemu() {   # TERM, and KILL if it is still there 5 s later
    kill -TERM "$qpid" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$qpid" 2>/dev/null || true
    wait "$qpid" 2>/dev/null || true
}
cleanup() {
    if [ -n "$qpid" ]; then stop_qemu; fi
    if [ "${DEB_TEST_KEEP:-0}" = 1 ]; then log "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Writes go to a qcow2 overlay: the cached image stays as built.
qemu-img create -q -f qcow2 -F raw -b "$idir/root.img" "$work/root.qcow2"
nonce="$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
mkdir -p "$work/payload"
cp "$guest_script" "$work/payload/run"
if [ -n "$deb" ]; then cp "$deb" "$work/payload/servogate.deb"; fi
if [ -n "$payload" ]; then cp -a "$payload" "$work/payload/files"; fi
# SIM_UART: the guest's second UART, the cable's servosim end (arm64's virt machine has
# PL011s, ttyAMA*; its kernel also makes placeholder 8250 nodes ttyS0-3 with no hardware).
printf 'NONCE=%s\nDEB_TEST_NOTIFY=%s\nSIM_UART=%s\n' "$nonce" "$notify" "$sim_uart" >"$work/payload/env"
mkfs.ext4 -q -F -L payload -d "$work/payload" "$work/payload.img" \
    $(( $(du -sm "$work/payload" | cut -f1) + 16 ))M >/dev/null

console="$work/console.log"
log "booting (qemu TCG, $(basename "$kimage"), kernel $release; DEB_TEST_NOTIFY=$notify)"
t_boot="$(now)"
# KVM is present on these hosts but hangs: TCG. -nographic: the serial console on stdio;
# stdin from /dev/null, so that qemu never takes the caller's terminal.
# The first UART (ttyS0; arm64: ttyAMA0) is the console on stdio; a second serial device
# would otherwise take its place, hence -serial mon:stdio first. A virtual cable: the
# guest's second UART (ttyS1; arm64: ttyAMA1; servosim) is the server
# end of a unix socket, qemu's emulated USB serial adapter (an FTDI FT232: /dev/ttyUSB0
# in the guest, servogate) the client end.
"${qemu[@]}" -m 1024 -smp 2 -nographic -no-reboot \
    -kernel "$kimage" -initrd "$idir/initrd.img" \
    -append "root=/dev/vda rw rootfstype=ext4 console=$console_tty quiet panic=-1 systemd.show_status=0" \
    -drive file="$work/root.qcow2",if=virtio,format=qcow2 \
    -drive file="$work/payload.img",if=virtio,format=raw,readonly=on \
    -serial mon:stdio \
    -chardev socket,id=cable,path="$work/cable.sock",server=on,wait=off \
    -serial chardev:cable \
    -chardev socket,id=adapter,path="$work/cable.sock" \
    -device qemu-xhci -device usb-serial,chardev=adapter \
    -nic none </dev/null >"$console" 2>&1 &
qpid=$!

# Stream the guest's check lines while it runs (the whole console with DEB_TEST_VERBOSE=1);
# tail --pid ends the stream when qemu ends.
if [ "${DEB_TEST_VERBOSE:-0}" = 1 ]; then pattern=''; else pattern='^(PASS|FAIL|note|  [a-z]+:|deb-test:)'; fi
tail --pid="$qpid" -n +1 -F "$console" 2>/dev/null | sed -u 's/\r$//' | grep --line-buffered -E "$pattern" &
stream_pid=$!
timed_out=0
deadline=$(( $(date +%s) + timeout_s ))
while kill -0 "$qpid" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then timed_out=1; stop_qemu; break; fi
    sleep 0.5
done
wait "$qpid" 2>/dev/null || true
qpid=""
wait "$stream_pid" 2>/dev/null || true

took="VM run $(since "$t_boot"), whole script $(since "$t_start")"
if [ "$timed_out" = 1 ]; then
    tail -40 "$console" | tr -d '\r' >&2
    log "FAIL: timeout after ${timeout_s} s ($took)"
    exit 124
fi
status="$(tr -d '\r' <"$console" | sed -nE "s/^DEB-TEST-EXIT=([0-9]+) \(run $nonce\)$/\1/p" | tail -1)"
if [ -z "$status" ]; then
    tr -d '\r' <"$console" | tail -60 >&2
    log "FAIL: the VM ended without reporting a result (boot failure? see the console above; $took)"
    exit 125
fi
passed="$(tr -d '\r' <"$console" | grep -c '^PASS:' || true)"
failed="$(tr -d '\r' <"$console" | grep -c '^FAIL:' || true)"
if [ "$status" = 0 ] && [ "$failed" = 0 ] && [ "$passed" -gt 0 ]; then
    log "PASS: $passed checks passed under systemd $in_vm ($took)"
    exit 0
fi
log "FAIL: $failed of $((passed + failed)) checks failed ($took)"
exit 1
