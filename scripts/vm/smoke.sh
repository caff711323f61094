#!/usr/bin/env bash
# Checks the test VM itself (scripts/vm/run.sh), in three boots, ~30 s:
#   1. vcan0 exists and is up in the guest, and the guest's exit status 0 comes back;
#   2. a failing command (`false`) makes run.sh fail;
#   3. programs from the host run in the guest: mosquitto with a pub/sub round trip on
#      127.0.0.1, a std-only Rust program moving frames over CAN_RAW on vcan0
#      (scripts/vm/can_smoke.rs, built with rustc), and servosim/servogate `--help` when
#      target/debug holds them.
# Prints PASS/FAIL per check; exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
run=scripts/vm/run.sh
cache="${VM_CACHE:-hil/vm/cache}"
failed=0
pass() { echo "smoke: PASS: $*"; }
fail() { echo "smoke: FAIL: $*"; failed=1; }

# 1
if out="$($run -- 'ip link show vcan0 && cat /sys/class/net/vcan0/flags && echo hello' 2>&1)" \
    && grep -q 'vcan0: <NOARP,UP,LOWER_UP>' <<<"$out" && grep -qx hello <<<"$out"; then
    pass "vcan0 up in the guest, exit status 0 returned"
else
    echo "$out"; fail "vcan0 check"
fi

# 2
$run -- 'false' >/dev/null 2>&1
rc=$?
if [ "$rc" = 1 ]; then pass "'false' in the guest exits 1"; else fail "'false' in the guest exited $rc"; fi

# 3
files=() cmds='set -e'
for f in /usr/sbin/mosquitto /usr/bin/mosquitto_pub /usr/bin/mosquitto_sub; do
    [ -x "$f" ] && files+=(--file "$f")
done
if [ ${#files[@]} = 6 ]; then
    cmds="$cmds
mosquitto -p 1883 -d; sleep 1
mosquitto_sub -h 127.0.0.1 -p 1883 -t smoke -C 1 -W 10 >/tmp/got &
sleep 1; mosquitto_pub -h 127.0.0.1 -p 1883 -t smoke -q 1 -m hello-from-vm; wait
echo \"mqtt received: \$(cat /tmp/got)\""
else
    echo "smoke: skipped mosquitto (apt-get install mosquitto mosquitto-clients)"
fi
if command -v rustc >/dev/null 2>&1; then
    mkdir -p "$cache"
    if [ ! -x "$cache/can_smoke" ] || [ scripts/vm/can_smoke.rs -nt "$cache/can_smoke" ]; then
        rustc -O --edition 2021 -o "$cache/can_smoke" scripts/vm/can_smoke.rs || fail "rustc can_smoke.rs"
    fi
    files+=(--file "$cache/can_smoke:/usr/local/bin/can_smoke")
    cmds="$cmds
can_smoke vcan0 5000"
else
    echo "smoke: skipped the Rust CAN canary (no rustc)"
fi
for b in servosim servogate; do
    if [ -x "target/debug/$b" ]; then
        files+=(--file "target/debug/$b")
        cmds="$cmds
$b --help | head -1"
    fi
done
if out="$($run "${files[@]}" -- "$cmds" 2>&1)"; then
    grep -E '^(mqtt received|can_smoke|Simulated|Edge gateway)' <<<"$out" | sed 's/^/smoke:   /'
    if [[ "$cmds" == *mosquitto* ]] && ! grep -q 'mqtt received: hello-from-vm' <<<"$out"; then
        fail "mosquitto round trip"
    fi
    pass "host programs run in the guest ($(grep -o 'guest commands succeeded, .*' <<<"$out"))"
else
    echo "$out"; fail "host programs in the guest"
fi

[ "$failed" = 0 ] && echo "smoke: all passed" || echo "smoke: some checks FAILED"
exit "$failed"
