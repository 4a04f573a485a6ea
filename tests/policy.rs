//! Policy plugins end to end in process: the official plugins built from source and loaded into
//! the wasmtime host, refused uploads (hostile plugins at call time: `sandbox.rs`), quarantine,
//! fail-closed slots, exact replay, hot swap under concurrent calls, restart and the drop folder;
//! and the property that every settlement conserves money and replays from its ledger entry.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::policy::{exists, host, request, twin_hosts, usage, wasm, with_mode};
use common::temp_dir;
use openlora::error::{Error, PolicyError, SubmitError};
use openlora::ledger::Replay;
use openlora::metrics::Metrics;
use openlora::policy::dropdir::scan;
use openlora::policy::{OnFailure, PolicyConfig, PolicyHost, Slot, SlotConfig};
use openlora_sdk::{Money, RequestInfo, Usage};

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
    // An adapter with no recorded owner: its name stands for the owner (`owner_account`), and
    // the adapter's slot is still given the share.
    let ownerless = RequestInfo { adapter_owner: None, ..request("nobody") };
    assert_eq!(ownerless.owner_account().as_deref(), Some("owner:startrek"));
    let o = divided.settle(&ownerless, &usage()).unwrap();
    let built_in = host(PolicyConfig::default()).settle(&ownerless, &usage()).unwrap();
    assert!(built_in.splits.iter().any(|x| x.payee == "owner:startrek" && x.amount > 0), "{:?}", built_in.splits);
    assert!(o.splits.iter().any(|x| x.payee == "contributor:ann"), "divided: {:?}", o.splits);
    assert!(o.deciders.iter().any(|d| d.slot == "adapter:startrek"), "{:?}", o.deciders);
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
