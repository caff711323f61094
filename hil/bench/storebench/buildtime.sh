#!/bin/bash
cd /tmp/storebench
for f in sg redb fjall sqlite; do
  rm -rf /tmp/storebench/target-bt
  s=$(date +%s.%N)
  CARGO_TARGET_DIR=/tmp/storebench/target-bt nice -n 10 cargo build --release --bin only_a --no-default-features --features $f >/dev/null 2>&1
  e=$(date +%s.%N)
  echo "$f clean_release_build_s=$(echo "$e - $s" | bc)"
done
rm -rf /tmp/storebench/target-bt
