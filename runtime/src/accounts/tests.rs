//! Keys, quotas and the audit trail, on SQLite and (when `OPENLORA_TEST_POSTGRES` names a
//! server, as the test command arranges) on PostgreSQL, each test on a fresh database.

use super::*;

const GENESIS: &str = crate::ledger::entry::GENESIS_HASH;

fn locations() -> Vec<(Location, Option<std::path::PathBuf>)> {
    let dir = std::env::temp_dir().join(format!("openlora-accounts-{:016x}", rand::random::<u64>()));
    let mut v = vec![(Location::Sqlite(dir.join("ledger.sqlite3")), Some(dir))];
    match std::env::var("OPENLORA_TEST_POSTGRES") {
        Ok(base) => {
            let db = format!("openlora_accounts_{:016x}", rand::random::<u64>());
            let mut admin = postgres::Client::connect(&format!("{base}/postgres"), postgres::NoTls).expect("postgres");
            admin.batch_execute(&format!("CREATE DATABASE {db}")).expect("create database");
            v.push((Location::Postgres(format!("{base}/{db}")), None));
        }
        Err(_) => assert!(
            std::env::var_os("OPENLORA_REQUIRE_POSTGRES").is_none(),
            "OPENLORA_REQUIRE_POSTGRES is set but OPENLORA_TEST_POSTGRES is not"
        ),
    }
    v
}

