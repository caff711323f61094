#!/usr/bin/env bash
# Runs an ARM build of a servogate program on this x86_64 machine under qemu-user: the
# runner cargo uses for `cargo test --target aarch64-unknown-linux-gnu` (.cargo/config.toml)
# and the one the end-to-end harness puts in front of servogate and servosim
# (SERVOGATE_RUNNER, exported here so an emulated test starts its children emulated too).
#
#   scripts/emu-run.sh arm64|armhf PROGRAM [ARGS...]
#
# qemu-user has no termios2 ioctls, which the serialport crate uses to open every port:
# scripts/cross.sh builds tests/emu/termios2_shim.c for the architecture, and it is
# preloaded into the emulated process only (qemu's -E sets the guest's environment; the
# shim takes the variable out again as it loads, so native children never see it).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
arch=${1:?usage: scripts/emu-run.sh arm64|armhf PROGRAM [ARGS...]}
shift
case "$arch" in
    arm64) qemu=qemu-aarch64; gnu=aarch64-linux-gnu ;;
    armhf) qemu=qemu-arm; gnu=arm-linux-gnueabihf ;;
    *) echo "emu-run.sh: unknown architecture $arch (arm64 or armhf)" >&2; exit 64 ;;
esac
shim="$root/target/emu/termios2_shim-$arch.so"
preload=()
[ -e "$shim" ] && preload=(-E "LD_PRELOAD=$shim")
export SERVOGATE_RUNNER="$root/scripts/emu-run.sh $arch"
exec "$qemu" -L "/usr/$gnu" "${preload[@]}" "$@"
