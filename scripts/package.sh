#!/usr/bin/env bash
# Builds the servogate .deb with cargo-deb and prints its path as the last line of stdout.
#
#   scripts/package.sh [--arch amd64|arm64|armhf]
#
# --arch cross-builds for an ARM edge box (arm64: aarch64-unknown-linux-gnu, Raspberry Pi
# 3/4/5 and CM4 on a 64-bit OS, i.MX8, IOT2050; armhf: armv7-unknown-linux-gnueabihf,
# 32-bit Raspberry Pi OS, older Moxa and Advantech boards) with Debian's cross toolchains
# (scripts/cross.sh installs them and the Rust targets). Default: this machine's.
#
# The package ([package.metadata.deb] in crates/servogate/Cargo.toml): /usr/bin/servogate,
# /usr/bin/servosim, the unit systemd/servogate.service, the conffile
# /etc/servogate/servogate.toml (configs/servogate.toml), maintainer scripts from
# crates/servogate/debian/. Installs cargo-deb (cargo install cargo-deb --locked) when it
# is missing. Progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "package: $*" >&2; }

arch=""
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch="${2:?--arch needs amd64, arm64 or armhf}"; shift 2 ;;
        *) log "unknown argument $1 (usage: scripts/package.sh [--arch amd64|arm64|armhf])"; exit 64 ;;
    esac
done
target_args=()
case "$arch" in
    "" | amd64) ;;
    arm64) target_args=(--target aarch64-unknown-linux-gnu) ;;
    armhf) target_args=(--target armv7-unknown-linux-gnueabihf) ;;
    *) log "unknown --arch $arch (amd64, arm64 or armhf)"; exit 64 ;;
esac
if [ ${#target_args[@]} -gt 0 ]; then
    scripts/cross.sh "$arch" >&2
fi

if ! cargo deb --version >/dev/null 2>&1; then
    log "installing cargo-deb (cargo install cargo-deb --locked; a few minutes, once)"
    cargo install cargo-deb --locked >&2
fi
# $auto dependencies are computed with dpkg-shlibdeps (dpkg-dev) when it is there.
if ! command -v dpkg-shlibdeps >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing dpkg-dev (dpkg-shlibdeps, for the package's library dependencies)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq --no-install-recommends dpkg-dev >/dev/null \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends dpkg-dev >/dev/null; }
    else
        log "warning: no dpkg-shlibdeps (sudo apt-get install dpkg-dev): library dependencies are guessed"
    fi
fi

# Both binaries first: cargo-deb builds only the servogate crate's own binary, and would
# package whatever servosim is lying in target/release.
log "cargo build --release -p servogate -p servosim ${target_args[*]}"
cargo build --release --locked -p servogate -p servosim "${target_args[@]}" >&2

# --dbgsym: the binaries go in stripped (servogate 53 MB -> 11 MB: the release profile
# keeps line tables), their debug info in servogate-dbgsym_*.ddeb beside the .deb, for
# symbolised backtraces where one is installed. zlib: the compression Rust's backtraces read.
log "cargo deb -p servogate --dbgsym"
out="$(cargo deb -p servogate --no-build --locked --dbgsym --compress-debug-symbols=zlib "${target_args[@]}" 2>&1)" \
    || { echo "$out" >&2; exit 1; }
echo "$out" >&2
deb="$(grep -E '\.deb$' <<<"$out" | tail -1)"
if [ -z "$deb" ] || [ ! -f "$deb" ]; then log "error: cargo deb printed no .deb path"; exit 1; fi
# A cross build's dpkg-shlibdeps writes "libc6:arm64 (>= 2.36)": an architecture-qualified
# dependency dpkg does not accept in a package of that same architecture. Plain "libc6".
if [ -n "$arch" ] && [ "$arch" != amd64 ] && dpkg-deb -f "$deb" Depends | grep -q ":$arch"; then
    tmp="$(mktemp -d)"
    dpkg-deb -R "$deb" "$tmp/pkg"
    sed -i "/^Depends:/s/:$arch//g" "$tmp/pkg/DEBIAN/control"
    dpkg-deb --root-owner-group -Zxz -b "$tmp/pkg" "$deb" >/dev/null
    rm -rf "$tmp"
fi
log "$(dpkg-deb -f "$deb" Package Version Architecture Depends | tr '\n' ' ')"
echo "$deb"
