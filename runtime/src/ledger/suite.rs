//! One test suite, run on every backend: SQLite always; PostgreSQL on the server named by
//! `OPENLORA_TEST_POSTGRES` (the test command starts one), each test in a fresh database.

use std::sync::Arc;

use super::entry::tests::sample_body;
use super::entry::{GENESIS_HASH, NewEntry};
use super::report::{Format, GroupBy, export, summary};
use super::store::{Appended, Filter, LedgerStore, Location};
use super::verify::verify;
use super::{KeyState, Ledger};
use crate::metrics::LedgerMetrics;

/// A fresh, empty ledger and a raw handle to change its tables behind its back.
trait Backend {
    fn location(&self) -> Location;
    fn exec(&mut self, sql: &str);
    fn set_body(&mut self, seq: u64, body: &str);
}

struct Sqlite {
    path: std::path::PathBuf,
    conn: rusqlite::Connection,
    _dir: TempDir,
}

impl Backend for Sqlite {
    fn location(&self) -> Location {
        Location::Sqlite(self.path.clone())
    }
    fn exec(&mut self, sql: &str) {
        self.conn.execute_batch(sql).expect("tamper sql");
    }
    fn set_body(&mut self, seq: u64, body: &str) {
        self.conn
            .execute("UPDATE ledger_entries SET body = ?1 WHERE seq = ?2", rusqlite::params![body, seq as i64])
            .expect("tamper");
    }
}

struct Postgres {
    url: String,
    client: postgres::Client,
}

impl Backend for Postgres {
    fn location(&self) -> Location {
        Location::Postgres(self.url.clone())
    }
    fn exec(&mut self, sql: &str) {
        self.client.batch_execute(sql).expect("tamper sql");
    }
    fn set_body(&mut self, seq: u64, body: &str) {
        self.client
            .execute("UPDATE ledger_entries SET body = $1 WHERE seq = $2", &[&body, &(seq as i64)])
            .expect("tamper");
    }
}

/// A temporary folder, removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sqlite() -> Sqlite {
    let dir = std::env::temp_dir().join(format!("openlora-ledger-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("ledger.sqlite3");
    drop(Location::Sqlite(path.clone()).open().expect("create"));
    let conn = rusqlite::Connection::open(&path).expect("open");
    Sqlite { path, conn, _dir: TempDir(dir) }
}

/// A fresh database on the test server, or `None` (with a note) when there is no server.
fn postgres() -> Option<Postgres> {
    let Ok(base) = std::env::var("OPENLORA_TEST_POSTGRES") else {
        assert!(
            std::env::var_os("OPENLORA_REQUIRE_POSTGRES").is_none(),
            "OPENLORA_REQUIRE_POSTGRES is set but OPENLORA_TEST_POSTGRES is not"
        );
        eprintln!("skipping the PostgreSQL backend: OPENLORA_TEST_POSTGRES is not set (tests/run.sh sets it)");
        return None;
    };
    let db = format!("openlora_test_{:016x}", rand::random::<u64>());
    let mut admin = postgres::Client::connect(&format!("{base}/postgres"), postgres::NoTls).expect("postgres");
    admin.batch_execute(&format!("CREATE DATABASE {db}")).expect("create database");
    let url = format!("{base}/{db}");
    drop(Location::Postgres(url.clone()).open().expect("create"));
    let client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    Some(Postgres { url, client })
}

/// Runs `test` on every backend present.
fn each(test: fn(&mut dyn Backend)) {
    test(&mut sqlite());
    if let Some(mut pg) = postgres() {
        test(&mut pg);
    }
}

fn entry(n: u64) -> NewEntry {
    NewEntry::new(sample_body(n), Vec::new()).expect("valid")
}

fn fill(store: &mut dyn LedgerStore, n: u64) {
    let batch: Vec<NewEntry> = (1..=n).map(entry).collect();
    let out = store.append(&batch, 1_000).expect("append");
    assert!(out.iter().all(|a| matches!(a, Appended::Written(_))));
}

fn first_bad(b: &mut dyn Backend) -> Option<(u64, String)> {
    let mut store = b.location().open().expect("open");
    let r = verify(store.as_mut(), None, "test").expect("verify runs");
    r.first_bad.map(|p| (p.seq, p.problem))
}

#[test]
fn appends_chain_in_order_and_verify() {
    each(|b| {
        let mut s = b.location().open().unwrap();
        assert_eq!(s.head().unwrap().hash, GENESIS_HASH);
        fill(s.as_mut(), 5);
        let more = s.append(&[entry(6)], 2_000).unwrap();
        let Appended::Written(six) = &more[0] else { panic!("{more:?}") };
        assert_eq!(six.seq, 6);
        let head = s.head().unwrap();
        assert_eq!((head.seq, head.hash.as_str()), (6, six.hash.as_str()));
        let r = verify(s.as_mut(), None, "test").unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.entries, 6);
        let page = s.page(&Filter::default(), 2, 2).unwrap();
        assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(page[0].prev_hash, s.page(&Filter::default(), 1, 1).unwrap()[0].hash);
    });
}

