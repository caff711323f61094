#!/usr/bin/env bash
# Builds the servogate .deb with cargo-deb and prints its path as the last line of stdout.
#
#   scripts/package.sh
#
# The package ([package.metadata.deb] in crates/servogate/Cargo.toml): /usr/bin/servogate,
# /usr/bin/servosim, the unit systemd/servogate.service, the conffile
# /etc/servogate/servogate.toml (configs/servogate.toml), maintainer scripts from
# crates/servogate/debian/. Installs cargo-deb (cargo install cargo-deb --locked) when it
# is missing. Progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "package: $*" >&2; }

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
log "cargo build --release -p servogate -p servosim"
cargo build --release --locked -p servogate -p servosim >&2

# --dbgsym: the binaries go in stripped (servogate 53 MB -> 11 MB: the release profile
# keeps line tables), their debug info in servogate-dbgsym_*.ddeb beside the .deb, for
# symbolised backtraces where one is installed. zlib: the compression Rust's backtraces read.
log "cargo deb -p servogate --dbgsym"
out="$(cargo deb -p servogate --no-build --locked --dbgsym --compress-debug-symbols=zlib 2>&1)" \
    || { echo "$out" >&2; exit 1; }
echo "$out" >&2
deb="$(grep -E '\.deb$' <<<"$out" | tail -1)"
if [ -z "$deb" ] || [ ! -f "$deb" ]; then log "error: cargo deb printed no .deb path"; exit 1; fi
log "$(dpkg-deb -f "$deb" Package Version Architecture Depends | tr '\n' ' ')"
echo "$deb"
