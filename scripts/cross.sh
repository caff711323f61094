#!/usr/bin/env bash
# Makes this x86_64 machine able to build (and run under emulation) servogate for an ARM
# edge box: Debian's cross compiler and C library for the architecture, qemu-user, and the
# Rust target. Installs with apt-get as root, or says exactly what to install.
#
#   scripts/cross.sh arm64|armhf
#
# .cargo/config.toml names the linkers and the qemu runners.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:?usage: scripts/cross.sh arm64|armhf}
case "$arch" in
    arm64) gnu=aarch64-linux-gnu; target=aarch64-unknown-linux-gnu; qemu=qemu-aarch64 ;;
    armhf) gnu=arm-linux-gnueabihf; target=armv7-unknown-linux-gnueabihf; qemu=qemu-arm ;;
    *) echo "cross.sh: unknown architecture $arch (arm64 or armhf)" >&2; exit 64 ;;
esac
missing=()
command -v "$gnu-gcc" >/dev/null 2>&1 || missing+=("gcc-$gnu")
[ -e "/usr/$gnu/lib/libc.so.6" ] || [ -e "/usr/$gnu/lib/libc.so" ] || missing+=("libc6-dev-$arch-cross")
command -v "$qemu" >/dev/null 2>&1 || missing+=(qemu-user)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
    else
        echo "cross builds for $arch need: ${missing[*]}" >&2
        echo "install them with:   sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi
if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi

# The emulated serial ports (scripts/emu-run.sh preloads it): the termios2 shim.
shim=target/emu/termios2_shim-$arch.so
if [ ! -e "$shim" ] || [ tests/emu/termios2_shim.c -nt "$shim" ]; then
    mkdir -p target/emu
    "$gnu-gcc" -shared -fPIC -O2 -Wall -o "$shim" tests/emu/termios2_shim.c -ldl
fi
