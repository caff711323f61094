#!/usr/bin/env bash
# Runs every check of servogate, as CI does: format, lints, and every test (unit, pty,
# real mosquitto). Installs the system packages the tests need when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- system packages -------------------------------------------------------------------
# mosquitto: the tests start their own broker on a free loopback port.
# socat:     end-to-end tests wire servosim and servogate with a pty pair, as a user would.
missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || missing+=(mosquitto-clients)
command -v socat >/dev/null 2>&1 || missing+=(socat)
# mkfs.ext4: the power-cut test formats the VM's virtual disk.
command -v mkfs.ext4 >/dev/null 2>&1 || [ -x /usr/sbin/mkfs.ext4 ] || [ -x /sbin/mkfs.ext4 ] || missing+=(e2fsprogs)
# python3 with venv: the Sparkplug interop test's third-party host (pysparkplug, PyPI).
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "scripts/test.sh needs: ${missing[*]}" >&2
        echo "install them with:   sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi
# The packaged broker must not hold port 1883 or a pid file the tests do not expect.
if command -v systemctl >/dev/null 2>&1; then systemctl stop mosquitto >/dev/null 2>&1 || true; fi

# --- Python packages --------------------------------------------------------------------
# pysparkplug, pinned, in a venv of our own under target/ (tests/tests/sparkplug_interop.rs
# finds it there): a Sparkplug host we did not write reads what the gateway publishes.
venv=target/interop-venv
if ! "$venv/bin/python" -c "import pysparkplug" >/dev/null 2>&1; then
    echo "==> pysparkplug into $venv (tests/interop/requirements.txt)"
    mkdir -p target
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r tests/interop/requirements.txt
fi
export SERVOGATE_INTEROP_PYTHON="$PWD/$venv/bin/python"

# --- Rust components ---------------------------------------------------------------------
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy
fi

# The build takes a few GiB; say what there is, so a full disk is recognised as such.
echo "==> disk: $(df -h . | awk 'NR==2 {print $4}') free"

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> build the binaries the end-to-end tests start"
cargo build --workspace --bins --locked

echo "==> cargo test"
cargo test --workspace --locked

# arm64 (issue 13): the workspace cross-built for aarch64 and its tests run under
# qemu-user, so an arm64 regression fails here: every unit test, the pty tests of the
# Modbus bus, and the end-to-end tests (servogate and servosim emulated on a socat pty,
# mosquitto native). scripts/emu-run.sh is the runner (it preloads a termios2 shim:
# qemu-user lacks those ioctls). Left out under emulation: the durability stress tests
# (20 SIGKILLs, a 60 s network cut: the disk does not depend on the CPU, and they run
# natively above), the 300-command flood (its every-command-answered count depends on the
# desk keeping up with a burst, which an emulated CPU does not), and the pysparkplug
# interop (it decodes bytes the native run already checks).
echo "==> arm64: cross build and tests under qemu-user"
scripts/cross.sh arm64
arm=(--locked --target aarch64-unknown-linux-gnu)
cargo build "${arm[@]}" --workspace --bins
SERVOGATE_TIME_SCALE=10 cargo test "${arm[@]}" --workspace --exclude servogate-e2e
cargo test "${arm[@]}" -p servogate-e2e -- \
    --skip twenty_sigkills_under_load --skip a_sixty_second_network_cut \
    --skip a_stop_behind_a_flood_of_commands --skip pysparkplug_decodes

# The SocketCAN tests need vcan0. This family of machines has no CAN in its kernel, so
# they run inside a qemu VM (scripts/vm/run.sh; prepare.sh installs qemu, busybox-static
# and cpio as root and caches a Debian kernel with the CAN modules). On a box whose own
# kernel has vcan0 they run directly.
if [ -e /sys/class/net/vcan0 ]; then
    echo "==> CANopen tests on this machine's vcan0"
    SERVOGATE_REQUIRE_VCAN=1 cargo test --locked -p servogate-e2e --test canopen --test canopen_commands --test mixed_buses -p servosim --test canopen_vcan -- --test-threads=1
else
    echo "==> CANopen tests in a VM with vcan0 (no CAN in this kernel)"
    scripts/vm/can-tests.sh
fi

# The same CAN suites on arm64: cross-built (the arm64 stage above built them), run
# natively in an emulated arm64 Debian VM booted under systemd (scripts/vm/deb-test.sh's
# image: built once and cached, about 5 minutes; the run about 1 minute). It installs
# QEMU 10 from bookworm-backports (hil/vm/arm64.md).
if [ "$(id -u)" -eq 0 ]; then
    echo "==> CANopen tests on arm64, in an emulated arm64 VM"
    scripts/vm/can-tests.sh --arch arm64
else
    echo "==> CANopen tests on arm64: not run, building the VM's image needs root (debootstrap,"
    echo "    chroot, binfmt_misc): sudo scripts/vm/can-tests.sh --arch arm64"
fi

# The event log against a power cut: the VM is killed while events flow, with the log on
# a virtual ext4 disk; a second boot reads back what survived (two rounds, ~40 s).
echo "==> event log power-cut test in a VM"
PATH="$PATH:/usr/sbin:/sbin" scripts/vm/powercut.sh 2

# The systemd unit's hardening: systemd-analyze's exposure figure, at most 2.0.
echo "==> systemd unit exposure"
scripts/check-unit.sh

echo "==> target/ holds $(du -sh target 2>/dev/null | cut -f1)"
echo "==> all checks passed"
