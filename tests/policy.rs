//! Policy plugins end to end in process: the official plugins built from source and loaded into
//! the wasmtime host, refused uploads, hostile plugins contained at call time, quarantine,
//! fail-closed slots, exact replay, hot swap under concurrent calls, restart and the drop folder;
//! and the property that every settlement conserves money and replays from its ledger entry.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::{plugin_wasm, temp_dir};
use openlora::error::{Error, PolicyError, SubmitError};
use openlora::ledger::Replay;
use openlora::metrics::Metrics;
use openlora::policy::dropdir::scan;
use openlora::policy::{OnFailure, PolicyConfig, PolicyHost, Slot, SlotConfig};
use openlora_sdk::{Money, RequestInfo, Usage};

/// Each plugin is built once per test process.
fn wasm(package: &str) -> Vec<u8> {
    static CACHE: OnceLock<std::sync::Mutex<HashMap<String, Vec<u8>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(b) = cache.lock().unwrap().get(package) {
        return b.clone();
    }
    let bytes = plugin_wasm(package);
    cache.lock().unwrap().insert(package.to_string(), bytes.clone());
    bytes
}

fn host(config: PolicyConfig) -> PolicyHost {
    PolicyHost::new(&config, None, Metrics::new().policy).expect("policy host")
}

fn request(id: &str) -> RequestInfo {
    RequestInfo {
        request_id: id.into(),
        tenant: "acme".into(),
        requested_model: "startrek".into(),
        adapter: Some("startrek".into()),
        adapter_owner: Some("trekkie".into()),
        prompt_tokens: 1234,
        max_tokens: 64,
        metadata: vec![],
        received_at_ms: 1_790_000_000_000,
    }
}

fn usage() -> Usage {
    Usage {
        prompt_tokens: 1234,
        completion_tokens: 57,
        queue_ms: 2,
        compute_ms: 31,
        adapter_load_ms: 1,
        steps: 58,
        batch_share_ppm: 4_000_000,
        adapter_contribution_ppm: 123_457,
    }
}

fn exists(name: &str) -> bool {
    ["startrek", "computers", "love"].contains(&name)
}

