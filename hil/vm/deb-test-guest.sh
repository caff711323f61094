#!/bin/sh
# The checks scripts/vm/deb-test.sh runs inside the Debian VM booted under systemd, as
# root, from the payload disk (mounted read-only at /mnt/payload, with servogate.deb and
# the file "env"). Prints one PASS: or FAIL: line per check and, last, the exit marker
# with the run's nonce. POSIX sh (dash): the image is a debootstrap minbase.
#
# In order: the package installs, creates the user, enables the service without starting
# it; the unedited shipped config keeps it from starting; then
#   pty:   servosim on a socat pty pair, servogate on the other end, the local mosquitto:
#          started, sandboxed, availability online, stopped cleanly with status
#          "online":false;
#   policy: a device node outside DeviceAllow= is refused (DevicePolicy=closed works);
#   USB:   a real /dev/ttyUSB0 (qemu's emulated FTDI adapter, kernel ftdi_sio driver)
#          wired to the VM's second UART ($SIM_UART: ttyS1, arm64 ttyAMA1), servosim
#          on it: online with no drop-in,
#          restarted after a kill and online again;
#   operate: `systemctl reload` switches the metrics endpoint on (scraped: axis-1 online,
#          transactions, broker connected); a bad edit is refused, counted and logged
#          with file, line and key while polling goes on;
#   CAN:   a canopen bus on vcan0 opens and sends in the sandbox (AF_CAN, no netlink);
#   a bad config fails the start in ExecStartPre with file, line and key.
set -u

. /mnt/payload/env      # NONCE, DEB_TEST_NOTIFY, SIM_UART
SIM_UART="${SIM_UART:-/dev/ttyS1}"
failures=0
passes=0
t0=$(cut -d' ' -f1 /proc/uptime)