#[test]
fn a_request_key_is_written_once() {
    each(|b| {
        let mut s = b.location().open().unwrap();
        let out = s.append(&[entry(1), entry(1), entry(2)], 1).unwrap();
        assert!(matches!(&out[0], Appended::Written(e) if e.seq == 1));
        assert!(matches!(&out[1], Appended::Duplicate(e) if e.seq == 1), "{out:?}");
        assert!(matches!(&out[2], Appended::Written(e) if e.seq == 2));
        // Again later (a retry, or the same request after a crash): still one entry.
        let mut retry = sample_body(1);
        retry.charge.amount += 5;
        retry.splits[0].amount += 5;
        let out = s.append(&[NewEntry::new(retry, Vec::new()).unwrap()], 2).unwrap();
        assert!(matches!(&out[0], Appended::Duplicate(e) if e.seq == 1 && e.body.contains("\"amount\":1001")));
        assert_eq!(s.head().unwrap().seq, 2);
        assert!(s.by_key("req:req-1").unwrap().is_some());
        assert!(s.by_key("req:nope").unwrap().is_none());
    });
}

#[test]
fn any_changed_byte_is_detected_at_its_entry() {
    each(|b| {
        let mut s = b.location().open().unwrap();
        fill(s.as_mut(), 6);
        let entries = s.page(&Filter::default(), 0, 10).unwrap();
        let mut rng = rand::rng();
        for _ in 0..12 {
            let victim = &entries[rand::Rng::random_range(&mut rng, 0..entries.len())];
            let bytes = victim.body.as_bytes();
            let i = rand::Rng::random_range(&mut rng, 0..bytes.len());
            let mut changed = bytes.to_vec();
            changed[i] = if bytes[i] == b'7' { b'8' } else { b'7' };
            let changed = String::from_utf8(changed).expect("ascii body");
            b.set_body(victim.seq, &changed);
            let (seq, problem) = first_bad(b).expect("detected");
            assert_eq!(seq, victim.seq, "{problem}");
            b.set_body(victim.seq, &victim.body);
            assert_eq!(first_bad(b), None);
        }
    });
}