/// Two separate hosts with the hostile attributor in `mode`: a first run and a replay.
fn twin_hosts(mode: &str) -> (PolicyHost, PolicyHost) {
    let config = format!(r#"{{"mode": "{mode}"}}"#);
    let install = || {
        let h = host(PolicyConfig::default());
        h.install(&Slot::Attributor, &wasm("openlora-test-hostile"), &config, "test").unwrap();
        h
    };
    (install(), install())
}

fn with_mode(id: &str, mode: &str) -> RequestInfo {
    let mut r = request(id);
    r.metadata.push(("hostile-mode".into(), mode.into()));
    r
}

#[test]
fn official_plugins_in_wasm_decide_exactly_like_the_builtins() {
    let builtin = host(PolicyConfig::default());
    let plugged = host(PolicyConfig::default());
    plugged.install(&Slot::Router, &wasm("openlora-plugin-router"), "", "test").unwrap();
    plugged.install(&Slot::Pricer, &wasm("openlora-plugin-token-pricer"), "", "test").unwrap();
    plugged.install(&Slot::Attributor, &wasm("openlora-plugin-proportional-attributor"), "", "test").unwrap();
    for i in 0..20 {
        let mut r = request(&format!("req-{i}"));
        if i % 3 == 0 {
            r.adapter = None;
            r.adapter_owner = None;
        }
        let mut u = usage();
        u.completion_tokens += i * 13;
        u.adapter_contribution_ppm = (i * 49_999) % 1_000_000;
        let (a, b) = (builtin.route(&r, &exists).unwrap(), plugged.route(&r, &exists).unwrap());
        assert_eq!((a.adapter, a.priority), (b.adapter, b.priority));
        assert!(a.by.plugin.starts_with("builtin:router@"), "{:?}", a.by);
        assert!(b.by.plugin.starts_with("sha256:") && b.by.failure.is_none(), "{:?}", b.by);
        let (x, y) = (builtin.settle(&r, &u).unwrap(), plugged.settle(&r, &u).unwrap());
        assert_eq!((&x.charge, &x.splits), (&y.charge, &y.splits), "request {i}");
        assert_eq!(y.charge.amount, 123_400 + 17_100 + 3_900 * u64::from(i), "0.1/1k prompt + 0.3/1k completion");
        assert!(y.deciders.iter().all(|d| d.plugin.starts_with("sha256:") && d.fuel > 0), "{:?}", y.deciders);
    }
}

#[test]
fn an_adapter_owner_attributor_splits_the_owner_share_among_contributors() {
    let host = host(PolicyConfig::default());
    let cfg = r#"{"owner_keeps_ppm": 250000, "contributors": {"ann": 2, "bo": 1}}"#;
    let slot = Slot::Adapter("startrek".into());
    host.install(&slot, &wasm("openlora-plugin-contributor-attributor"), cfg, "test").unwrap();
    let s = host.settle(&request("r1"), &usage()).unwrap();
    let total: u64 = s.splits.iter().map(|s| s.amount).sum();
    assert_eq!(total, s.charge.amount);
    let payees: Vec<&str> = s.splits.iter().map(|s| s.payee.as_str()).collect();
    assert_eq!(payees, ["operator:openlora", "base:openlora", "owner:trekkie", "contributor:ann", "contributor:bo"]);
    assert_eq!(s.deciders.len(), 3);
    assert_eq!(s.deciders[2].slot, "adapter:startrek");
    // Another adapter's requests are untouched by it.
    let mut other = request("r2");
    other.adapter = Some("love".into());
    other.adapter_owner = Some("poet".into());
    assert_eq!(host.settle(&other, &usage()).unwrap().splits.len(), 3);
}

/// The slot rules the SDK's README states ("Slots"): an adapter slot's attributor is given the
/// owner's share, is called only when the operator's attributor paid the owner's account, and on
/// failure leaves the share undivided.
#[test]
fn the_slot_rules_the_sdk_states_hold() {
    let slot = Slot::Adapter("startrek".into());
    let plain = host(PolicyConfig::default()).settle(&request("r"), &usage()).unwrap();
    let share = plain.splits.iter().find(|s| s.payee == "owner:trekkie").expect("the owner is paid").amount;
    let divided = host(PolicyConfig::default());
    let cfg = r#"{"owner_keeps_ppm": 0, "contributors": {"ann": 1}}"#;
    divided.install(&slot, &wasm("openlora-plugin-contributor-attributor"), cfg, "test").unwrap();
    let s = divided.settle(&request("r"), &usage()).unwrap();
    let ann = s.splits.iter().find(|x| x.payee == "contributor:ann").expect("divided").amount;
    assert_eq!(ann, share, "given the owner's share, not the charge {}", s.charge.amount);
    assert_eq!(s.owner_share.as_ref().map(|o| (o.amount, o.count)), Some((share, 2)));
    // A failing owner's attributor: the share stays one split to the owner.
    let failing = host(PolicyConfig::default());
    failing.install(&slot, &wasm("openlora-test-hostile"), r#"{"mode": "ok"}"#, "test").unwrap();
    let f = failing.settle(&with_mode("boom", "panic"), &usage()).unwrap();
    assert_eq!(f.splits, plain.splits);
    let by = f.deciders.last().unwrap();
    assert!(by.plugin.starts_with("builtin:owner-keeps-share@") && by.failure.is_some(), "{by:?}");
    // An operator's attributor that pays the owner nothing: the owner's is not called.
    divided.install(&Slot::Attributor, &wasm("openlora-test-hostile"), r#"{"mode": "ok"}"#, "test").unwrap();
    let unpaid = divided.settle(&request("fine"), &usage()).unwrap();
    assert!(unpaid.deciders.iter().all(|d| d.slot != "adapter:startrek"), "{:?}", unpaid.deciders);
    assert!(unpaid.owner_share.is_none());
}

fn refused(host: &PolicyHost, slot: &Slot, bytes: &[u8], config: &str) -> String {
    match host.install(slot, bytes, config, "test") {
        Err(Error::Policy(PolicyError::PluginInvalid { message, .. })) => message,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn bad_uploads_are_refused_with_a_reason_and_change_nothing() {
    let mut limits = PolicyConfig::default();
    limits.max_plugin_bytes = 400_000;
    let host = host(limits);
    let good = wasm("openlora-plugin-proportional-attributor");
    let v1 = host.install(&Slot::Attributor, &good, "", "test").unwrap();
    let core = wat::parse_str(r#"(module (func (export "attribute") (result i32) i32.const 0))"#).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str, Slot, &str)> = vec![
        ("core module", core, "", Slot::Attributor, "core wasm module"),
        ("truncated", good[..good.len() / 2].to_vec(), "", Slot::Attributor, "does not compile"),
        ("not wasm", b"#!/bin/sh\nrm -rf /\n".to_vec(), "", Slot::Attributor, "not a WebAssembly file"),
        ("filesystem", wasm("openlora-test-fs-reader"), "", Slot::Attributor, "wasi:filesystem"),
        (
            "wrong world",
            wasm("openlora-plugin-router"),
            "",
            Slot::Attributor,
            "does not export openlora:policy/attribution",
        ),
        ("too large", vec![0u8; 400_001], "", Slot::Attributor, "more than the limit"),
        ("bad config", good.clone(), r#"{"operator_ppm": 7000000}"#, Slot::Attributor, "configuration refused"),
        ("unknown config field", good.clone(), r#"{"operatr": "x"}"#, Slot::Attributor, "unknown field"),
        (
            "missing config",
            wasm("openlora-plugin-contributor-attributor"),
            "",
            Slot::Adapter("love".into()),
            "contributors",
        ),
    ];
    for (what, bytes, config, slot, expect) in cases {
        let message = refused(&host, &slot, &bytes, config);
        assert!(message.contains(expect), "{what}: {message}");
    }
    let views = host.list();
    assert_eq!(views.len(), 1, "only the good upload's slot exists: {views:?}");
    assert_eq!((views[0].active, views[0].versions.len()), (Some(v1.version), 1));
    assert!(host.settle(&request("after"), &usage()).unwrap().deciders[1].failure.is_none());
}

#[test]
fn hostile_plugins_are_contained_at_call_time_and_the_builtin_answers() {
    let mut limits = PolicyConfig::default();
    limits.quarantine_after = 1000;
    limits.quarantine_rate_percent = 0;
    let host = host(limits);
    host.install(&Slot::Attributor, &wasm("openlora-test-hostile"), r#"{"mode": "ok"}"#, "test").unwrap();
    let expected = host_builtin_splits();
    let cases = [
        ("loop", "fuel"),
        ("memory", "memory"),
        ("recursion", "stack"),
        ("output", "output"),
        ("huge-result", ""),
        ("off-by-one", "invalid: splits sum to"),
        ("overflow", "invalid: splits: amounts overflow"),
        ("panic", "trap"),
        ("error", "declined: declined on purpose"),
    ];
    for (mode, kind) in cases {
        let start = Instant::now();
        let s = host.settle(&with_mode(mode, mode), &usage()).unwrap_or_else(|e| panic!("{mode}: {e}"));
        let failure = s.deciders[1].failure.clone().unwrap_or_else(|| panic!("{mode}: no failure recorded"));
        assert!(failure.contains(kind), "{mode}: {failure}");
        assert!(s.deciders[1].plugin.starts_with("builtin:attributor@"), "{mode}");
        assert_eq!(s.splits, expected, "{mode}: the built-in's splits");
        assert!(start.elapsed() < Duration::from_secs(5), "{mode} took {:?}", start.elapsed());
    }
    // Log spam is bounded, not a failure; and the plugin still answers well-formed requests.
    let spam = host.settle(&with_mode("spam", "log-spam"), &usage()).unwrap();
    assert!(spam.deciders[1].failure.is_none());
    let ok = host.settle(&request("fine"), &usage()).unwrap();
    assert_eq!(ok.splits.len(), 1);
    assert_eq!(ok.splits[0].payee, "operator:hostile");
}

fn host_builtin_splits() -> Vec<openlora_sdk::Split> {
    host(PolicyConfig::default()).settle(&request("x"), &usage()).unwrap().splits
}

#[test]
fn a_deadline_stops_a_plugin_that_still_has_fuel() {
    let mut limits = PolicyConfig::default();
    limits.fuel = u64::MAX / 4;
    limits.deadline_ms = 30;
    let host = host(limits);
    host.install(&Slot::Attributor, &wasm("openlora-test-hostile"), "", "test").unwrap();
    let start = Instant::now();
    let s = host.settle(&with_mode("d", "loop"), &usage()).unwrap();
    let failure = s.deciders[1].failure.clone().unwrap();
    assert!(failure.contains("deadline of 30 ms"), "{failure}");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) }, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only
    // read and write the set passed by reference.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0, "pinning");
    }
}

/// The first CPU the calling thread may run on.
fn first_allowed_cpu() -> usize {
    // SAFETY: as in `pin_to`; sched_getaffinity writes the set passed by reference.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set), 0);
        (0..libc::CPU_SETSIZE as usize).find(|&c| libc::CPU_ISSET(c, &set)).expect("an allowed CPU")
    }
}

/// A deadline counts the CPU time a plugin uses, not the wall time its call takes: an honest
/// plugin whose thread has to share its core (a busy or stalled machine) is not failed for it.
#[test]
fn a_deadline_counts_the_plugins_cpu_time_not_a_busy_machine() {
    let limits = PolicyConfig {
        fuel: u64::MAX / 4,
        quarantine_after: 1000,
        quarantine_rate_percent: 0,
        ..PolicyConfig::default()
    };
    let bytes = wasm("openlora-test-hostile");
    let spin = |iterations: u64| {
        let mut r = with_mode("spin", "spin");
        r.metadata.push(("spin-iterations".into(), iterations.to_string()));
        r
    };
    let run = |host: &PolicyHost, iterations: u64| {
        let (cpu, wall) = (thread_cpu(), Instant::now());
        let s = host.settle(&spin(iterations), &usage()).unwrap();
        (s.deciders[1].failure.clone(), thread_cpu() - cpu, wall.elapsed())
    };
    // Work that takes about 30 ms of CPU time alone.
    let calibrate = host(PolicyConfig { deadline_ms: 60_000, ..limits.clone() });
    calibrate.install(&Slot::Attributor, &bytes, "", "test").unwrap();
    let mut iterations = 1 << 20;
    let cpu = loop {
        let (failure, cpu, _) = run(&calibrate, iterations);
        assert_eq!(failure, None);
        if cpu >= Duration::from_millis(30) {
            break cpu;
        }
        iterations *= 2;
    };
    // A deadline of 1.5 times that CPU time, and the core shared with three spinning threads:
    // the call takes several deadlines of wall time (under ten, the backstop) and passes.
    let deadline = cpu * 3 / 2;
    let host = host(PolicyConfig { deadline_ms: deadline.as_millis() as u64, ..limits.clone() });
    host.install(&Slot::Attributor, &bytes, "", "test").unwrap();
    assert_eq!(run(&host, iterations).0, None, "alone");
    let core = first_allowed_cpu();
    let stop = Arc::new(AtomicBool::new(false));
    let spinners: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin_to(core);
                while !stop.load(Ordering::Relaxed) {
                    std::hint::black_box(0u64);
                }
            })
        })
        .collect();
    pin_to(core);
    let (failure, _, wall) = run(&host, iterations);
    stop.store(true, Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
    assert!(wall > Duration::from_millis(deadline.as_millis() as u64), "the core was shared: {wall:?} vs {deadline:?}");
    assert_eq!(failure, None, "{wall:?} of wall time for a deadline of {deadline:?}");
}

/// Sleeping is free and blocks nothing: virtual time moves to the timer at once, so a call
/// that sleeps 3 s (or 584 years) answers within its deadline (100 ms + 20 ms), correctly.
#[test]
fn a_plugin_that_sleeps_answers_at_once_within_its_deadline() {
    let limits = PolicyConfig { quarantine_rate_percent: 0, ..PolicyConfig::default() };
    let host = host(limits.clone());
    host.install(&Slot::Attributor, &wasm("openlora-test-hostile"), r#"{"mode": "ok"}"#, "test").unwrap();
    for mode in ["sleep", "sleep-forever"] {
        let start = Instant::now();
        let s = host.settle(&with_mode(mode, mode), &usage()).unwrap();
        let took = start.elapsed();
        assert!(took < Duration::from_millis(limits.deadline_ms + 20), "{mode} took {took:?}");
        assert!(s.deciders[1].failure.is_none(), "{mode}: {:?}", s.deciders[1].failure);
        assert!(s.deciders[1].plugin.starts_with("sha256:"), "{mode}: the plugin answered");
        assert_eq!(s.splits[0].payee, "operator:hostile");
    }
}

/// What a plugin measures of time is virtual: the same request gives the same splits, on this
/// host and on a fresh one, however long the host really took.
#[test]
fn what_a_plugin_measures_of_time_replays_exactly() {
    let (a, b) = twin_hosts("timing");
    for i in 0..5 {
        let r = request(&format!("timing-{i}"));
        let first = a.settle(&r, &usage()).unwrap();
        assert!(first.deciders[1].failure.is_none(), "{:?}", first.deciders[1].failure);
        std::thread::sleep(Duration::from_millis(3));
        assert_eq!(a.settle(&r, &usage()).unwrap().splits, first.splits, "again on the same host");
        assert_eq!(b.settle(&r, &usage()).unwrap().splits, first.splits, "on a fresh host");
    }
}

/// A plugin cannot count real time by polling a timer (the count is the same on every run and
/// on a fresh host), and cannot make the host generate 64 MiB of randomness: it traps at once.
#[test]
fn polling_a_timer_replays_exactly_and_a_randomness_flood_traps_at_once() {
    let limits = PolicyConfig { quarantine_after: 1000, quarantine_rate_percent: 0, ..PolicyConfig::default() };
    let bytes = wasm("openlora-test-hostile");
    let (a, b) = (host(limits.clone()), host(limits.clone()));
    a.install(&Slot::Attributor, &bytes, r#"{"mode": "poll-count"}"#, "test").unwrap();
    b.install(&Slot::Attributor, &bytes, r#"{"mode": "poll-count"}"#, "test").unwrap();
    let r = request("polls");
    let first = a.settle(&r, &usage()).unwrap();
    assert!(first.deciders[1].failure.is_none(), "{:?}", first.deciders[1].failure);
    for _ in 0..3 {
        assert_eq!(a.settle(&r, &usage()).unwrap().splits, first.splits);
        assert_eq!(b.settle(&r, &usage()).unwrap().splits, first.splits);
    }
    let start = Instant::now();
    let s = a.settle(&with_mode("flood", "random-flood"), &usage()).unwrap();
    let took = start.elapsed();
    let failure = s.deciders[1].failure.clone().expect("refused");
    assert!(failure.contains("random bytes"), "{failure}");
    assert!(took < Duration::from_millis(limits.deadline_ms + 20), "took {took:?}");
}

/// A plugin failing only on some requests (every third) is quarantined by its failure rate,
/// though it never fails three times in a row.
#[test]
fn a_plugin_failing_on_a_fraction_of_requests_is_quarantined() {
    let limits = PolicyConfig { quarantine_after: 3, quarantine_rate_percent: 20, ..PolicyConfig::default() };
    let host = host(limits);
    // It stalls (until its deadline) only on requests whose id ends in an odd digit.
    host.install(&Slot::Attributor, &wasm("openlora-test-hostile"), r#"{"mode": "odd-stall"}"#, "test").unwrap();
    let mut quarantined_at = None;
    for i in 0..60 {
        let r = request(&format!("f{i}"));
        host.settle(&r, &usage()).unwrap();
        if host.list()[0].quarantined {
            quarantined_at = Some(i);
            break;
        }
    }
    let at = quarantined_at.expect("quarantined by its failure rate");
    assert!((19..=30).contains(&at), "quarantined after {at} calls");
    assert!(host.list()[0].consecutive_failures < 3);
}

/// A plugin's own strings are bounded before the host copies them: an 8 MB error is refused by
/// size, and the failure kept (in responses and the ledger) is at most 1 KiB; a failed call's
/// log lines (a panic's message) are kept with the failure.
#[test]
fn plugin_strings_are_bounded_and_a_failed_calls_logs_are_kept() {
    let limits = PolicyConfig { quarantine_after: 1000, quarantine_rate_percent: 0, ..PolicyConfig::default() };
    let host = host(limits);
    host.install(&Slot::Attributor, &wasm("openlora-test-hostile"), r#"{"mode": "ok"}"#, "test").unwrap();
    let start = Instant::now();
    let s = host.settle(&with_mode("huge", "huge-error"), &usage()).unwrap();
    let failure = s.deciders[1].failure.clone().unwrap();
    assert!(failure.contains("more than 262144 bytes"), "{}", &failure[..failure.len().min(300)]);
    assert!(failure.len() < 1200, "{} bytes kept", failure.len());
    assert!(start.elapsed() < Duration::from_millis(500), "{:?}", start.elapsed());
    let plugin = host.active(&Slot::Attributor).unwrap().plugin.clone();
    let charge = Money::new(1000, "USD");
    let panicked = plugin.attribute(&with_mode("p", "panic"), &usage(), &charge).err().expect("fails");
    assert!(
        panicked.logs.iter().any(|(_, l)| l.contains("panicked on purpose")),
        "the panic's message is kept: {:?}",
        panicked.logs
    );
}

#[test]
fn repeated_failures_quarantine_a_plugin_and_fail_closed_slots_refuse() {
    let mut limits = PolicyConfig::default();
    limits.quarantine_after = 3;
    let host = host(limits.clone());
    let v = host.install(&Slot::Attributor, &wasm("openlora-test-hostile"), r#"{"mode": "panic"}"#, "test").unwrap();
    for i in 0..3 {
        assert!(host.settle(&request(&format!("q{i}")), &usage()).unwrap().deciders[1].failure.is_some());
    }
    let view = host.list().remove(0);
    assert!(view.quarantined && view.consecutive_failures == 3, "{view:?}");
    let s = host.settle(&request("q4"), &usage()).unwrap();
    assert!(s.deciders[1].failure.as_deref().unwrap().contains("quarantined"));
    // Re-activating (or uploading a fix) lifts the quarantine.
    host.activate(&Slot::Attributor, v.version).unwrap();
    assert!(!host.list()[0].quarantined);

    limits.slots.insert("attributor".into(), SlotConfig { on_failure: OnFailure::Reject, builtin: None });
    let closed = self::host(limits);
    closed.install(&Slot::Attributor, &wasm("openlora-test-hostile"), r#"{"mode": "off-by-one"}"#, "test").unwrap();
    match closed.settle(&request("c"), &usage()) {
        Err(Error::Policy(PolicyError::Failed { slot, message })) => {
            assert!(slot == "attributor" && message.contains("sum"), "{message}")
        }
        other => panic!("expected the fail-closed slot to refuse, got {other:?}"),
    }
}

#[test]
fn decisions_replay_exactly_on_a_fresh_host() {
    let (a, b) = twin_hosts("entropy");
    let mut distinct = std::collections::BTreeSet::new();
    for i in 0..12 {
        let mut r = request(&format!("replay-{i}"));
        r.received_at_ms += i * 7919;
        let first = a.settle(&r, &usage()).unwrap();
        assert!(first.deciders[1].failure.is_none(), "{:?}", first.deciders[1]);
        assert_eq!(first, a.settle(&r, &usage()).unwrap(), "same host, same request");
        assert_eq!(first, b.settle(&r, &usage()).unwrap(), "fresh host, same request");
        distinct.insert(first.splits[0].amount);
    }
    assert!(distinct.len() > 1, "clock and randomness follow the request: {distinct:?}");
}

#[test]
fn hot_swap_under_concurrent_calls_records_the_version_that_ran() {
    let host = Arc::new(host(PolicyConfig::default()));
    let bytes = wasm("openlora-plugin-proportional-attributor");
    let v1 = host.install(&Slot::Attributor, &bytes, r#"{"operator": "operator:v1"}"#, "test").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let (host, stop) = (host.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) || i < 20 {
                    let s = host.settle(&request(&format!("t{t}-{i}")), &usage()).expect("settle");
                    let d = &s.deciders[1];
                    assert!(d.failure.is_none(), "{d:?}");
                    seen.push((d.version, s.splits[0].payee.clone()));
                    i += 1;
                }
                seen
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let v2 = host.install(&Slot::Attributor, &bytes, r#"{"operator": "operator:v2"}"#, "test").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(host.rollback(&Slot::Attributor).unwrap().unwrap().version, v1.version);
    std::thread::sleep(Duration::from_millis(100));
    host.activate(&Slot::Attributor, v2.version).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(host.rollback(&Slot::Attributor).unwrap().unwrap().version, v1.version);
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let mut versions = std::collections::BTreeSet::new();
    for w in workers {
        for (version, payee) in w.join().expect("worker") {
            let version = version.expect("a plugin answered");
            assert_eq!(payee, format!("operator:v{version}"), "the recorded version is the one that ran");
            versions.insert(version);
        }
    }
    assert_eq!(versions.into_iter().collect::<Vec<_>>(), vec![v1.version, v2.version]);
}

#[test]
fn plugins_survive_a_restart_and_load_from_the_drop_folder() {
    let root = temp_dir("plugins");
    let bytes = wasm("openlora-plugin-token-pricer");
    let cfg = r#"{"currency": "EUR"}"#;
    let sha = {
        let first = PolicyHost::new(&PolicyConfig::default(), Some(root.clone()), Metrics::new().policy).unwrap();
        first.install(&Slot::Pricer, &bytes, cfg, "test").unwrap().sha256
    };
    let second = PolicyHost::new(&PolicyConfig::default(), Some(root.clone()), Metrics::new().policy).unwrap();
    let s = second.settle(&request("restart"), &usage()).unwrap();
    assert_eq!(s.charge.currency, "EUR");
    assert_eq!(s.deciders[0].plugin, format!("sha256:{sha}"));
    assert_eq!(second.blob(&sha).as_deref(), Some(&bytes[..]), "stored content-addressed for replay");

    let drop = root.join("drop");
    std::fs::create_dir_all(&drop).unwrap();
    std::fs::write(drop.join("router.wasm"), wasm("openlora-plugin-router")).unwrap();
    std::fs::write(drop.join("router.json"), r#"{"aliases": {"trek": "startrek"}}"#).unwrap();
    std::fs::write(drop.join("attributor.wasm"), &bytes[..1000]).unwrap();
    let mut seen = HashMap::new();
    let report = scan(&second, &drop, &mut seen).join("\n");
    assert!(report.contains("slot router now runs version 1"), "{report}");
    assert!(report.contains("attributor.wasm: not loaded, slot attributor unchanged"), "{report}");
    assert!(scan(&second, &drop, &mut seen).is_empty(), "unchanged files are not reloaded");
    let mut r = request("alias");
    r.adapter = Some("trek".into());
    assert_eq!(second.route(&r, &exists).unwrap().adapter.as_deref(), Some("startrek"));
    assert!(!second.is_active(&Slot::Attributor));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn routing_rejections_and_unknown_adapters_are_client_errors_not_plugin_failures() {
    let host = host(PolicyConfig::default());
    let cfg = r#"{"tenants": {"acme": {"allow": ["love"]}}, "aliases": {"gone": "deleted-adapter"}}"#;
    host.install(&Slot::Router, &wasm("openlora-plugin-router"), cfg, "test").unwrap();
    assert!(
        matches!(host.route(&request("a"), &exists), Err(Error::Policy(PolicyError::Rejected(m))) if m.contains("startrek"))
    );
    let mut unknown = request("b");
    unknown.tenant = "other".into();
    unknown.adapter = Some("nope".into());
    assert!(matches!(host.route(&unknown, &exists), Err(Error::Submit(SubmitError::UnknownAdapter(n))) if n == "nope"));
    assert_eq!(host.list()[0].consecutive_failures, 0, "client mistakes do not count against the plugin");
    // Routing somewhere that does not exist is the plugin's fault: the built-in answers.
    unknown.adapter = Some("gone".into());
    let r = host.route(&unknown, &exists);
    assert!(matches!(&r, Err(Error::Submit(SubmitError::UnknownAdapter(n))) if n == "gone"), "{r:?}");
    assert_eq!(host.list()[0].consecutive_failures, 1);
    let _ = Money::new(0, "USD");
}

/// The ledger entry a settlement becomes (as the server builds it).
fn entry_body(r: &RequestInfo, u: &Usage, s: &openlora::policy::Settlement) -> openlora::ledger::EntryBody {
    use openlora::ledger::{Artifact, EntryBody, Outcome, entry::ENTRY_FORMAT};
    EntryBody {
        format: ENTRY_FORMAT,
        request_id: r.request_id.clone(),
        request_key: format!("req:{}", r.request_id),
        tenant: r.tenant.clone(),
        outcome: Outcome::Completed,
        finish: "stop".into(),
        base_model: Artifact { name: "tiny".into(), sha256: "00".repeat(32) },
        adapter: None,
        request: r.clone(),
        usage: u.clone(),
        charge: s.charge.clone(),
        splits: s.splits.clone(),
        deciders: s.deciders.clone(),
        finished_at_ms: r.received_at_ms,
        owner_share: s.owner_share.clone(),
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

    /// For random usage (so random charges) and random attributor outputs — exact, off by a
    /// little, overflowing — what the host accepts always conserves money to the micro-unit and
    /// becomes a valid ledger entry; what it refuses is answered by the built-in attributor; and
    /// replaying the recorded decision gives the same splits.
    #[test]
    fn settlements_conserve_money_or_fall_back_and_replay(
        prompt in 0u32..200_000,
        completion in 0u32..50_000,
        weights in proptest::collection::vec(0u64..1_000, 1..5),
        tweak in proptest::prop_oneof![4 => proptest::strategy::Just(0i64), 1 => -3i64..=3],
        huge in proptest::bool::weighted(0.1),
    ) {
        use openlora::ledger::NewEntry;
        use openlora::policy::builtin::Builtins;
        use openlora_sdk::money::{split_by_weights, validate_splits};
        static HOST: OnceLock<(PolicyHost, Vec<u8>)> = OnceLock::new();
        let (host, bytes) = HOST.get_or_init(|| {
            let h = host(PolicyConfig { quarantine_after: u32::MAX, quarantine_rate_percent: 0, ..PolicyConfig::default() });
            let bytes = wasm("openlora-test-hostile");
            h.install(&Slot::Attributor, &bytes, r#"{"mode": "echo"}"#, "test").unwrap();
            (h, bytes)
        });
        let u = Usage { prompt_tokens: prompt, completion_tokens: completion, ..usage() };
        let builtins = Builtins::new(&PolicyConfig::default()).unwrap();
        let mut r = request(&format!("prop-{prompt}-{completion}-{tweak}-{}", weights.len()));
        r.adapter = None;
        let charge = builtins.price(&r, &u).unwrap();
        let mut amounts = split_by_weights(charge.amount, &weights).unwrap_or_else(|_| vec![charge.amount]);
        amounts[0] = amounts[0].saturating_add_signed(tweak);
        if huge {
            amounts.push(u64::MAX);
        }
        let echoed: Vec<openlora_sdk::Split> =
            amounts.iter().enumerate().map(|(i, a)| openlora_sdk::Split::new(format!("payee:{i}"), *a, "echo")).collect();
        let listed = echoed.iter().map(|s| format!("{}={}", s.payee, s.amount)).collect::<Vec<_>>().join(",");
        r.metadata.push(("splits".into(), listed));

        let s = host.settle(&r, &u).unwrap();
        proptest::prop_assert_eq!(&s.charge, &charge);
        validate_splits(&s.charge, &s.splits).unwrap();
        let accepted = validate_splits(&charge, &echoed).is_ok();
        if accepted {
            proptest::prop_assert_eq!(&s.splits, &echoed);
            proptest::prop_assert!(s.deciders[1].plugin.starts_with("sha256:"));
        } else {
            proptest::prop_assert!(s.deciders[1].failure.is_some(), "{:?}", s.deciders[1]);
            proptest::prop_assert_eq!(&s.splits, &builtins.attribute(&r, &u, &charge).unwrap());
        }
        // The entry is accepted by the ledger; the same entry with splits off by one is not.
        let body = entry_body(&r, &u, &s);
        proptest::prop_assert!(NewEntry::new(body.clone(), Vec::new()).is_ok());
        let mut off = body.clone();
        off.splits[0].amount = off.splits[0].amount.wrapping_add(1);
        proptest::prop_assert!(NewEntry::new(off, Vec::new()).is_err());
        // Replaying the recorded decision gives the same settlement.
        static REPLAYER: OnceLock<std::sync::Mutex<openlora::policy::Replayer>> = OnceLock::new();
        let replayer = REPLAYER.get_or_init(|| openlora::policy::Replayer::new(&PolicyConfig::default()).unwrap().into());
        let mut blobs = |sha: &str| {
            Ok(if sha == openlora::policy::sha256_hex(bytes) { Some(bytes.clone()) } else { host.config_text(sha).map(String::into_bytes) })
        };
        let again = replayer.lock().unwrap().settle(&r, &u, &s.deciders, &mut blobs).unwrap();
        proptest::prop_assert_eq!((again.charge, again.splits), (s.charge, s.splits));
    }
}

/// An adapter's slot takes a plugin only while the adapter is registered — through the admin
/// API and the drop folder alike — and loses it when the adapter is deleted, so a later adapter
/// of the same name (another owner's) is not paid out by the old owner's attributor.
#[test]
fn an_adapters_slot_lives_and_dies_with_the_adapter() {
    let root = std::env::temp_dir().join(format!("openlora-adapter-slot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let host = PolicyHost::new(&PolicyConfig::default(), Some(root.clone()), Metrics::new().policy).unwrap();
    let registered = std::sync::Arc::new(std::sync::Mutex::new(vec!["trek".to_string()]));
    let known = registered.clone();
    host.bind_adapters(move |name| known.lock().unwrap().iter().any(|a| a == name));
    let bytes = wasm("openlora-plugin-contributor-attributor");
    let cfg = r#"{"owner_keeps_ppm": 250000, "contributors": {"ann": 1}}"#;
    let nope = host.install(&Slot::Adapter("nope".into()), &bytes, cfg, "test");
    assert!(matches!(nope, Err(Error::Submit(SubmitError::UnknownAdapter(ref n))) if n == "nope"), "{nope:?}");
    let drop = root.join("drop");
    std::fs::create_dir_all(&drop).unwrap();
    std::fs::write(drop.join("adapter:nope.wasm"), &bytes).unwrap();
    std::fs::write(drop.join("adapter:nope.json"), cfg).unwrap();
    let report = scan(&host, &drop, &mut HashMap::new()).join("\n");
    assert!(report.contains("not loaded") && report.contains("unknown adapter `nope`"), "{report}");
    assert!(!host.is_active(&Slot::Adapter("nope".into())));

    host.install(&Slot::Adapter("trek".into()), &bytes, cfg, "test").unwrap();
    assert!(host.is_active(&Slot::Adapter("trek".into())));
    registered.lock().unwrap().clear();
    host.forget_adapter("trek");
    assert!(!host.is_active(&Slot::Adapter("trek".into())), "deleted with its adapter");
    registered.lock().unwrap().push("trek".into());
    assert!(!host.is_active(&Slot::Adapter("trek".into())), "a new adapter of the name starts with none");
    assert!(host.activate(&Slot::Adapter("trek".into()), 1).is_err(), "the old owner's versions went with it");
    assert!(host.list().iter().all(|v| v.slot != Slot::Adapter("trek".into())));
    let blob = root.join("blobs").join(format!("{}.wasm", openlora::policy::sha256_hex(&bytes)));
    assert!(blob.is_file(), "kept through the grace period (a request may have just run it)");
    std::mem::drop(host);
    let again = PolicyHost::new(&PolicyConfig::default(), Some(root.clone()), Metrics::new().policy).unwrap();
    assert!(again.list().is_empty(), "nothing of it comes back after a restart");
    assert!(!blob.exists(), "a blob no version names is removed (the ledger keeps its own copy)");
    let _ = std::fs::remove_dir_all(&root);
}

/// A refused upload leaves nothing behind: only an accepted plugin's compiled form is cached.
#[test]
fn only_accepted_plugins_are_kept_compiled() {
    let root = std::env::temp_dir().join(format!("openlora-compile-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let host = PolicyHost::new(&PolicyConfig::default(), Some(root.clone()), Metrics::new().policy).unwrap();
    let cached = || {
        std::fs::read_dir(root.join("cache"))
            .map(|d| d.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "cwasm")).count())
            .unwrap_or(0)
    };
    assert!(host.install(&Slot::Attributor, &wasm("openlora-test-fs-reader"), "", "test").is_err());
    let bytes = wasm("openlora-plugin-token-pricer");
    assert!(host.install(&Slot::Pricer, &bytes, r#"{"currency": 7}"#, "test").is_err(), "a refused configuration");
    assert_eq!(cached(), 0, "refused uploads left compiled files");
    host.install(&Slot::Pricer, &bytes, "", "test").unwrap();
    assert_eq!(cached(), 1);
    let _ = std::fs::remove_dir_all(&root);
}

/// Ten thousand adapters each with its own attributor: every install works (instances are made
/// on demand and warm pools share one server-wide budget), every slot answers, and a plugin
/// called hard meanwhile does not stop another slot's install.
#[test]
fn ten_thousand_adapter_slots_install_and_answer() {
    const SLOTS: usize = 10_000;
    let root = temp_dir("ten-thousand-slots");
    let host = Arc::new(PolicyHost::new(&PolicyConfig::default(), Some(root.clone()), Metrics::new().policy).unwrap());
    let bytes = wasm("openlora-plugin-contributor-attributor");
    let busy = Arc::new(AtomicBool::new(true));
    host.install(&Slot::Adapter("startrek".into()), &wasm("openlora-test-hostile"), r#"{"mode": "ok"}"#, "test")
        .unwrap();
    let hammer: Vec<_> = (0..2)
        .map(|t| {
            let (host, busy) = (host.clone(), busy.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while busy.load(Ordering::Relaxed) {
                    let _ = host.settle(&with_mode(&format!("h{t}-{n}"), "loop"), &usage());
                    n += 1;
                }
            })
        })
        .collect();
    let started = Instant::now();
    for i in 0..SLOTS {
        let cfg = format!(r#"{{"owner_keeps_ppm": 500000, "contributors": {{"c{i}": 1}}}}"#);
        host.install(&Slot::Adapter(format!("a{i}")), &bytes, &cfg, "test")
            .unwrap_or_else(|e| panic!("install {i} failed: {e}"));
    }
    busy.store(false, Ordering::Relaxed);
    hammer.into_iter().for_each(|h| h.join().unwrap());
    eprintln!("{SLOTS} installs in {:?}", started.elapsed());
    for i in (0..SLOTS).step_by(97).chain([SLOTS - 1]) {
        let mut r = request(&format!("r{i}"));
        r.adapter = Some(format!("a{i}"));
        let s = host.settle(&r, &usage()).unwrap();
        let payee = format!("contributor:c{i}");
        assert!(s.splits.iter().any(|p| p.payee == payee), "slot a{i} answered: {:?}", s.splits);
        assert!(s.deciders.iter().all(|d| d.failure.is_none()), "{:?}", s.deciders);
    }
    host.install(&Slot::Attributor, &wasm("openlora-plugin-proportional-attributor"), "", "test")
        .expect("the operator's own attributor still installs");
    assert_eq!(host.list().len(), SLOTS + 2);
    let _ = std::fs::remove_dir_all(&root);
}

/// A router's answers are bounded before the host copies them and its time is virtual: an 8 MB
/// adapter name is refused by size, a 200-byte one by the name limit (the built-in answers
/// both), and a router that sleeps 30 s answers at once.
#[test]
fn a_hostile_router_is_bounded_and_cannot_stall() {
    let limits = PolicyConfig { quarantine_after: 1000, quarantine_rate_percent: 0, ..PolicyConfig::default() };
    let host = host(limits);
    host.install(&Slot::Router, &wasm("openlora-test-hostile-router"), "", "test").unwrap();
    let routed = |mode: &str| {
        let mut r = request(&format!("router-{mode}"));
        r.metadata.push(("router-mode".into(), mode.into()));
        let start = Instant::now();
        let routed = host.route(&r, &exists).unwrap();
        (routed, start.elapsed())
    };
    for (mode, says) in [("huge-name", "bytes"), ("long-name", "longer than 128 bytes")] {
        let (r, _) = routed(mode);
        let failure = r.by.failure.expect("the built-in answered");
        assert!(failure.contains(says) && failure.len() < 2048, "{mode}: {failure}");
        assert_eq!(r.adapter.as_deref(), Some("startrek"), "{mode}");
    }
    let (r, took) = routed("sleep");
    assert!(r.by.failure.is_none() && r.by.plugin.starts_with("sha256:"), "{:?}", r.by);
    assert!(took < Duration::from_secs(1), "a sleeping router answered in {took:?}");
}