pass() { passes=$((passes + 1)); echo "PASS: $*"; }
fail() { failures=$((failures + 1)); echo "FAIL: $*"; }
note() { echo "note: $*"; }
# check DESCRIPTION COMMAND...: PASS if the command succeeds; returns its verdict.
check() {
    desc="$1"; shift
    if "$@"; then pass "$desc"; else fail "$desc"; return 1; fi
}
not() { ! "$@"; }
# wait_for SECONDS COMMAND...: poll COMMAND until it succeeds, at most SECONDS.
wait_for() {
    deadline=$(($(date +%s) + $1)); shift
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}
uptime_s() { cut -d' ' -f1 /proc/uptime; }
prop() { systemctl show -p "$1" --value servogate; }
is_prop() { [ "$(prop "$1")" = "$2" ]; }
journal() { journalctl -u servogate --no-pager -o cat 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g'; }
# After a failed check, the service's last words.
tell_journal() { journal | tail -n "${1:-8}" | sed 's/^/  journal: /'; }
finish() {
    echo "deb-test: $passes passed, $failures failed; guest uptime $(uptime_s) s, checks from $t0 s"
    if [ "$failures" -eq 0 ] && [ "$passes" -gt 0 ]; then status=0; else status=1; fi
    echo "DEB-TEST-EXIT=$status (run $NONCE)"
    exit "$status"
}

prefix=servogate/vm-cell
work=/run/servogate-test
mkdir -p "$work"
mqtt_log="$work/mqtt.log"
# Lines of the MQTT log after line $1 (a mark taken with `mark`).
mark() { wc -l <"$mqtt_log"; }
since_mark() { tail -n "+$(($1 + 1))" "$mqtt_log"; }
online_since() {   # online_since MARK DEVICE
    since_mark "$1" | grep -aq "^$prefix/devices/$2/availability .*\"state\":\"online\""
}

# write_config PORT: the test's config, two servosim axes on PORT, the local mosquitto.
write_config() {
    cat >/etc/servogate/servogate.toml <<EOF
# Written by hil/vm/deb-test-guest.sh: two servosim axes on $1, the local mosquitto.
[gateway]
id = "vm-cell"

[mqtt]
# A name, not an address: resolving it must work inside the unit's sandbox
# (RestrictAddressFamilies= without AF_NETLINK).
url = "mqtt://localhost:1883"

[buffer]
# Durable mode, in the unit's StateDirectory=.
path = "/var/lib/servogate/log"

[profiles.servosim-ax]
position    = { address = 0x0000, type = "i32", scale = 0.001, unit = "mm" }
velocity    = { address = 0x0002, type = "i32", scale = 0.001, unit = "mm/s" }
statusword  = { address = 0x0007, type = "u16" }
fault_code  = { address = 0x0008, type = "u16" }

[[buses]]
name = "rs485-a"
protocol = "modbus-rtu"
port = "$1"
baud = 115200
# The VM's CPU is emulated (slow) and the line is virtual: a generous timeout.
timeout = "500ms"

[[devices]]
name = "axis-1"
bus = "rs485-a"
unit = 1
profile = "servosim-ax"
poll = "100ms"
late_after = "1s"

[[devices]]
name = "axis-2"
bus = "rs485-a"
unit = 2
profile = "servosim-ax"
poll = "100ms"
late_after = "1s"
EOF
    if [ "${2:-}" = can ]; then
        cat >>/etc/servogate/servogate.toml <<EOF

# A CANopen bus on vcan0 with one CiA 402 drive that is not there (no simulator).
[[buses]]
name = "can-a"
protocol = "canopen"
interface = "vcan0"

[[devices]]
name = "axis-5"
bus = "can-a"
node = 5
profile = "cia402"
EOF
    fi
}

# --- the system ----------------------------------------------------------------------
echo    # the console may be in the middle of a line (firmware, kernel): start a fresh one
check "PID 1 is systemd ($(readlink /proc/1/exe))" [ "$(cat /proc/1/comm)" = systemd ]
state="$(timeout 120 systemctl is-system-running --wait 2>/dev/null || true)"
note "system $state at $(uptime_s) s; $(systemd-analyze time 2>/dev/null | head -1)"
[ "$state" = running ] || systemctl --failed --no-pager --plain --no-legend | sed 's/^/note: failed unit: /'
check "mosquitto (the Debian package) is active" wait_for 60 systemctl is-active --quiet mosquitto

# --- install -------------------------------------------------------------------------
t_dpkg=$(uptime_s)
if dpkg -i /mnt/payload/servogate.deb >"$work/dpkg.log" 2>&1; then
    pass "dpkg -i servogate.deb ($(awk -v a="$t_dpkg" -v b="$(uptime_s)" 'BEGIN { printf "%.0f", b - a }') s)"
else
    fail "dpkg -i servogate.deb"; sed 's/^/  dpkg: /' "$work/dpkg.log"; finish
fi
pw="$(getent passwd servogate || true)"
uid="$(echo "$pw" | cut -d: -f3)"
check "system user servogate exists, uid $uid < 1000, no login shell ($pw)" \
    sh -c "[ -n '$uid' ] && [ '$uid' -lt 1000 ] && echo '$pw' | grep -q ':/usr/sbin/nologin\$'"
check "group servogate exists" getent group servogate
check "servogate.service is enabled" [ "$(systemctl is-enabled servogate 2>&1)" = enabled ]
check "servogate.service is not started by the install" not systemctl is-active --quiet servogate
check "the shipped config is valid, read as user servogate" \
    sh -c "runuser -u servogate -- servogate check --config /etc/servogate/servogate.toml >/dev/null"
check "/etc/servogate/servogate.toml is a conffile" \
    sh -c "dpkg-query -W -f='\${Conffiles}' servogate | grep -q /etc/servogate/servogate.toml"

# The unedited config: the start is skipped by ExecCondition=, not failed.
systemctl start servogate 2>"$work/start0.err"; rc=$?
check "start with the unedited shipped config is skipped (rc $rc, Result=$(prop Result))" \
    sh -c "[ $rc -eq 0 ] && ! systemctl is-active --quiet servogate && ! systemctl is-failed --quiet servogate"
check "the journal says why it did not start" sh -c "journalctl -u servogate --no-pager -o cat | grep -q 'still the example'"
journal | grep 'still the example' | tail -1 | sed 's/^/  journal: /'

dropins=/etc/systemd/system/servogate.service.d
if [ "$DEB_TEST_NOTIFY" != 1 ]; then
    # Without READY=1 and WATCHDOG=1, Type=notify would time the start out and the
    # watchdog would kill the daemon: this drop-in runs the shipped unit as Type=simple.
    mkdir -p "$dropins"
    printf '[Service]\nType=simple\nWatchdogSec=0\n' >"$dropins/60-vm-test-no-notify.conf"
    systemctl daemon-reload
    note "DEB_TEST_NOTIFY=0: drop-in Type=simple, WatchdogSec=0"
fi

# Every message under the gateway's prefix, from here on. Appending (>>): the log is
# only read, never truncated, under a writer.
mosquitto_sub -h localhost -v -t "$prefix/#" >>"$mqtt_log" 2>"$work/mqtt.err" &
sub_pid=$!

# --- pty: servosim on one end of a socat pair ----------------------------------------
# The gateway's end belongs to servogate:dialout, as udev makes /dev/ttyUSB0
# root:dialout 0660 for SupplementaryGroups=dialout. No drop-in: DevicePolicy=closed
# keeps /dev/pts/* (char-pts) readable and writable by itself (systemd.resource-control).
socat pty,raw,echo=0,link="$work/sim" \
    pty,raw,echo=0,link="$work/gw",user=servogate,group=dialout,mode=660 2>"$work/socat.err" &
socat_pid=$!
check "socat pty pair is up" wait_for 20 sh -c "[ -L '$work/sim' ] && [ -L '$work/gw' ]"
note "gateway end $work/gw -> $(readlink "$work/gw")"
servosim modbus-rtu --port "$work/sim" --units 1-2 >"$work/servosim.out" 2>"$work/servosim.err" &
sim_pid=$!
check "servosim answers units 1-2 on the pty" wait_for 30 grep -q '^servosim ready' "$work/servosim.out"
write_config "$work/gw"
check "the test config is valid" sh -c "servogate check --config /etc/servogate/servogate.toml >/dev/null"

m=$(mark)
if systemctl start servogate 2>"$work/start.err"; then
    pass "systemctl start servogate"
else
    fail "systemctl start servogate: $(cat "$work/start.err")"; tell_journal
fi
check "MQTT: $prefix/devices/axis-1/availability is online (pty)" wait_for 90 online_since "$m" axis-1 \
    || tell_journal
check "MQTT: $prefix/devices/axis-2/availability is online (pty)" wait_for 30 online_since "$m" axis-2
check "MQTT: telemetry flows" wait_for 30 sh -c "tail -n +$((m + 1)) '$mqtt_log' | grep -aq '^$prefix/devices/axis-1/telemetry {\"boot_id\":\"[0-9a-f]*\",\"seq\"'"
check "/var/lib/servogate is the service's: $(stat -c '%U %a' /var/lib/servogate 2>&1)" \
    sh -c "[ \"\$(stat -c '%U %a' /var/lib/servogate)\" = 'servogate 700' ]"
check "the event log in /var/lib/servogate/log grows ($(ls /var/lib/servogate/log 2>&1 | tr '\n' ' '))" \
    wait_for 20 sh -c "[ \"\$(stat -c %s /var/lib/servogate/log/00000000000000000000.log 2>/dev/null || echo 0)\" -gt 8 ]"
since_mark "$m" | grep -a -m1 "^$prefix/devices/axis-1/telemetry" | cut -c1-160 | sed 's/^/  mqtt: /'
check "ActiveState=active ($(prop ActiveState)/$(prop SubState))" is_prop ActiveState active

pid="$(prop MainPID)"
st="/proc/$pid/status"
dialout="$(getent group dialout | cut -d: -f3)"
check "runs as user servogate ($(ps -o user= -p "$pid"))" [ "$(ps -o user= -p "$pid")" = servogate ]
check "with the dialout group ($(grep '^Groups:' "$st" | tr -s '\t ' ' '))" sh -c "grep '^Groups:' '$st' | grep -qw '$dialout'"
check "no capabilities (CapEff $(grep '^CapEff:' "$st" | cut -f2), CapBnd $(grep '^CapBnd:' "$st" | cut -f2))" \
    sh -c "grep -q '^CapEff:[[:space:]]*0000000000000000' '$st' && grep -q '^CapBnd:[[:space:]]*0000000000000000' '$st'"
check "NoNewPrivs and a seccomp filter" sh -c "grep -q '^NoNewPrivs:[[:space:]]*1' '$st' && grep -q '^Seccomp:[[:space:]]*2' '$st'"
# In the service's mount namespace even root cannot write /etc or /usr (EROFS).
check "/etc and /usr are read-only in its mount namespace (ProtectSystem=strict)" \
    not nsenter --mount="/proc/$pid/ns/mnt" -- sh -c "touch /etc/servogate/.w || touch /usr/.w" 2>/dev/null
if [ "$DEB_TEST_NOTIFY" = 1 ]; then
    check "Type=notify: the start waited for READY=1 (StatusText: $(prop StatusText))" is_prop ActiveState active
    wd0="$(prop WatchdogTimestampMonotonic)"
    check "WATCHDOG=1 pings arrive" wait_for 40 sh -c "[ \"\$(systemctl show -p WatchdogTimestampMonotonic --value servogate)\" != '$wd0' ]"
fi

# Clean stop.
m=$(mark)
if systemctl stop servogate; then pass "systemctl stop servogate"; else fail "systemctl stop servogate"; fi
check "stopped cleanly (ActiveState=$(prop ActiveState), Result=$(prop Result), exit status $(prop ExecMainStatus))" \
    sh -c "[ \"\$(systemctl show -p ActiveState --value servogate)\" = inactive ] && [ \"\$(systemctl show -p ExecMainStatus --value servogate)\" = 0 ]"
check "MQTT: $prefix/status says \"online\":false after the stop" \
    wait_for 20 sh -c "tail -n +$((m + 1)) '$mqtt_log' | grep -aq '^$prefix/status .*\"online\":false'"
since_mark "$m" | grep -a "^$prefix/status" | tail -1 | cut -c1-160 | sed 's/^/  mqtt: /'
kill "$sim_pid" "$socat_pid" 2>/dev/null

# --- policy: a device outside DeviceAllow= is refused ----------------------------------
# A node the file permissions would let servogate open (root:dialout 0660, on devtmpfs)
# but whose major (10, misc) no DeviceAllow= names: the open must fail with EPERM from
# the device cgroup.
mknod -m 660 /dev/servogate-test-misc c 10 200 && chgrp dialout /dev/servogate-test-misc
write_config /dev/servogate-test-misc
systemctl start --no-block servogate
check "DevicePolicy=closed refuses a device outside DeviceAllow= (EPERM)" \
    wait_for 60 sh -c "journalctl -u servogate --no-pager -o cat | grep 'cannot open port' | grep 'servogate-test-misc' | grep -qi 'not permitted'" \
    || tell_journal
journal | grep 'cannot open port' | tail -1 | cut -c1-200 | sed 's/^/  journal: /'
systemctl stop servogate
rm -f /dev/servogate-test-misc

# --- USB: a real /dev/ttyUSB0 --------------------------------------------------------
# qemu's usb-serial (an FTDI FT232 to the guest) and the guest's second UART ($SIM_UART) are
# the two ends of one virtual cable. udev makes /dev/ttyUSB0 root:dialout 0660, as for a
# real USB-RS485 adapter; the unit opens it through DeviceAllow=char-ttyUSB and dialout.
check "/dev/ttyUSB0 exists, root:dialout 0660 ($(stat -c '%U:%G %a' /dev/ttyUSB0 2>&1))" \
    wait_for 30 sh -c "[ \"\$(stat -c '%U:%G %a' /dev/ttyUSB0 2>/dev/null)\" = 'root:dialout 660' ]"
note "ttyUSB0 driver: $(basename "$(readlink -f /sys/class/tty/ttyUSB0/device/driver 2>/dev/null)" 2>/dev/null)"
servosim modbus-rtu --port "$SIM_UART" --units 1-2 >"$work/servosim-usb.out" 2>"$work/servosim-usb.err" &
sim_pid=$!
check "servosim answers units 1-2 on $SIM_UART" wait_for 30 grep -q '^servosim ready' "$work/servosim-usb.out" \
    || sed 's/^/  servosim: /' "$work/servosim-usb.err" | tail -3
write_config /dev/ttyUSB0
m=$(mark)
if systemctl start servogate 2>"$work/start-usb.err"; then
    pass "systemctl start servogate (port /dev/ttyUSB0, no drop-in for the device)"
else
    fail "systemctl start servogate (port /dev/ttyUSB0): $(cat "$work/start-usb.err")"
fi
check "MQTT: $prefix/devices/axis-1/availability is online (ttyUSB0)" wait_for 90 online_since "$m" axis-1 \
    || tell_journal
check "MQTT: $prefix/devices/axis-2/availability is online (ttyUSB0)" wait_for 30 online_since "$m" axis-2
# Restart on failure: SIGKILL is a crash. (On the USB port, not on the pty: a pty keeps
# the TIOCEXCL of a killed opener until both of its ends are closed, so a restarted
# servogate, without CAP_SYS_ADMIN, would get EBUSY while socat holds the other end; a
# serial device forgets it on the last close.)
m=$(mark)
restarts=$(($(prop NRestarts) + 1))
systemctl kill -s KILL servogate
check "a killed servogate is restarted by systemd (NRestarts=$restarts)" \
    wait_for 60 sh -c "[ \"\$(systemctl show -p NRestarts --value servogate)\" = $restarts ] && systemctl is-active --quiet servogate"
check "MQTT: after the restart axis-1 is online again" wait_for 90 online_since "$m" axis-1 || {
    tell_journal 12
    tail -n 3 "$work/servosim-usb.err" 2>&1 | sed 's/^/  log: /'
    since_mark "$m" | grep -av telemetry | tail -n 6 | cut -c1-160 | sed 's/^/  mqtt: /'
}

# --- operate: reload (SIGHUP through ExecReload=) and the metrics endpoint --------------
# The endpoint is switched on by a reload, which proves both: the reload applied a new
# [metrics] section, and the sandbox lets the daemon listen on loopback. The image has no
# curl: bash's /dev/tcp does the GET.
cat >/usr/local/bin/sg-scrape <<'EOF'
#!/bin/bash
exec 3<>/dev/tcp/127.0.0.1/9898 || exit 1
printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
sed '1,/^\r$/d' <&3
EOF
chmod 755 /usr/local/bin/sg-scrape
printf '\n[metrics]\nlisten = "127.0.0.1:9898"\n' >>/etc/servogate/servogate.toml
if systemctl reload servogate 2>"$work/reload.err"; then
    pass "systemctl reload servogate"
else
    fail "systemctl reload servogate: $(cat "$work/reload.err")"
fi
check "reload: the metrics endpoint comes up, the reload counted" \
    wait_for 30 sh -c "sg-scrape | grep -q '^servogate_reloads_total{result=\"ok\"} 1'" || tell_journal
check "metrics: axis-1 online, Modbus transactions and reply times counted" \
    sh -c "sg-scrape | grep -q '^servogate_device_online{device=\"axis-1\",bus=\"rs485-a\"} 1' && sg-scrape | grep -q '^servogate_modbus_reply_seconds_count{bus=\"rs485-a\"} [1-9]'"
check "metrics: connected to the broker" sh -c "sg-scrape | grep -q '^servogate_mqtt_connected 1'"
sg-scrape | grep -E '^servogate_(modbus_transactions_total|modbus_errors_total\{.*timeout|ring_events |mqtt_acks_total)' | sed 's/^/  metrics: /'
# A bad edit: the reload is refused, counted, logged with file, line and key, and the
# service goes on polling with the config it had.
sed -i '0,/^poll = "100ms"$/s//poll = "fast"/' /etc/servogate/servogate.toml
systemctl reload servogate 2>/dev/null || true
check "a bad edit: the reload is refused and counted" \
    wait_for 30 sh -c "sg-scrape | grep -q '^servogate_reloads_total{result=\"failed\"} 1'"
check "the journal names the file, line and key of the refused reload" \
    sh -c "journalctl -u servogate --no-pager -o cat | grep 'reload refused' | grep -q 'servogate.toml:[0-9]*:[0-9]*: devices\[0\].poll'"
journal | grep 'reload refused' | tail -1 | cut -c1-200 | sed 's/^/  journal: /'
m=$(mark)
check "and the service keeps running and publishing ($(prop ActiveState))" \
    wait_for 30 sh -c "systemctl is-active --quiet servogate && tail -n +$((m + 1)) '$mqtt_log' | grep -aq '^$prefix/devices/axis-1/telemetry'"

systemctl stop servogate

# --- CAN: a SocketCAN bus inside the sandbox ------------------------------------------
# RestrictAddressFamilies= allows AF_CAN and no AF_NETLINK: opening vcan0 and sending on
# it (NMT, SDO to the absent node 5) must work without either being refused.
if modprobe vcan && ip link add vcan0 type vcan && ip link set vcan0 up; then
    write_config /dev/ttyUSB0 can
    tx0=$(cat /sys/class/net/vcan0/statistics/tx_packets)
    m=$(mark)
    systemctl start servogate
    check "CAN: servogate opens vcan0 in its sandbox (journal: CAN interface open)" \
        wait_for 60 sh -c "journalctl -u servogate --no-pager -o cat | grep 'CAN interface open' | grep -q vcan0" \
        || tell_journal
    check "CAN: and sends frames on it (tx_packets $tx0 -> $(cat /sys/class/net/vcan0/statistics/tx_packets))" \
        wait_for 30 sh -c "[ \$(cat /sys/class/net/vcan0/statistics/tx_packets) -gt $tx0 ]"
    check "CAN: no address family refused" \
        not sh -c "journalctl -u servogate --no-pager -o cat | grep -qi 'address family not supported'"
    check "CAN: the Modbus bus polls beside it (axis-1 online)" wait_for 60 online_since "$m" axis-1
    systemctl stop servogate
else
    fail "CAN: cannot create vcan0 in the VM"
fi
kill "$sim_pid" 2>/dev/null

# --- a bad config fails the start before anything opens -------------------------------
sed -i 's/^unit = 2$/unit = 300/' /etc/servogate/servogate.toml
if systemctl start servogate 2>/dev/null; then
    fail "a bad config fails the start"
else
    pass "a bad config fails the start"
fi
note "after the failed start: $(prop ActiveState)/$(prop SubState), Result=$(prop Result)"
check "in ExecStartPre (servogate check), with file, line and key in the journal" \
    sh -c "journalctl -u servogate --no-pager -o cat | grep -q 'servogate.toml:[0-9]*:[0-9]*: devices\[1\].unit'"
journal | grep 'devices\[1\].unit' | tail -1 | sed 's/^/  journal: /'
systemctl stop servogate 2>/dev/null
systemctl reset-failed servogate 2>/dev/null

kill "$sub_pid" 2>/dev/null
finish