#[test]
fn changed_columns_deleted_and_reordered_entries_are_detected() {
    each(|b| {
        let mut s = b.location().open().unwrap();
        fill(s.as_mut(), 6);
        drop(s);
        b.exec("UPDATE ledger_entries SET tenant = 'mallory' WHERE seq = 4");
        assert_eq!(first_bad(b).map(|p| p.0), Some(4));
        b.exec("UPDATE ledger_entries SET tenant = 'acme' WHERE seq = 4");
        b.exec("UPDATE ledger_entries SET recorded_at_ms = recorded_at_ms + 1 WHERE seq = 2");
        assert_eq!(first_bad(b).map(|p| p.0), Some(2));
        b.exec("UPDATE ledger_entries SET recorded_at_ms = recorded_at_ms - 1 WHERE seq = 2");
        assert_eq!(first_bad(b), None);
        // Reorder two entries.
        b.exec(
            "UPDATE ledger_entries SET seq = 100 WHERE seq = 3; UPDATE ledger_entries SET seq = 3 WHERE seq = 4; \
             UPDATE ledger_entries SET seq = 4 WHERE seq = 100;",
        );
        let (seq, problem) = first_bad(b).expect("reorder detected");
        assert_eq!(seq, 3, "{problem}");
        b.exec(
            "UPDATE ledger_entries SET seq = 100 WHERE seq = 3; UPDATE ledger_entries SET seq = 3 WHERE seq = 4; \
             UPDATE ledger_entries SET seq = 4 WHERE seq = 100;",
        );
        assert_eq!(first_bad(b), None);
        // Delete one in the middle, then the last.
        b.exec("DELETE FROM ledger_entries WHERE seq = 5");
        let (seq, problem) = first_bad(b).expect("deletion detected");
        assert_eq!(seq, 6, "{problem}");
        assert!(problem.contains("expected entry 5"), "{problem}");
        b.exec("DELETE FROM ledger_entries WHERE seq = 6");
        let (seq, problem) = first_bad(b).expect("deleted tail detected");
        assert_eq!(seq, 6, "{problem}");
        assert!(problem.contains("head"), "{problem}");
    });
}

#[test]
fn concurrent_replicas_share_one_chain_without_duplicates() {
    each(|b| {
        // Two servers (replicas) on one ledger, eight request threads each, some keys repeated.
        let replicas: Vec<Arc<Ledger>> =
            (0..2).map(|_| Ledger::open(b.location(), LedgerMetrics::detached()).unwrap()).collect();
        std::thread::scope(|scope| {
            for ledger in &replicas {
                for t in 0..8u64 {
                    let ledger = ledger.clone();
                    scope.spawn(move || {
                        for i in 0..25u64 {
                            // Keys 0..200, each sent by both replicas.
                            ledger.append(entry(t * 25 + i)).expect("append");
                        }
                    });
                }
            }
        });
        let mut s = b.location().open().unwrap();
        let r = verify(s.as_mut(), None, "test").unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.entries, 200, "each of the 200 keys once, though each was sent twice");
    });
}

#[test]
fn idempotency_keys_are_held_while_running_and_found_when_done() {
    each(|b| {
        let ledger = Ledger::open(b.location(), LedgerMetrics::detached()).unwrap();
        let KeyState::Free(guard) = ledger.reserve("req:req-1").unwrap() else { panic!("free") };
        assert!(matches!(ledger.reserve("req:req-1").unwrap(), KeyState::InFlight));
        ledger.append(entry(1)).unwrap();
        drop(guard);
        assert!(matches!(ledger.reserve("req:req-1").unwrap(), KeyState::Done(e) if e.seq == 1));
        assert!(matches!(ledger.reserve("req:req-2").unwrap(), KeyState::Free(_)));
    });
}

