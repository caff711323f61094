#!/bin/bash
# Build qemu user-mode emulators (aarch64 + arm) WITH TCG plugin support, plus the
# instruction-counting plugin (tests/tcg/plugins/insn.c -> libinsn.so), from the
# Debian bookworm-backports qemu source package.  Run as root on Debian bookworm.
#
#   usage: build-qemu-insn.sh PREFIX
#   result: PREFIX/bin/qemu-aarch64, PREFIX/bin/qemu-arm, PREFIX/lib/libinsn.so,
#           PREFIX/lib/qemu-plugins/*.so (all test + contrib plugins)
#   use:    PREFIX/bin/qemu-aarch64 -L /usr/aarch64-linux-gnu \
#               -plugin PREFIX/lib/libinsn.so,inline=on -d plugin PROG ARGS
#           -> prints "cpu 0 insns: N" / "total insns: N" on stderr at exit
#              (add "-D FILE" to send it to FILE instead).
#
# env: JOBS (default 2), WORKDIR (default /var/tmp/qemu-insn-build; wiped on use)
set -euo pipefail

if [ $# -ne 1 ]; then echo "usage: $0 PREFIX" >&2; exit 2; fi
mkdir -p "$1"
PREFIX=$(cd "$1" && pwd)
JOBS=${JOBS:-2}
WORKDIR=${WORKDIR:-/var/tmp/qemu-insn-build}

if [ -x "$PREFIX/bin/qemu-aarch64" ] && [ -f "$PREFIX/lib/libinsn.so" ]; then
    echo "already built: $PREFIX/bin/qemu-aarch64 and $PREFIX/lib/libinsn.so exist"
    exit 0
fi
[ "$(id -u)" = 0 ] || { echo "must run as root (apt-get)" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
BPO=http://deb.debian.org/debian
# 1. apt sources: bookworm-backports binaries (meson >= 1.5, python3-pycotap) and sources
if ! grep -rqsE "^deb +[^ ]+ +bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/*.list &&
   ! grep -rqs "bookworm-backports" /etc/apt/sources.list.d/*.sources; then
    echo "deb $BPO bookworm-backports main" > /etc/apt/sources.list.d/bookworm-backports.list
fi
echo "deb-src $BPO bookworm-backports main" > /etc/apt/sources.list.d/qemu-src.list
apt-get update

# 2. build dependencies (only what the user-mode + plugins build needs)
apt-get install -y --no-install-recommends \
    gcc make pkg-config ninja-build libglib2.0-dev flex bison xz-utils \
    python3 python3-venv python3-tomli dpkg-dev ca-certificates
apt-get install -y --no-install-recommends -t bookworm-backports meson python3-pycotap

# 3. source: the upstream (+ds) orig tarball of the backports qemu source package.
#    --download-only: we build the pristine upstream tree; the Debian patches are not
#    needed, and the .dsc/.debian.tar.xz of a source package can be missing on a
#    mirror, so only the orig tarball is required (checksum-verified against Sources).
rm -rf "$WORKDIR"; mkdir -p "$WORKDIR"; cd "$WORKDIR"
apt-get source --download-only qemu/bookworm-backports || true
ORIG=$(ls qemu_*.orig.tar.xz 2>/dev/null | sed -n 1p || true)
[ -n "$ORIG" ] || { echo "apt-get source did not fetch qemu_*.orig.tar.xz" >&2; exit 1; }
SUM=$(apt-cache showsrc qemu | awk -v f="$ORIG" '/^Checksums-Sha256:/{s=1;next} /^[^ ]/{s=0} s&&$3==f&&!d{print $1; d=1}')
[ -n "$SUM" ] && echo "$SUM  $ORIG" | sha256sum -c -
tar xf "$ORIG"
SRCDIR=$(ls -d qemu-*/ | sed -n 1p); SRCDIR=${SRCDIR%/}
cd "$SRCDIR"
echo "building qemu $(cat VERSION) from $ORIG"

# 4. configure: linux-user only, plugins on, everything optional off.
#    --python=/usr/bin/python3 avoids pyenv/other pythons; --disable-install-blobs because
#    the +ds tarball has no firmware blobs; --disable-download: offline (uses apt's meson).
./configure --python=/usr/bin/python3 --prefix="$PREFIX" \
    --target-list=aarch64-linux-user,arm-linux-user \
    --without-default-features --enable-plugins \
    --disable-system --disable-tools --disable-docs --disable-werror \
    --disable-download --disable-install-blobs

# 5. build just the emulators and the plugins (skips unit tests etc.)
ninja -C build -j"$JOBS" qemu-aarch64 qemu-arm test-plugins contrib-plugins

# 6. install
mkdir -p "$PREFIX/bin" "$PREFIX/lib/qemu-plugins"
install -m 755 build/qemu-aarch64 build/qemu-arm "$PREFIX/bin/"
install -m 755 build/tests/tcg/plugins/*.so build/contrib/plugins/*.so "$PREFIX/lib/qemu-plugins/"
install -m 755 build/tests/tcg/plugins/libinsn.so "$PREFIX/lib/libinsn.so"

# 7. sanity check: the emulator accepts -plugin and loads libinsn.so
"$PREFIX/bin/qemu-aarch64" --version | head -1
"$PREFIX/bin/qemu-aarch64" -h | grep -q -- '^-plugin' || { echo "no plugin support?!" >&2; exit 1; }
echo "OK: $PREFIX/bin/qemu-aarch64  $PREFIX/bin/qemu-arm  $PREFIX/lib/libinsn.so"
