//! Helpers for the policy tests: plugins built once per process, a host, and the request and
//! usage the tests settle.

use std::collections::HashMap;
use std::sync::OnceLock;

use openlora::metrics::Metrics;
use openlora::policy::{PolicyConfig, PolicyHost, Slot};
use openlora_sdk::{RequestInfo, Usage};

use super::plugin_wasm;

/// Each plugin is built once per test process.
pub fn wasm(package: &str) -> Vec<u8> {
    static CACHE: OnceLock<std::sync::Mutex<HashMap<String, Vec<u8>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(b) = cache.lock().unwrap().get(package) {
        return b.clone();
    }
    let bytes = plugin_wasm(package);
    cache.lock().unwrap().insert(package.to_string(), bytes.clone());
    bytes
}

/// A policy host with `config` and fresh metrics.
pub fn host(config: PolicyConfig) -> PolicyHost {
    PolicyHost::new(&config, None, Metrics::new().policy).expect("policy host")
}

/// A request for the adapter `startrek` (owner `trekkie`) with id `id`.
pub fn request(id: &str) -> RequestInfo {
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

/// A request's usage with every field set.
pub fn usage() -> Usage {
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

/// Whether an adapter of that name exists (three do).
pub fn exists(name: &str) -> bool {
    ["startrek", "computers", "love"].contains(&name)
}

/// Two separate hosts with the hostile attributor in `mode`: a first run and a replay.
pub fn twin_hosts(mode: &str) -> (PolicyHost, PolicyHost) {
    let config = format!(r#"{{"mode": "{mode}"}}"#);
    let install = || {
        let h = host(PolicyConfig::default());
        h.install(&Slot::Attributor, &wasm("openlora-test-hostile"), &config, "test").unwrap();
        h
    };
    (install(), install())
}

/// [`request`] telling the hostile attributor to behave as `mode`.
pub fn with_mode(id: &str, mode: &str) -> RequestInfo {
    let mut r = request(id);
    r.metadata.push(("hostile-mode".into(), mode.into()));
    r
}