#[test]
fn exports_and_summaries_are_exact() {
    each(|b| {
        let mut s = b.location().open().unwrap();
        fill(s.as_mut(), 4);
        s.append(&[entry(5)], 5_000).unwrap();
        let mut csv = Vec::new();
        assert_eq!(export(s.as_mut(), &Filter::default(), Format::Csv, &mut csv).unwrap(), 5);
        let csv = String::from_utf8(csv).unwrap();
        assert_eq!(csv.lines().count(), 1 + 10, "a header and one row per split:\n{csv}");
        let mut jsonl = Vec::new();
        let since = Filter { since_ms: Some(2_000), ..Default::default() };
        assert_eq!(export(s.as_mut(), &since, Format::Jsonl, &mut jsonl).unwrap(), 1);
        let line: serde_json::Value = serde_json::from_slice(&jsonl).unwrap();
        assert_eq!(line["entry"]["request_id"], "req-5");
        let by_payee = summary(s.as_mut(), &Filter::default(), GroupBy::Payee).unwrap();
        let owner = by_payee.iter().find(|r| r.key == "owner:trekkie").unwrap();
        assert_eq!((owner.requests, owner.amount), (5, 401 + 402 + 403 + 404 + 405));
        let total: u128 = by_payee.iter().map(|r| r.amount).sum();
        assert_eq!(
            total,
            (1..=5u64).map(|n| u128::from(1000 + n)).sum::<u128>(),
            "payees get exactly what was charged"
        );
        let by_tenant = summary(s.as_mut(), &Filter::default(), GroupBy::Tenant).unwrap();
        assert_eq!(by_tenant.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), vec!["acme", "globex"]);
        let acme = Filter { tenant: Some("acme".into()), ..Default::default() };
        let only = summary(s.as_mut(), &acme, GroupBy::Adapter).unwrap();
        assert_eq!((only.len(), only[0].requests, only[0].amount), (1, 2, 1002 + 1004));
    });
}

/// Summaries read from the running totals agree with reading every entry — for each grouping,
/// with and without a tenant, duplicates not counted — and totals missing from an older ledger
/// are rebuilt from its entries when it is opened.
#[test]
fn running_totals_agree_with_the_entries_and_are_rebuilt_when_missing() {
    use super::report::scan_summary;
    each(|b| {
        let mut s = b.location().open().unwrap();
        fill(s.as_mut(), 6);
        let again = s.append(&[entry(3)], 9_000).unwrap();
        assert!(matches!(again[0], Appended::Duplicate(_)));
        let filters = [Filter::default(), Filter { tenant: Some("acme".into()), ..Default::default() }];
        let check = |s: &mut dyn LedgerStore| {
            for f in &filters {
                for by in [GroupBy::Payee, GroupBy::Adapter, GroupBy::Tenant] {
                    assert_eq!(summary(s, f, by).unwrap(), scan_summary(s, f, by).unwrap(), "{by:?} {f:?}");
                }
            }
        };
        check(s.as_mut());
        b.exec("DELETE FROM ledger_totals");
        drop(s);
        let mut reopened = b.location().open().unwrap();
        check(reopened.as_mut());
    });
}

/// Rewrites the chain as `entries` (renumbered from 1, every hash recomputed) and moves the
/// head to its end: what anyone who can write the database can do.
fn rechain(store: &mut dyn LedgerStore, mut entries: Vec<super::StoredEntry>) {
    let mut head = super::Head { seq: 0, hash: GENESIS_HASH.to_string() };
    for (i, e) in entries.iter_mut().enumerate() {
        e.seq = i as u64 + 1;
        e.prev_hash = head.hash.clone();
        e.hash = super::entry::link(&e.prev_hash, e.seq, e.recorded_at_ms, &e.body);
        head = super::Head { seq: e.seq, hash: e.hash.clone() };
    }
    store.rewrite(&entries, &head).expect("rewrite");
}

fn all_entries(store: &mut dyn LedgerStore) -> Vec<super::StoredEntry> {
    store.page(&Filter::default(), 0, 1000).expect("read")
}

