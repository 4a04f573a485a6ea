//! Policy overhead per request: route + price + attribute with the official plugins running as
//! wasm components (built from source), against the same policies compiled in natively, in one
//! run. Besides criterion's figures it prints p50/p99 per request, back to back and paced at
//! 2,000 requests/s (the warm instance pools refill between requests, as in a serving process).

#[path = "../../tests/common/mod.rs"]
#[allow(dead_code, missing_docs)]
mod common;

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use openlora::policy::{PolicyConfig, PolicyHost, Slot};
use openlora_sdk::RequestInfo;

/// The tests' request (adapter `startrek`), numbered `i`.
fn request(i: u64) -> RequestInfo {
    common::policy::request(&format!("bench-{i}"))
}

fn once(host: &PolicyHost, i: u64) {
    let r = request(i);
    let routed = host.route(&r, &|_| true).expect("route");
    assert!(routed.by.failure.is_none());
    let s = host.settle(&r, &common::policy::usage()).expect("settle");
    assert!(s.deciders.iter().all(|d| d.failure.is_none()));
}

fn percentiles(host: &PolicyHost, n: u64, pace: Option<Duration>) -> (f64, f64) {
    let mut micros = Vec::with_capacity(n as usize);
    for i in 0..n {
        let start = Instant::now();
        once(host, i);
        micros.push(start.elapsed().as_secs_f64() * 1e6);
        if let Some(p) = pace {
            // A busy wait: a serving process is busy between policy calls (a sleeping thread
            // would come back to cold caches and a slow core, on the native path as well).
            let next = start + p;
            while Instant::now() < next {
                std::hint::spin_loop();
            }
        }
    }
    micros.sort_by(f64::total_cmp);
    (micros[micros.len() / 2], micros[micros.len() * 99 / 100])
}

fn policy_overhead(c: &mut Criterion) {
    let builtin = common::policy::host(PolicyConfig::default());
    let wasm = common::policy::host(PolicyConfig::default());
    for (slot, package) in [
        (Slot::Router, "openlora-plugin-router"),
        (Slot::Pricer, "openlora-plugin-token-pricer"),
        (Slot::Attributor, "openlora-plugin-proportional-attributor"),
    ] {
        wasm.install(&slot, &common::plugin_wasm(package), "", "bench").expect("install");
    }
    std::thread::sleep(Duration::from_millis(200)); // let the warm pools fill
    let mut g = c.benchmark_group("policy_per_request");
    let mut i = 0u64;
    g.bench_function("builtin_native", |b| {
        b.iter(|| {
            i += 1;
            once(&builtin, i)
        })
    });
    // Requests arriving at 2,000/s (15x the load test's rate): the time of each request only.
    g.bench_function("official_wasm_plugins_2000_per_s", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let next = Instant::now() + Duration::from_micros(500);
                i += 1;
                let start = Instant::now();
                once(&wasm, i);
                total += start.elapsed();
                while Instant::now() < next {
                    std::hint::spin_loop();
                }
            }
            total
        })
    });
    // Back to back: instantiation (one background thread) is the bottleneck.
    g.bench_function("official_wasm_plugins_saturated", |b| {
        b.iter(|| {
            i += 1;
            once(&wasm, i)
        })
    });
    g.finish();
    let pricer = wasm.active(&Slot::Pricer).expect("pricer");
    for pace in [None, Some(Duration::from_micros(500))] {
        std::thread::sleep(Duration::from_millis(200));
        let (mut warm, mut cold) = (Vec::new(), Vec::new());
        for i in 0..2000 {
            let start = Instant::now();
            let c = pricer.plugin.price(&request(i), &common::policy::usage()).expect("price");
            if c.stats.warm {
                warm.push(c.stats.micros)
            } else {
                cold.push(c.stats.micros)
            }
            if let Some(p) = pace {
                while start.elapsed() < p {
                    std::hint::spin_loop();
                }
            }
        }
        let mean = |v: &[u64]| if v.is_empty() { 0.0 } else { v.iter().sum::<u64>() as f64 / v.len() as f64 };
        println!(
            "pricer alone (pace {pace:?}): {} warm calls, mean {:.1} µs; {} cold calls (instantiated inline), mean {:.1} µs",
            warm.len(),
            mean(&warm),
            cold.len(),
            mean(&cold)
        );
    }
    for (name, host) in [("builtin_native", &builtin), ("official_wasm_plugins", &wasm)] {
        std::thread::sleep(Duration::from_millis(200));
        let (p50, p99) = percentiles(host, 5_000, None);
        let (q50, q99) = percentiles(host, 5_000, Some(Duration::from_micros(500)));
        let (r50, r99) = percentiles(host, 2_000, Some(Duration::from_micros(2000)));
        println!(
            "policy {name}: back to back p50 {p50:.1} µs p99 {p99:.1} µs; at 2000/s p50 {q50:.1} µs p99 {q99:.1} µs; \
             at 500/s p50 {r50:.1} µs p99 {r99:.1} µs"
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(5));
    targets = policy_overhead
}
criterion_main!(benches);
