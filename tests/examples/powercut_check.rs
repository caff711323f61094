//! Checks one round of `scripts/vm/powercut.sh`: BOOT1 (the first boot's console) holds
//! `PUB <topic> <payload>` lines, every telemetry event the broker got before qemu was
//! killed; RECOVERED is what the event log held after the cut (`servogate log` JSON
//! lines, written on the disk by the second boot).
//!
//! Passes when every recovered line is whole JSON, each device's seq is unbroken and
//! increasing (nothing reordered, nothing in between missing), and every event published
//! but not recovered was acquired within the last moments before the cut: at most
//! `sync_interval` plus one fsync's time (the bound printed) before the newest published.
//!
//!     powercut_check BOOT1.log RECOVERED.jsonl

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::SystemTime;

use serde_json::Value;

/// sync_interval of the test's config.
const SYNC_INTERVAL_MS: f64 = 10.0;
/// What one fsync may take on the emulated disk, on top: generous for TCG (measured
/// figures are printed, and BENCHMARKS.md has them).
const FSYNC_ALLOWANCE_MS: f64 = 250.0;

fn ts(v: &Value) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(v["ts"].as_str()?).ok()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: powercut_check BOOT1.log RECOVERED.jsonl");
        return ExitCode::from(2);
    }
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let (boot1, recovered) = (read(&args[1]), read(&args[2]));
    let mut fail = Vec::new();
    // Published before the cut: (device, payload).
    let mut published: Vec<(String, Value)> = Vec::new();
    for l in boot1.lines() {
        let Some(rest) = l.strip_prefix("PUB ") else {
            continue;
        };
        let Some((topic, p)) = rest.split_once(' ') else {
            continue;
        };
        let device = topic.rsplit('/').nth(1).unwrap_or("?").to_owned();
        // The console may cut the very last line at the kill.
        if let Ok(v) = serde_json::from_str::<Value>(p) {
            published.push((device, v));
        }
    }
    let mut logged: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut logged_keys: BTreeSet<(String, String, u64)> = BTreeSet::new();
    let mut lines = 0;
    for j in recovered.lines() {
        lines += 1;
        match serde_json::from_str::<Value>(j) {
            Ok(v) => {
                let dev = v["device"].as_str().unwrap_or("?").to_owned();
                let seq = v["seq"].as_u64().unwrap_or(0);
                logged_keys.insert((
                    dev.clone(),
                    v["boot_id"].as_str().unwrap_or("").to_owned(),
                    seq,
                ));
                logged.entry(dev).or_default().push(seq);
            }
            Err(e) => fail.push(format!("a recovered line is not whole JSON ({e}): {j}")),
        }
    }
    for (dev, seqs) in &logged {
        if let Some(w) = seqs.windows(2).find(|w| w[1] != w[0] + 1) {
            fail.push(format!(
                "{dev}: seq {} then {} in the recovered log",
                w[0], w[1]
            ));
        }
    }
    // Published and not recovered: how far before the newest published event.
    let newest = published.iter().filter_map(|(_, v)| ts(v)).max();
    let lost: Vec<&Value> = published
        .iter()
        .filter(|(dev, v)| {
            let boot = v["boot_id"].as_str().unwrap_or("").to_owned();
            !logged_keys.contains(&(dev.clone(), boot, v["seq"].as_u64().unwrap_or(0)))
        })
        .map(|(_, v)| v)
        .collect();
    let mut window_ms = 0.0f64;
    if let Some(newest) = newest {
        for v in &lost {
            if let Some(t) = ts(v) {
                let ms = newest
                    .duration_since(t)
                    .map_or(0.0, |d| d.as_secs_f64() * 1e3);
                window_ms = window_ms.max(ms);
            }
        }
    }
    let bound = SYNC_INTERVAL_MS + FSYNC_ALLOWANCE_MS;
    if window_ms > bound {
        fail.push(format!(
            "events published up to {window_ms:.1} ms before the newest were lost (bound {bound} ms)"
        ));
    }
    println!(
        "powercut_check: {} events published before the cut, {lines} recovered ({} devices), \
         {} published and lost, from the last {window_ms:.1} ms before the newest published",
        published.len(),
        logged.len(),
        lost.len()
    );
    if published.is_empty() || lines == 0 {
        fail.push("nothing was published or nothing recovered: the test did not run".into());
    }
    for f in &fail {
        eprintln!("powercut_check: FAIL: {f}");
    }
    if fail.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
