#!/usr/bin/env bash
# Runs the SocketCAN tests inside the qemu VM of scripts/vm/run.sh (this family of
# machines has no CAN in its kernel): the end-to-end CANopen tests (tests/tests/canopen.rs:
# mosquitto, servosim canopen and servogate on vcan0) and servosim's own vcan tests, with
# SERVOGATE_REQUIRE_VCAN=1 so that a missing vcan0 fails instead of skipping.
#
#   scripts/vm/can-tests.sh            # debug build, as scripts/test.sh
#   CAN_TESTS_FILTER=interface scripts/vm/can-tests.sh    # only tests whose name matches
#   scripts/vm/can-tests.sh --arch arm64
#
# --arch arm64: the same tests cross-built for aarch64 (scripts/cross.sh), in the emulated
# arm64 Debian VM of scripts/vm/deb-test.sh --arch arm64 (its cached image, booted under
# systemd; hil/vm/can-tests-guest.sh runs the executables there, natively arm64, against
# the image's mosquitto and socat and its kernel's vcan and sch_tbf). The VM run takes
# about a minute on a 2-core machine; building the image the first time about 5 more.
#
# Prints the guest's output and one verdict line; exits 0 only if every test passed.
# On a box whose kernel has vcan (scripts/vcan-setup.sh), run the tests directly instead:
#   SERVOGATE_REQUIRE_VCAN=1 cargo test -p servogate-e2e --test canopen -- --test-threads=1
set -euo pipefail
cd "$(dirname "$0")/../.."

arch=amd64
case "${1:-}" in
    "") ;;
    --arch) arch="${2:?--arch needs amd64 or arm64}" ;;
    --arch=*) arch="${1#--arch=}" ;;
    *) echo "can-tests: unexpected argument $1 (usage: scripts/vm/can-tests.sh [--arch arm64])" >&2; exit 2 ;;
esac
tests_of() {    # the e2e and servosim CAN test executables of a build, from cargo's JSON
    cargo test --locked --no-run --message-format=json "$@" \
        -p servogate-e2e --test canopen --test canopen_commands --test mixed_buses -p servosim --test canopen_vcan 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\/deps\/[^"]*\)".*/\1/p'
}

if [ "$arch" = arm64 ]; then
    scripts/cross.sh arm64
    echo "can-tests: building the aarch64 binaries and test executables" >&2
    arm=(--locked --target aarch64-unknown-linux-gnu)
    cargo build "${arm[@]}" --workspace --bins
    tests=()
    while IFS= read -r exe; do tests+=("$exe"); done < <(tests_of --target aarch64-unknown-linux-gnu)
    [ ${#tests[@]} -ge 1 ] || { echo "can-tests: no test executable found" >&2; exit 2; }
    payload="$(mktemp -d)"
    trap 'rm -rf "$payload"' EXIT
    bindir="$(dirname "$(dirname "${tests[0]}")")"
    # Without their debug info the executables are a tenth of the size (the payload disk).
    for f in "${tests[@]}" "$bindir/servogate" "$bindir/servosim"; do
        mkdir -p "$payload/root$(dirname "$f")"
        aarch64-linux-gnu-strip --strip-debug -o "$payload/root$f" "$f"
    done
    printf '%s\n' "${tests[@]}" >"$payload/tests"
    printf '%s\n' "${CAN_TESTS_FILTER:-}" >"$payload/filter"
    if DEB_TEST_TIMEOUT="${DEB_TEST_TIMEOUT:-1500}" scripts/vm/deb-test.sh --arch arm64 --deb none \
        --guest hil/vm/can-tests-guest.sh --payload "$payload"; then
        echo "can-tests: PASS (vcan0 in the arm64 VM)"
    else
        rc=$?
        echo "can-tests: FAIL (exit $rc)"
        exit "$rc"
    fi
    exit 0
fi
[ "$arch" = amd64 ] || { echo "can-tests: unknown --arch $arch (amd64 or arm64)" >&2; exit 2; }

for p in mosquitto socat; do
    command -v "$p" >/dev/null 2>&1 || [ -x "/usr/sbin/$p" ] || {
        echo "can-tests: $p is missing (scripts/test.sh installs it)" >&2; exit 2; }
done

echo "can-tests: building the binaries and the test executables" >&2
cargo build --workspace --bins --locked
# The test executables' paths, from cargo's JSON messages.
tests=()
while IFS= read -r exe; do tests+=("$exe"); done < <(tests_of)
[ ${#tests[@]} -ge 1 ] || { echo "can-tests: no test executable found" >&2; exit 2; }

target="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
files=(--file "$target/debug/servogate" --file "$target/debug/servosim")
for t in "${tests[@]}"; do files+=(--file "$t"); done
for f in /usr/sbin/mosquitto /usr/bin/socat; do files+=(--file "$f"); done
# The ENOBUFS test puts a token bucket qdisc on vcan0 (vcan alone never refuses a send):
# tc from the host and sch_tbf.ko from the cached kernel package, when both are there.
# prepare.sh (run.sh calls it too; it is idempotent) installs tc and fetches the kernel
# package on a fresh machine, so the test runs there rather than being skipped.
scripts/vm/prepare.sh >/dev/null
tbf_env=""
deb="$(ls "${VM_CACHE:-hil/vm/cache}"/deb/linux-image-*.deb 2>/dev/null | head -1 || true)"
if command -v tc >/dev/null 2>&1 && [ -n "$deb" ]; then
    kdir="$(mktemp -d)"
    trap 'rm -rf "$kdir"' EXIT
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$kdir" --wildcards '*sch_tbf.ko' 2>/dev/null || true
    ko="$(find "$kdir" -name sch_tbf.ko | head -1)"
    if [ -n "$ko" ]; then
        files+=(--file "$(command -v tc)" --file "$ko:/opt/sch_tbf.ko")
        tbf_env="export SERVOGATE_SCH_TBF=/opt/sch_tbf.ko SERVOGATE_REQUIRE_TBF=1"
    fi
fi
[ -n "$tbf_env" ] || echo "can-tests: no tc or sch_tbf.ko: the ENOBUFS test will say it is skipped" >&2

# One test at a time: they share vcan0, and the guest's two emulated CPUs.
cmds="set -e
export SERVOGATE_REQUIRE_VCAN=1 RUST_BACKTRACE=1
$tbf_env
cd /tmp"
for t in "${tests[@]}"; do
    cmds="$cmds
echo \"can-tests: running $(basename "$t")\"
$t --test-threads=1 ${CAN_TESTS_FILTER:-}"
done

if VM_TIMEOUT="${VM_TIMEOUT:-600}" VM_MEM="${VM_MEM:-1024}" scripts/vm/run.sh "${files[@]}" -- "$cmds"; then
    echo "can-tests: PASS (vcan0 in the VM)"
else
    rc=$?
    echo "can-tests: FAIL (exit $rc)"
    exit "$rc"
fi
