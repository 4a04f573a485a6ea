//! The sandbox's limits at call time, in process: hostile plugins contained (fuel, a deadline of
//! CPU time, memory, stack, output, randomness, strings) with the built-in answering, virtual
//! time that replays exactly, and quarantine by failure rate.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::policy::{host, request, twin_hosts, usage, wasm, with_mode};
use openlora::policy::{PolicyConfig, PolicyHost, Slot};
use openlora_sdk::Money;

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

/// The last CPU the calling thread may run on (the first often takes a VM's interrupts).
fn last_allowed_cpu() -> usize {
    // SAFETY: as in `pin_to`; sched_getaffinity writes the set passed by reference.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set), 0);
        (0..libc::CPU_SETSIZE as usize).rev().find(|&c| libc::CPU_ISSET(c, &set)).expect("an allowed CPU")
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
    // A deadline of three times that CPU time (room for a busy sibling hyperthread to slow the
    // same work), and the core shared with seven spinning threads: the call takes about eight
    // times its CPU time of wall time, over its deadline and under ten deadlines (the
    // backstop), and passes.
    let deadline = cpu * 3;
    let host = host(PolicyConfig { deadline_ms: deadline.as_millis() as u64, ..limits.clone() });
    host.install(&Slot::Attributor, &bytes, "", "test").unwrap();
    assert_eq!(run(&host, iterations).0, None, "alone");
    let core = last_allowed_cpu();
    let stop = Arc::new(AtomicBool::new(false));
    let pinned = Arc::new(std::sync::Barrier::new(8));
    let spinners: Vec<_> = (0..7)
        .map(|_| {
            let (stop, pinned) = (stop.clone(), pinned.clone());
            std::thread::spawn(move || {
                pin_to(core);
                pinned.wait();
                while !stop.load(Ordering::Relaxed) {
                    std::hint::black_box(0u64);
                }
            })
        })
        .collect();
    pin_to(core);
    pinned.wait();
    let (failure, _, wall) = run(&host, iterations);
    stop.store(true, Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
    println!("{cpu:?} of CPU time alone; shared: {wall:?} of wall time for a deadline of {deadline:?}");
    assert!(wall > Duration::from_millis(deadline.as_millis() as u64), "the core was shared: {wall:?} vs {deadline:?}");
    assert_eq!(failure, None, "{wall:?} of wall time for a deadline of {deadline:?}");
}

/// Sleeping is free and blocks nothing: virtual time moves to the timer at once, so a call
/// that sleeps 3 s (or 584 years) answers, correctly, well within the ten deadlines of wall time
/// that stop a call that blocks.
#[test]
fn a_plugin_that_sleeps_answers_at_once_within_its_deadline() {
    let limits = PolicyConfig { quarantine_rate_percent: 0, ..PolicyConfig::default() };
    let host = host(limits.clone());
    host.install(&Slot::Attributor, &wasm("openlora-test-hostile"), r#"{"mode": "ok"}"#, "test").unwrap();
    for mode in ["sleep", "sleep-forever"] {
        let start = Instant::now();
        let s = host.settle(&with_mode(mode, mode), &usage()).unwrap();
        let took = start.elapsed();
        assert!(took < Duration::from_millis(limits.deadline_ms * 5), "{mode} took {took:?}");
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
    let start = thread_cpu();
    let s = a.settle(&with_mode("flood", "random-flood"), &usage()).unwrap();
    let used = thread_cpu() - start;
    let failure = s.deciders[1].failure.clone().expect("refused");
    assert!(failure.contains("random bytes"), "{failure}");
    assert!(used < Duration::from_millis(limits.deadline_ms), "{used:?} of CPU time");
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
