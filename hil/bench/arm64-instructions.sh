#!/usr/bin/env bash
# Instructions per sample of the arm64 gateway (issue 13, BENCHMARKS.md "CPU per sample at
# a real line's rate"): the aarch64 release build runs under qemu-user with qemu's
# instruction-counting plugin, in the rig of scripts/bench.sh (servosim on a socat pty,
# a real mosquitto). Emulated time means nothing; the count does.
#
#   hil/bench/arm64-instructions.sh line 6          six units every POLL (default 50ms)
#   POLL=10ms hil/bench/arm64-instructions.sh line 6
#   hil/bench/arm64-instructions.sh instant 6       flat out
#
# The plugin prints the instructions of the gateway's whole life at its exit, so the
# script runs it twice, for SHORT and LONG seconds (default 10 and 30), and divides the
# difference in instructions by the difference in samples: start-up and shutdown cancel.
# Debian's qemu-user has no plugin support: build-qemu-insn.sh builds one (about 5
# minutes, as root) into QEMU_INSN (default target/qemu-insn).
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:?usage: arm64-instructions.sh line|instant UNITS}
units=${2:?usage: arm64-instructions.sh line|instant UNITS}
qemu_dir=${QEMU_INSN:-target/qemu-insn}
hil/bench/build-qemu-insn.sh "$qemu_dir" >/dev/null
scripts/cross.sh arm64
cargo build --release --locked --target aarch64-unknown-linux-gnu -p servogate -q
out=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] || rm -rf "$out"' EXIT
run() { # seconds -> "instructions samples"
    local log="$out/insn-$1.log"
    # The termios2 shim (scripts/emu-run.sh): qemu-user cannot open a serial port without it.
    GW_RUNNER="$qemu_dir/bin/qemu-aarch64 -L /usr/aarch64-linux-gnu -E LD_PRELOAD=$(pwd)/target/emu/termios2_shim-arm64.so -plugin $qemu_dir/lib/libinsn.so,inline=on -d plugin -D $log" \
        GW_BIN="${ARM_BIN:-target/aarch64-unknown-linux-gnu/release/servogate}" WARMUP=4 DURATION="$1" \
        scripts/bench.sh "$mode" "$units" >"$out/bench-$1.txt"
    for _ in $(seq 100); do grep -q "total insns" "$log" 2>/dev/null && break; sleep 0.1; done
    echo "$(awk '/total insns/ {print $3}' "$log") $(awk -F' = ' '/replies served since start/ {print $2}' "$out/bench-$1.txt")"
}
read -r i1 s1 < <(run "${SHORT:-10}")
read -r i2 s2 < <(run "${LONG:-30}")
cat "$out/bench-${LONG:-30}.txt"
python3 -c "
i1, s1, i2, s2 = $i1, $s1, $i2, $s2
print(f'arm64 (qemu-user, insn plugin): {(i2 - i1) / (s2 - s1):,.0f} instructions per sample '
      f'({i2 - i1:,} over {s2 - s1:,.0f} samples)')"
