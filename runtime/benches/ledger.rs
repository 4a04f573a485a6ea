//! Ledger write throughput, entries per second, for each backend in one run: one request at a
//! time (every entry its own durable commit) against 32 requests at once (the writer commits
//! whatever is waiting in one transaction). SQLite always (WAL, `synchronous=FULL`, in the
//! system temp folder); PostgreSQL on the server named by `OPENLORA_TEST_POSTGRES`, if set.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use openlora::ledger::entry::ENTRY_FORMAT;
use openlora::ledger::{Artifact, EntryBody, Ledger, Location, NewEntry, Outcome};
use openlora::metrics::LedgerMetrics;
use openlora_sdk::{Money, Split};

/// Entries per measured iteration.
const BATCH: u64 = 64;
/// Requests finishing at once in the concurrent case.
const THREADS: u64 = 32;

static NEXT: AtomicU64 = AtomicU64::new(0);

fn entry() -> NewEntry {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut request = openlora_sdk::testing::sample_request();
    request.request_id = format!("bench-{n}");
    let body = EntryBody {
        format: ENTRY_FORMAT,
        request_id: request.request_id.clone(),
        request_key: format!("req:bench-{n}-{}", std::process::id()),
        tenant: "acme".into(),
        outcome: Outcome::Completed,
        finish: "stop".into(),
        base_model: Artifact { name: "llama".into(), sha256: "ab".repeat(32) },
        adapter: Some(Artifact { name: "startrek".into(), sha256: "cd".repeat(32) }),
        request,
        usage: openlora_sdk::testing::sample_usage(),
        charge: Money::new(51_300, "USD"),
        splits: vec![
            Split::new("operator:openlora", 5_130, "operator"),
            Split::new("base:llama", 40_000, "base model"),
            Split::new("owner:trekkie", 6_170, "adapter"),
        ],
        deciders: Vec::new(),
        finished_at_ms: 1_790_000_000_000 + n,
        owner_share: None,
    };
    NewEntry::new(body, Vec::new()).expect("valid entry")
}

fn locations() -> Vec<(&'static str, Location)> {
    let dir = std::env::temp_dir().join(format!("openlora-ledger-bench-{}", std::process::id()));
    let mut v = vec![("sqlite", Location::Sqlite(dir.join("ledger.sqlite3")))];
    if let Ok(base) = std::env::var("OPENLORA_TEST_POSTGRES") {
        let db = format!("openlora_bench_{}", std::process::id());
        let mut admin = postgres::Client::connect(&format!("{base}/postgres"), postgres::NoTls).expect("postgres");
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db}")).expect("drop database");
        admin.batch_execute(&format!("CREATE DATABASE {db}")).expect("create database");
        v.push(("postgres", Location::Postgres(format!("{base}/{db}"))));
    } else {
        eprintln!("ledger bench: OPENLORA_TEST_POSTGRES not set, PostgreSQL skipped");
    }
    v
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("ledger_append");
    g.throughput(Throughput::Elements(BATCH)).sample_size(10);
    for (name, location) in locations() {
        let ledger: Arc<Ledger> = Ledger::open(location, LedgerMetrics::detached()).expect("open ledger");
        g.bench_function(format!("{name}/one_at_a_time"), |b| {
            b.iter(|| {
                for _ in 0..BATCH {
                    ledger.append(entry()).expect("append");
                }
            })
        });
        g.bench_function(format!("{name}/{THREADS}_concurrent"), |b| {
            b.iter(|| {
                std::thread::scope(|s| {
                    for _ in 0..THREADS {
                        let ledger = ledger.clone();
                        s.spawn(move || {
                            for _ in 0..BATCH / THREADS {
                                ledger.append(entry()).expect("append");
                            }
                        });
                    }
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