/// The key the tests sign the audit trail with, and where its checkpoint goes.
fn signer(location: &Location) -> AuditSigner {
    let dir = std::env::temp_dir().join(format!("openlora-audit-key-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let _ = location;
    AuditSigner { key: ed25519_dalek::SigningKey::from_bytes(&[9; 32]), path: dir.join("audit-checkpoint.json") }
}

fn each(test: impl Fn(&Location, Arc<Accounts>)) {
    for (location, dir) in locations() {
        let accounts = Accounts::open(&location, Quotas::default(), Some(signer(&location))).expect("open");
        test(&location, accounts);
        if let Some(dir) = dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn key(scope: &str, account: Option<&str>, payee: Option<&str>) -> NewKey {
    NewKey {
        scope: scope.into(),
        account: account.map(str::to_string),
        payee: payee.map(str::to_string),
        ..NewKey::default()
    }
}

/// What a verifier trusts: the test key and the checkpoint file the accounts wrote.
fn trust(a: &Accounts) -> AuditTrust {
    let s = a.signer.as_ref().expect("signed");
    AuditTrust { key: Some(s.key.verifying_key()), latest: crate::ledger::checkpoint::read_latest(&s.path).unwrap() }
}

#[test]
fn keys_authenticate_until_revoked_or_expired_and_are_stored_hashed() {
    each(|location, a| {
        let (alice, alice_key) = a.create_key(&Caller::Operator, key("owner", Some("alice"), None)).unwrap();
        assert_eq!(a.authenticate(&alice_key).unwrap().unwrap().id, alice.id);
        let owner = Caller::from_key(&alice);
        assert_eq!(owner, Caller::Owner { name: "alice".into(), key_id: alice.id.clone() });
        // An owner mints contributor keys for itself only.
        let (bob, bob_key) = a.create_key(&owner, key("contributor", None, Some("contributor:bob"))).unwrap();
        assert_eq!((bob.account.as_str(), bob.payee.as_deref()), ("alice", Some("contributor:bob")));
        for bad in [key("owner", Some("mallory"), None), key("contributor", Some("carol"), Some("x"))] {
            assert!(matches!(a.create_key(&owner, bad), Err(crate::Error::Account(AccountError::Forbidden(_)))));
        }
        let contributor = Caller::from_key(&bob);
        assert!(a.create_key(&contributor, key("contributor", None, Some("y"))).is_err());
        assert!(a.list_keys(&contributor).is_err());
        // Wrong secret with a right id, malformed keys: nobody.
        let forged =
            format!("{}{}", &alice_key[..alice_key.len() - 1], if alice_key.ends_with('0') { "1" } else { "0" });
        assert!(a.authenticate(&forged).unwrap().is_none());
        assert!(a.authenticate("olk_nothing").unwrap().is_none());
        // Another owner does not see or revoke alice's keys.
        let (_, carol_key) = a.create_key(&Caller::Cli, key("owner", Some("carol"), None)).unwrap();
        let carol = Caller::from_key(&a.authenticate(&carol_key).unwrap().unwrap());
        assert!(a.list_keys(&carol).unwrap().is_empty(), "an owner sees its contributors' keys only");
        assert_eq!(a.list_keys(&owner).unwrap().iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), [bob.id.as_str()]);
        // Not its own owner key, nor a tenant's key of the same name.
        let (tenant_alice, _) = a.create_key(&Caller::Operator, key("tenant", Some("alice"), None)).unwrap();
        for id in [&alice.id, &tenant_alice.id] {
            assert!(matches!(a.revoke_key(&owner, id), Err(crate::Error::Account(AccountError::NotFound(_)))));
        }
        assert!(matches!(a.revoke_key(&carol, &bob.id), Err(crate::Error::Account(AccountError::NotFound(_)))));
        assert!(a.authenticate(&bob_key).unwrap().is_some());
        // Revoked: refused at once.
        a.revoke_key(&owner, &bob.id).unwrap();
        assert!(a.authenticate(&bob_key).unwrap().is_none());
        // Expired: refused once its time has passed.
        let mut short = key("tenant", Some("acme"), None);
        short.expires_in_secs = Some(1);
        let (_, short_key) = a.create_key(&Caller::Operator, short).unwrap();
        assert!(a.authenticate(&short_key).unwrap().is_some());
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(a.authenticate(&short_key).unwrap().is_none());
        // The keys are nowhere in the database's files.
        if let Location::Sqlite(path) = location {
            drop(a);
            let dir = path.parent().unwrap();
            for f in std::fs::read_dir(dir).unwrap() {
                let bytes = std::fs::read(f.unwrap().path()).unwrap();
                for k in [&alice_key, &bob_key, &carol_key, &short_key] {
                    let secret = &k.as_bytes()[21..];
                    assert!(!bytes.windows(secret.len()).any(|w| w == secret), "a key's secret is stored in clear");
                }
            }
        }
    });
}

#[test]
fn the_audit_trail_chains_and_catches_edits_and_removals() {
    each(|location, a| {
        a.create_key(&Caller::Operator, key("owner", Some("alice"), None)).unwrap();
        let alice = Caller::Owner { name: "alice".into(), key_id: "k1".into() };
        a.record(&alice, "adapter.upload", "sql", Some("ab12"), "").unwrap();
        a.record(&alice, "plugin.install", "adapter:sql", Some("cd34"), "version=1").unwrap();
        a.record(&Caller::Operator, "plugin.install", "pricer", Some("ef56"), "version=1").unwrap();
        let report = a.verify_audit(&trust(&a)).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.records, 4);
        // An owner reads its own acts only; the operator reads all.
        let mine = a.audit(&alice, 0, 0, 100).unwrap();
        assert_eq!(
            mine.iter().map(|r| r.act.action.as_str()).collect::<Vec<_>>(),
            ["adapter.upload", "plugin.install"]
        );
        assert_eq!(a.audit(&Caller::Operator, 0, 0, 100).unwrap().len(), 4);
        assert!(a.audit(&Caller::Tenant { name: "t".into(), key_id: None }, 0, 0, 10).is_err());
        // The hourly install quota counts the trail.
        a.set_quotas(
            &Caller::Operator,
            "alice",
            QuotaOverrides { max_installs_per_hour: Some(1), ..Default::default() },
        )
        .unwrap();
        let Err(crate::Error::Account(AccountError::Quota { retry_after: Some(wait), size: false, .. })) =
            a.check_install_quota(&alice)
        else {
            panic!("the second install in an hour is refused")
        };
        assert!((1..=3600).contains(&wait));
        assert!(a.set_quotas(&alice, "alice", QuotaOverrides::default()).is_err());
        // A database writer edits a record: found.
        let mut db = location.connect().unwrap();
        db.exec("UPDATE audit_log SET target = $1 WHERE seq = 3", &["adapter:other".into()]).unwrap();
        let report = a.verify_audit(&trust(&a)).unwrap();
        assert!(report.problem.as_deref().unwrap_or_default().contains("record 3 was changed"), "{report:?}");
        db.exec("UPDATE audit_log SET target = $1 WHERE seq = 3", &["adapter:sql".into()]).unwrap();
        assert!(a.verify_audit(&trust(&a)).unwrap().ok());
        // ... or removes the last one: found too.
        let last = a.audit(&Caller::Operator, 0, 0, 100).unwrap().len() as i64;
        let saved = db.rows("SELECT * FROM audit_log WHERE seq = $1", &[Val::Int(last)]).unwrap();
        db.exec("DELETE FROM audit_log WHERE seq = $1", &[Val::Int(last)]).unwrap();
        let report = a.verify_audit(&trust(&a)).unwrap();
        assert!(report.problem.as_deref().unwrap_or_default().contains("removed"), "{report:?}");
        // ... and moves the head back too, or rewrites a record and every hash after it: the
        // signed checkpoint beside the key still names the true last record.
        let prev = &saved[0][8];
        db.exec("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1", &[Val::Int(last - 1), prev.clone()]).unwrap();
        let report = a.verify_audit(&trust(&a)).unwrap();
        assert!(report.problem.as_deref().unwrap_or_default().contains("signed checkpoint names record"), "{report:?}");
        assert!(a.verify_audit(&AuditTrust::default()).unwrap().ok(), "without the checkpoint the cut is invisible");
        db.exec("DELETE FROM audit_log", &[]).unwrap();
        db.exec("UPDATE audit_head SET seq = 0, hash = $1 WHERE id = 1", &[GENESIS.into()]).unwrap();
        let report = a.verify_audit(&trust(&a)).unwrap();
        assert!(!report.ok(), "an emptied trail is caught: {report:?}");
        // A checkpoint signed by another key is reported as forged.
        let mut forged = trust(&a);
        forged.key = Some(ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key());
        assert!(a.verify_audit(&forged).unwrap().problem.unwrap().contains("forged"));
    });
}

#[test]
fn earnings_are_the_owners_division_and_explain_finds_entries() {
    use crate::ledger::earnings::{self, EarningsBy};
    use crate::ledger::entry::{OwnerShare, tests::sample_body};
    use crate::ledger::{Artifact, NewEntry};
    use openlora_sdk::Split;
    each(|location, a| {
        // Entries of three owners whose names a careless prefix match would confuse.
        let entry = |n: u64, owner: &str| {
            let mut b = sample_body(n);
            b.request.adapter_owner = Some(owner.to_string());
            b.adapter = Some(Artifact { name: format!("ad-{owner}"), sha256: "cd".repeat(32) });
            b.charge.amount = 1000;
            b.splits = vec![
                Split::new("base:tiny", 600, "base"),
                Split::new(format!("owner:{owner}"), 100, "adapter owner"),
                Split::new("contributor:bob", 300, "training data"),
            ];
            b.owner_share = Some(OwnerShare {
                payee: format!("owner:{owner}"),
                amount: 400,
                reason: "adapter".into(),
                first: 1,
                count: 2,
            });
            NewEntry::new(b, Vec::new()).unwrap()
        };
        let mut store = location.open().unwrap();
        let batch = [entry(1, "alice"), entry(2, "alice"), entry(3, "Alice"), entry(4, "a_ice"), entry(5, "alice")];
        store.append(&batch, crate::ledger::now_ms()).unwrap();
        let rows = a.with(|db| earnings::rows(db, "alice", None, None, None)).unwrap();
        let by_payee = earnings::group(&rows, EarningsBy::Payee);
        let got: Vec<(&str, u128, u64)> = by_payee.iter().map(|g| (g.key.as_str(), g.amount, g.requests)).collect();
        assert_eq!(got, [("contributor:bob", 900, 3), ("owner:alice", 300, 3)]);
        let bob = a.with(|db| earnings::rows(db, "a_ice", Some("contributor:bob"), None, None)).unwrap();
        assert_eq!(earnings::group(&bob, EarningsBy::Adapter).iter().map(|g| g.amount).sum::<u128>(), 300);
        // explain finds an entry by its request id, and the operator's split folds the division back.
        let found = a.with(|db| crate::ledger::explain::find(db, "req-2")).unwrap().expect("entry");
        let body = found.parse().unwrap();
        assert_eq!(body.operator_splits()[1], Split::new("owner:alice", 400, "adapter"));
        assert_eq!(body.owner_splits().unwrap().len(), 2);
        assert!(a.with(|db| crate::ledger::explain::find(db, "req-99")).unwrap().is_none());
    });
}
