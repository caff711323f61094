#!/bin/bash
# Runs every engine and case; appends key=value lines to results/raw.log.
set -u
cd /tmp/storebench
B=./target/release/storebench
OUT=results/raw.log
mkdir -p results data
ENGINES=${ENGINES:-"sg redb redb-small fjall fjall-small fjall-insert sqlite"}
REPS=${REPS:-"1 2"}
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
sect() { awk '{print $7}' /sys/block/vda/stat; }
w() { # tag, then the command: a write case, with the bytes the device wrote for it (after a sync)
  local tag=$1; shift
  local s0 s1 line; s0=$(sect)
  line=$(nice -n 10 "$@" 2>&1 | tail -1); sync; s1=$(sect)
  echo "rep=$rep tag=$tag $line dev_write_bytes=$(( (s1-s0)*512 ))" | tee -a $OUT
}
r() { # tag, then the command
  local tag=$1; shift
  local line; line=$(nice -n 10 "$@" 2>&1 | tail -1)
  echo "rep=$rep tag=$tag $line" | tee -a $OUT
}
for rep in $REPS; do
  for e in $ENGINES; do
    d=data/$e
    rm -rf $d; drop
    s0=$(sect)
    line=$(nice -n 10 /usr/bin/time -f "time_maxrss_kib=%M time_wall=%e time_user=%U time_sys=%S" $B $e A $d 2>results/time.tmp | tail -1)
    sync; s1=$(sect)
    echo "rep=$rep tag=A $line $(cat results/time.tmp | tail -1) dev_write_bytes=$(( (s1-s0)*512 ))" | tee -a $OUT
    echo "rep=$rep tag=du engine=$e du_kib=$(du -sk $d | cut -f1) apparent_bytes=$(du -sb $d | cut -f1) files=$(find $d -type f | wc -l)" | tee -a $OUT
    r E-warm $B $e E $d
    r D-warm $B $e D $d
    drop; r D-cold $B $e D $d
    drop; r E-cold $B $e E $d
    rm -rf $d; drop
    r A-crash $B $e A $d --crash
    echo "rep=$rep tag=du-crash engine=$e du_kib=$(du -sk $d | cut -f1) apparent_bytes=$(du -sb $d | cut -f1) files=$(find $d -type f | wc -l)" | tee -a $OUT
    r E-after-crash $B $e E $d
    r E-after-crash-2 $B $e E $d
    rm -rf $d; drop; w B $B $e B $d
    rm -rf $d; drop; w C $B $e C $d
    rm -rf $d
  done
done
