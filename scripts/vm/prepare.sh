#!/usr/bin/env bash
# Prepares what scripts/vm/run.sh boots: host tools (qemu, busybox-static, cpio, tc) and a Debian
# kernel with its CAN modules, cached under hil/vm/cache/. Idempotent: each step is re-done
# only when its result is missing. Prints the kernel directory on stdout as its last line.
#
# Environment:
#   VM_CACHE           cache directory (default: <repo>/hil/vm/cache)
#   VM_KERNEL_VERSION  kernel ABI to use, e.g. 6.1.0-48 (default: the one already cached,
#                      else the newest linux-image-*-amd64-unsigned apt knows)
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
cache="${VM_CACHE:-$repo/hil/vm/cache}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"

log() { echo "vm-prepare: $*" >&2; }
die() { echo "vm-prepare: error: $*" >&2; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }

# Only one preparation at a time (several test runs may start together).
exec 9>"$cache/.lock"
flock 9

# --- host tools --------------------------------------------------------------------------
missing=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
# The guest needs a STATIC busybox: the plain "busybox" package is dynamically linked.
[ -x /bin/busybox ] && dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' \
    || missing+=(busybox-static)
command -v cpio >/dev/null 2>&1 || missing+=(cpio)
command -v strip >/dev/null 2>&1 || missing+=(binutils)
# tc: the ENOBUFS test puts a token bucket qdisc on vcan0 inside the guest.
command -v tc >/dev/null 2>&1 || [ -x /usr/sbin/tc ] || [ -x /sbin/tc ] || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
    if is_root && command -v apt-get >/dev/null 2>&1; then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
            apt-get update -qq
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        fi
    else
        die "missing host packages: ${missing[*]}
install them with:   sudo apt-get install ${missing[*]}"
    fi
fi

# --- kernel ------------------------------------------------------------------------------
# Modules the guest needs, in insertion order (PITFALLS: vcan needs can-dev). Their own
# dependencies (the "depends=" of each .ko's .modinfo) are resolved below and put first.
want_modules=(can can-raw can-dev vcan)
# Shipped too (not inserted by default), for tests that want them: insmod /lib/modules/...
extra_modules=(can-bcm can-gw vxcan)
# A virtio disk with ext4 (run.sh's VM_DISK: the power-cut test of the event log), in
# insertion order after their dependencies (disk.order); ext4 checksums need crc32c.
disk_modules=(virtio-pci virtio-blk crc32c-generic ext4)

