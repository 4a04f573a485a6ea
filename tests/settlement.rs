//! Settlement outside the HTTP layer: a request runs with, and its ledger entry records, the
//! adapter version it was admitted with, even when the adapter is replaced or removed while it
//! runs; and the configurations its deciders ran with are stored once, by sha256, and replay.

mod common;

use std::sync::Arc;

use common::repo_root;
use openlora::engine::{Ended, EngineConfig, EngineHandle, Event};
use openlora::ledger::{Filter, Ledger, Location};
use openlora::metrics::Metrics;
use openlora::model::LoadedModel;
use openlora::pager::{AdapterPager, PagerConfig};
use openlora::policy::{PolicyConfig, PolicyHost};
use openlora::request::{ApiParams, PromptInput, RequestLimits, Validator};
use openlora::settlement::{Admission, SettlementService};

fn adapter_dir(name: &str) -> std::path::PathBuf {
    repo_root().join("tests/fixtures/adapters/gqa-llama3-f32").join(name)
}

struct Setup {
    pager: AdapterPager,
    validator: Validator,
    service: Arc<SettlementService>,
    ledger: Arc<Ledger>,
    policy: Arc<PolicyHost>,
    dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup(tag: &str) -> Setup {
    let model = Arc::new(LoadedModel::load(&repo_root().join("tests/fixtures/models/gqa-llama3-f32")).expect("model"));
    let metrics = Metrics::new();
    let pager = AdapterPager::new(model.config(), PagerConfig::default(), metrics.pager.clone());
    pager.register("tuned", &adapter_dir("r4-qv")).expect("register");
    let engine =
        EngineHandle::start(model.clone(), pager.clone(), EngineConfig::default(), metrics.clone()).expect("engine");
    let dir = std::env::temp_dir().join(format!("openlora-settlement-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ledger = Ledger::open(Location::Sqlite(dir.join("ledger.db")), metrics.ledger.clone()).expect("ledger");
    let policy = Arc::new(PolicyHost::new(&PolicyConfig::default(), None, metrics.policy.clone()).expect("policy"));
    let limits = RequestLimits { max_prompt_tokens: 256, default_max_tokens: 16 };
    let validator = Validator::new(model, "base".into(), limits, engine.checker().clone()).expect("validator");
    let service = SettlementService::new(engine, policy.clone(), ledger.clone(), "base".into(), "USD".into());
    Setup { pager, validator, service, ledger, policy, dir: TempDir(dir) }
}

/// Runs one 40-token request for the adapter `tuned`, calling `meanwhile` once it is running;
/// returns the sha256 its ledger entry records for the adapter.
async fn run(s: &Setup, meanwhile: impl FnOnce()) -> String {
    run_as(s, "req-1", meanwhile).await;
    let entries = s.ledger.read(|st| st.page(&Filter::default(), 0, 10)).expect("read");
    assert_eq!(entries.len(), 1);
    let body = entries[0].parse().expect("entry");
    body.adapter.expect("an adapter is recorded").sha256
}

/// Runs one 40-token request `id` for the adapter `tuned` to its ledger entry.
async fn run_as(s: &Setup, id: &str, meanwhile: impl FnOnce()) {
    let params: ApiParams =
        serde_json::from_value(serde_json::json!({"max_tokens": 40, "ignore_eos": true, "temperature": 0}))
            .expect("params");
    let prompt = PromptInput::Text("the cat".into());
    let prepared = s.validator.completion(id.into(), "tuned", &prompt, None, params).expect("valid");
    let admission = Admission { prepared, tenant: "t".into(), requested_model: "tuned".into(), idempotency_key: None };
    let mut stream = s.service.admit(admission).await.expect("admitted");
    let mut meanwhile = Some(meanwhile);
    loop {
        match stream.next().await.expect("event") {
            Event::Token { .. } => {
                if let Some(f) = meanwhile.take() {
                    f();
                }
            }
            Event::Done { reason, usage } => {
                assert_eq!(usage.completion_tokens, 40, "the request ran to its end");
                stream.finish(Ended::Finished(reason), &usage).await.expect("recorded");
                break;
            }
            Event::Failed { message, .. } => panic!("failed: {message}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_entry_records_the_adapter_version_admitted_when_it_is_replaced_mid_request() {
    let s = setup("replace");
    let admitted = s.pager.manifest("tuned").expect("registered").sha256.clone();
    let recorded = run(&s, || s.pager.register("tuned", &adapter_dir("r8-mlp")).expect("replace")).await;
    let replacement = s.pager.manifest("tuned").expect("registered").sha256.clone();
    assert_ne!(admitted, replacement, "the replacement is another version");
    assert_eq!(recorded, admitted, "the entry names the version the request ran with");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_entry_records_the_adapter_version_admitted_when_it_is_deleted_mid_request() {
    let s = setup("delete");
    let admitted = s.pager.manifest("tuned").expect("registered").sha256.clone();
    let recorded = run(&s, || assert!(s.pager.unregister("tuned"))).await;
    assert!(s.pager.manifest("tuned").is_none());
    assert_eq!(recorded, admitted, "the entry names the version the request ran with, not \"\"");
}

/// Entries name each decider's configuration by sha256; the ledger stores each distinct one
/// once, replay reads it from there, and a stored configuration changed in the database is
/// caught by `ledger verify`.
#[tokio::test(flavor = "multi_thread")]
async fn configurations_are_stored_once_by_sha256_and_replay() {
    use openlora::policy::{Replayer, Slot};
    let s = setup("configs");
    let pricer = r#"{"currency": "USD", "default": {"prompt_per_1k": 2500, "completion_per_1k": 7000}}"#;
    let owner = r#"{"owner_keeps_ppm": 250000, "contributors": {"ann": 3, "bo": 1}}"#;
    s.policy.install(&Slot::Pricer, &common::plugin_wasm("openlora-plugin-token-pricer"), pricer, "test").unwrap();
    let attributor = common::plugin_wasm("openlora-plugin-contributor-attributor");
    s.policy.install(&Slot::Adapter("tuned".into()), &attributor, owner, "test").unwrap();
    for i in 0..3 {
        run_as(&s, &format!("req-{i}"), || {}).await;
    }
    let entries = s.ledger.read(|st| st.page(&Filter::default(), 0, 10)).expect("read");
    assert_eq!(entries.len(), 3);
    let sha = |text: &str| openlora::policy::sha256_hex(text.as_bytes());
    for e in &entries {
        assert!(!e.body.contains("contributors") && !e.body.contains("prompt_per_1k"), "no config inline: {}", e.body);
        let body = e.parse().unwrap();
        let named: Vec<_> = body.deciders.iter().filter_map(|d| d.config_sha256.clone()).collect();
        assert!(named.contains(&sha(pricer)) && named.contains(&sha(owner)), "{named:?}");
    }
    for config in [pricer, owner] {
        let stored = s.ledger.read(|st| st.blob(&sha(config))).unwrap();
        assert_eq!(stored.as_deref(), Some(config.as_bytes()), "stored once, by its sha256");
    }
    let verify = || {
        let mut replayer = Replayer::new(&PolicyConfig::default()).unwrap();
        s.ledger.read(|st| openlora::ledger::verify::verify(st, Some(&mut replayer), "test")).unwrap()
    };
    let report = verify();
    assert!(report.ok() && report.replayed == 3, "{report:?}");

    let db = rusqlite::Connection::open(s.dir.0.join("ledger.db")).unwrap();
    let richer = owner.replace("\"bo\": 1", "\"bo\": 9");
    db.execute(
        "UPDATE plugin_blobs SET bytes = ?1 WHERE sha256 = ?2",
        rusqlite::params![richer.as_bytes(), sha(owner)],
    )
    .unwrap();
    let report = verify();
    let bad = report.first_bad.expect("a changed configuration is caught");
    assert_eq!(bad.seq, 1);
    assert!(bad.problem.contains("does not match its hash"), "{}", bad.problem);
}