#[test]
fn signed_checkpoints_catch_what_a_database_writer_can_rewrite() {
    use super::checkpoint::{Checkpoint, Trust};
    use super::verify::verify_with;
    each(|b| {
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let trust = Trust { key: Some(key.verifying_key()), outside: Vec::new() };
        let mut store = b.location().open().expect("open");
        let batch: Vec<NewEntry> = (1..=5).map(entry).collect();
        store.append(&batch, 1_000).expect("append");
        let head = store.head().unwrap();
        store.put_checkpoint(&Checkpoint::sign(&key, &head, 1)).unwrap();
        let batch: Vec<NewEntry> = (6..=10).map(entry).collect();
        store.append(&batch, 2_000).expect("append");
        let head = store.head().unwrap();
        store.put_checkpoint(&Checkpoint::sign(&key, &head, 2)).unwrap();
        let check = |store: &mut dyn LedgerStore| {
            let r = verify_with(store, None, "test", &trust).expect("verify runs");
            r.first_bad.map(|p| (p.seq, p.problem))
        };
        assert_eq!(check(store.as_mut()), None);
        assert_eq!(verify(store.as_mut(), None, "test").unwrap().first_bad.map(|p| p.seq), None);
        let original = all_entries(store.as_mut());

        // 1. The tail cut and the head moved back: the chain is consistent, the checkpoint is not.
        rechain(store.as_mut(), original[..8].to_vec());
        assert!(verify(store.as_mut(), None, "test").unwrap().ok(), "the chain alone cannot tell");
        let (seq, problem) = check(store.as_mut()).expect("detected");
        assert_eq!(seq, 10, "{problem}");
        assert!(problem.contains("cut from the end"), "{problem}");

        // 2. A charge moved to another tenant, every hash after it recomputed.
        let mut moved = original.clone();
        let mut body: super::EntryBody = serde_json::from_str(&moved[2].body).unwrap();
        body.tenant = "mallory".into();
        body.request.tenant = "mallory".into();
        moved[2].body = body.canonical();
        moved[2].tenant = "mallory".into();
        rechain(store.as_mut(), moved);
        assert!(verify(store.as_mut(), None, "test").unwrap().ok(), "the chain alone cannot tell");
        let (seq, problem) = check(store.as_mut()).expect("detected");
        assert_eq!(seq, 5, "the first checkpoint after the change: {problem}");
        assert!(problem.contains("contradicts the checkpoint"), "{problem}");

        // 3. An entry deleted, the rest renumbered and rechained.
        let mut deleted = original.clone();
        deleted.remove(3);
        rechain(store.as_mut(), deleted);
        assert!(verify(store.as_mut(), None, "test").unwrap().ok(), "the chain alone cannot tell");
        let (seq, problem) = check(store.as_mut()).expect("detected");
        assert_eq!(seq, 5, "{problem}");

        // 4. A checkpoint forged with another key, over a rewritten chain, is itself caught.
        rechain(store.as_mut(), original.clone());
        let other = ed25519_dalek::SigningKey::from_bytes(&[10; 32]);
        let head = store.head().unwrap();
        store.put_checkpoint(&Checkpoint::sign(&other, &head, 3)).unwrap();
        let (seq, problem) = check(store.as_mut()).expect("detected");
        assert!(seq == 10 && problem.contains("forged"), "{seq}: {problem}");

        // Without a trusted key the report says the checkpoints went unchecked.
        let r = verify_with(store.as_mut(), None, "test", &Trust::default()).unwrap();
        assert!(r.ok() && r.checkpoints_unchecked.is_some());
    });
}

#[test]
fn the_writer_signs_the_head_every_n_entries_and_when_asked() {
    each(|b| {
        let dir = std::env::temp_dir().join(format!("openlora-signer-{:016x}", rand::random::<u64>()));
        let _dir = TempDir(dir.clone());
        let key_path = dir.join("ledger-signing.key");
        let key = super::checkpoint::read_or_create_key(&key_path).expect("key");
        let signer = super::Signer { key: key.clone(), key_path: key_path.clone(), every: 3 };
        let ledger = Ledger::open_signed(b.location(), LedgerMetrics::detached(), Some(signer)).expect("open");
        for n in 1..=7 {
            ledger.append(entry(n)).expect("append");
        }
        let last = ledger.checkpoint().expect("signs").expect("a checkpoint");
        assert_eq!(last.seq, 7);
        let seqs: Vec<u64> = ledger.read(|s| s.checkpoints()).unwrap().iter().map(|c| c.seq).collect();
        assert_eq!(seqs, vec![3, 6, 7]);
        let outside = super::checkpoint::read_latest(&super::checkpoint::latest_path(&key_path)).unwrap();
        assert_eq!(outside, Some(last.clone()), "the latest is kept beside the key too");
        assert!(last.verify(&key.verifying_key()).is_ok());
    });
}