# extract_vmlinux BZIMAGE OUT: find the compressed payload by its magic and decompress it
# (as the kernel's scripts/extract-vmlinux does). Succeeds only if OUT is an ELF file.
extract_vmlinux() {
    local img="$1" out="$2" magic tool off
    for magic_tool in '\xfd7zXZ\x00|xz -dc' '\x28\xb5\x2f\xfd|zstd -qdc' '\x1f\x8b\x08|gzip -dc'; do
        magic="${magic_tool%%|*}"; tool="${magic_tool#*|}"
        command -v "${tool%% *}" >/dev/null 2>&1 || continue
        for off in $(LC_ALL=C grep -obUaP "$magic" "$img" 2>/dev/null | cut -d: -f1 | head -5); do
            tail -c +$((off + 1)) "$img" | $tool >"$out" 2>/dev/null || true
            if [ "$(head -c 4 "$out" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]; then
                return 0
            fi
        done
    done
    rm -f "$out"
    return 1
}

kver="${VM_KERNEL_VERSION:-}"
if [ -z "$kver" ] && [ -f "$cache/kernel/current" ]; then
    kver="$(cat "$cache/kernel/current")"
fi
pick_version() {
    apt-cache pkgnames linux-image- 2>/dev/null \
        | sed -nE 's/^linux-image-([0-9.]+-[0-9]+)-amd64-unsigned$/\1/p' | sort -V | tail -1
}
if [ -z "$kver" ]; then
    kver="$(pick_version)"
    if [ -z "$kver" ] && is_root; then
        log "apt knows no linux-image-*-amd64-unsigned: apt-get update"
        apt-get update -qq
        kver="$(pick_version)"
    fi
    [ -n "$kver" ] || die "no linux-image-<version>-amd64-unsigned package in apt (run apt-get update?)"
fi
kdir="$cache/kernel/$kver-amd64"

# A cache from before the disk modules: extract again (from the cached package).
[ -f "$kdir/ok" ] && [ ! -f "$kdir/disk.order" ] && rm -f "$kdir/ok"
if [ ! -f "$kdir/ok" ]; then
    pkg="linux-image-$kver-amd64-unsigned"
    mkdir -p "$cache/deb"
    deb="$(ls "$cache/deb/${pkg}_"*.deb 2>/dev/null | head -1 || true)"
    if [ -z "$deb" ]; then
        log "downloading $pkg"
        sandbox=()
        is_root && sandbox=(-o APT::Sandbox::User=root)   # no "_apt cannot access" warning
        (cd "$cache/deb" && apt-get download -q "${sandbox[@]}" "$pkg" >&2) \
            || die "apt-get download $pkg failed (apt-get update? network?)"
        deb="$(ls "$cache/deb/${pkg}_"*.deb | head -1)"
    fi
    log "extracting vmlinuz, the CAN and the disk modules from $(basename "$deb")"
    tmp="$(mktemp -d "$cache/.extract.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    dpkg-deb -x "$deb" "$tmp/x"
    moddir="$(ls -d "$tmp"/x/lib/modules/*/ 2>/dev/null | head -1)"
    [ -n "$moddir" ] || moddir="$(ls -d "$tmp"/x/usr/lib/modules/*/ | head -1)"
    release="$(basename "$moddir")"
    vmlinuz="$(ls "$tmp"/x/boot/vmlinuz-* | head -1)"
    mkdir -p "$tmp/out/modules"
    cp "$vmlinuz" "$tmp/out/vmlinuz"
    echo "$release" >"$tmp/out/release"

    # Find a module's file by name ("can-dev" may be spelled can_dev); .ko, .ko.xz or .ko.zst.
    find_ko() {
        local alt="${1//_/-}" alt2="${1//-/_}"
        find "$moddir/kernel" -type f \( -name "$alt.ko*" -o -name "$alt2.ko*" \) | head -1
    }
    # A module's file, decompressed if needed, into out/modules/NAME.ko; echoes its deps.
    declare -A done_mod=()
    order=()
    add_module() {   # add_module NAME: dependencies first, then NAME
        local name="${1//_/-}" src dst deps d
        [ -n "${done_mod[$name]:-}" ] && return 0
        done_mod[$name]=1
        src="$(find_ko "$name")"
        [ -n "$src" ] || die "module $name not in $pkg"
        dst="$tmp/out/modules/$name.ko"
        case "$src" in
            *.ko) cp "$src" "$dst" ;;
            *.ko.xz) xz -dc "$src" >"$dst" ;;
            *.ko.zst) zstd -qdc "$src" >"$dst" ;;
            *.ko.gz) gzip -dc "$src" >"$dst" ;;
            *) die "unknown module format: $src" ;;
        esac
        deps="$(tr '\0' '\n' <"$dst" | sed -n 's/^depends=//p' | head -1)"
        for d in ${deps//,/ }; do add_module "$d"; done
        order+=("$name")
    }
    for m in "${want_modules[@]}"; do add_module "$m"; done
    printf '%s\n' "${order[@]}" >"$tmp/out/modules.order"
    order=()
    for m in "${disk_modules[@]}"; do add_module "$m"; done
    printf '%s\n' "${order[@]}" >"$tmp/out/disk.order"
    for m in "${extra_modules[@]}"; do
        src="$(find_ko "$m")" && [ -n "$src" ] && case "$src" in
            *.ko) cp "$src" "$tmp/out/modules/$m.ko" ;;
            *) ;;   # compressed extras: skipped (only the defaults are decompressed)
        esac
    done
    # The uncompressed kernel (ELF vmlinux): qemu boots it directly through PVH
    # (CONFIG_PVH=y), which skips decompressing the bzImage under TCG: ~5 s instead of ~12 s
    # from qemu start to /init. Optional: run.sh falls back to vmlinuz without it.
    extract_vmlinux "$tmp/out/vmlinuz" "$tmp/out/vmlinux" || touch "$tmp/out/no-vmlinux"
    echo "$pkg $(basename "$deb")" >"$tmp/out/ok"
    rm -rf "$kdir"
    mkdir -p "$(dirname "$kdir")"
    mv "$tmp/out" "$kdir"
    rm -rf "$tmp"
    trap - EXIT
    log "kernel $release ready in $kdir (modules: $(tr '\n' ' ' <"$kdir/modules.order"))"
fi
if [ ! -f "$kdir/vmlinux" ] && [ ! -f "$kdir/no-vmlinux" ]; then
    if extract_vmlinux "$kdir/vmlinuz" "$kdir/vmlinux.tmp"; then
        mv "$kdir/vmlinux.tmp" "$kdir/vmlinux"
    else
        log "could not extract vmlinux from vmlinuz: booting the bzImage (slower)"
        touch "$kdir/no-vmlinux"
    fi
fi
mkdir -p "$cache/kernel"
echo "$kver" >"$cache/kernel/current"
echo "$kdir"
