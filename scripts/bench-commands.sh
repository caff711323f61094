#!/usr/bin/env bash
# Command latency under load, recorded in BENCHMARKS.md ("Command latency"): a benchmark,
# not a test. Builds the release binaries and runs tests/examples/cmd_latency.rs in both
# modes: six servosim units polled flat out, answering at once (instant) and with each
# frame's wire time at 115200 baud (faithful), while COMMANDS `write` commands go through
# the gateway one at a time (IN_FLIGHT in flight).
#
#   scripts/bench-commands.sh                 # both modes, 10,000 commands each
#   COMMANDS=1000 scripts/bench-commands.sh faithful
#
# Needs mosquitto and socat (scripts/test.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
commands=${COMMANDS:-10000}
in_flight=${IN_FLIGHT:-1}
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(instant faithful)

# The example finds servogate and servosim next to its own directory (target/release).
cargo build --release --bins -q
cargo build --release -p servogate-e2e --example cmd_latency -q
for mode in "${modes[@]}"; do
    echo "==> $mode: $commands commands, $in_flight in flight"
    cargo run --release -q -p servogate-e2e --example cmd_latency -- \
        --mode "$mode" --commands "$commands" --in-flight "$in_flight"
done
