#!/bin/sh
# The SocketCAN tests inside the Debian VM of scripts/vm/deb-test.sh, booted under systemd
# (scripts/vm/can-tests.sh --arch arm64 runs it: the arm64 VM, the aarch64 build). The
# payload's files/ directory holds root/, which mirrors absolute paths (the test
# executables, servogate and servosim beside them as cargo left them: the tests find the
# binaries from their own path), "tests" (one executable path a line) and "filter" (words
# passed to each executable: a test name filter, or nothing). Each executable runs with vcan0 and a
# tbf qdisc required (SERVOGATE_REQUIRE_VCAN=1, SERVOGATE_REQUIRE_TBF=1: a missing one
# fails), one test at a time (they share vcan0); one PASS: or FAIL: line each, then the
# exit marker with the run's nonce. POSIX sh (dash).
set -u

. /mnt/payload/env      # NONCE
files=/mnt/payload/files
filter="$(cat "$files/filter" 2>/dev/null)"
passes=0
failures=0
pass() { passes=$((passes + 1)); echo "PASS: $*"; }
fail() { failures=$((failures + 1)); echo "FAIL: $*"; }

# The image's own broker is not used (each test starts one on a free port): stopped, so
# that it takes no CPU from the emulated cores.
systemctl stop mosquitto 2>/dev/null

# The files at their paths (the payload disk is read-only; the tests write beside them).
cp -a "$files/root/." /
if modprobe vcan && ip link add vcan0 type vcan && ip link set vcan0 up; then
    pass "vcan0 up ($(uname -m), kernel $(uname -r))"
else
    fail "cannot create vcan0 in the VM"
fi

export SERVOGATE_REQUIRE_VCAN=1 SERVOGATE_REQUIRE_TBF=1 RUST_BACKTRACE=1
out=/run/can-test.out
while read -r t; do
    [ -n "$t" ] || continue
    name="$(basename "$t")"
    start=$(cut -d' ' -f1 /proc/uptime)
    # shellcheck disable=SC2086 # the filter is zero or more words
    if (cd /tmp && "$t" --test-threads=1 $filter) >"$out" 2>&1; then
        pass "$name: $(grep -E '^test result:' "$out" | tail -1) (from ${start} s)"
    else
        fail "$name"
        # The failing tests and their last words, on lines deb-test.sh shows.
        # (The lines after "panicked at" are the assertion's message, left and right.)
        grep -E -A3 '^test .* FAILED$|panicked at|^---- ' "$out" | head -40 | sed 's/^/  log: /'
        tail -n 15 "$out" | sed 's/^/  log: /'
    fi
done <"$files/tests"

echo "can-tests: $passes passed, $failures failed; guest uptime $(cut -d' ' -f1 /proc/uptime) s"
if [ "$failures" -eq 0 ] && [ "$passes" -gt 1 ]; then status=0; else status=1; fi
echo "DEB-TEST-EXIT=$status (run $NONCE)"
exit "$status"
