//! `openlora plugin check`: validate a plugin exactly as an upload would, then dry-run it on
//! sample requests, reporting each decision (validated as the host validates it), the fuel and
//! time it took, and whether a second run replays it exactly.

use std::time::Instant;

use openlora_sdk::money::{validate_currency, validate_splits};
use openlora_sdk::testing::{sample_request, sample_usage};
use openlora_sdk::{Money, RequestInfo, RouteDecision, Usage};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::config::PolicyConfig;
use super::host::check_rejection;
use super::plugin::{CallFailure, CallStats, CompiledPlugin};
use super::slot::World;
use super::wasm::WasmRuntime;
use crate::error::{Error, Result};

/// One sample to dry-run: a request, what it used, and (for attributors) the charge to split.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    /// The request.
    pub request: RequestInfo,
    /// What it used.
    #[serde(default)]
    pub usage: Usage,
    /// The charge an attributor splits (default: 1 unit of USD).
    #[serde(default)]
    pub charge: Option<Money>,
}

/// The built-in samples: an adapter request, one where the adapter barely contributed (a
/// threshold's other side, with a charge to split), a base-model request, a long one and an
/// empty one.
pub fn default_samples() -> Vec<Sample> {
    let base = RequestInfo { adapter: None, adapter_owner: None, requested_model: "base".into(), ..sample_request() };
    let long = Usage { prompt_tokens: 32_000, completion_tokens: 4_000, ..sample_usage() };
    let empty = Usage { completion_tokens: 0, adapter_contribution_ppm: 0, ..sample_usage() };
    let faint = Usage { adapter_contribution_ppm: 20_000, ..sample_usage() };
    vec![
        Sample { request: sample_request(), usage: sample_usage(), charge: Some(Money::new(1_000_003, "USD")) },
        Sample { request: sample_request(), usage: faint, charge: Some(Money::new(700_001, "USD")) },
        Sample { request: base, usage: sample_usage(), charge: Some(Money::new(999, "USD")) },
        Sample { request: sample_request(), usage: long, charge: Some(Money::new(u64::MAX / 3, "USD")) },
        Sample { request: sample_request(), usage: empty, charge: Some(Money::new(0, "USD")) },
    ]
}

/// What the check found.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// The world the plugin exports.
    pub world: World,
    /// Its sha256.
    pub sha256: String,
    /// Its size in bytes.
    pub size: usize,
    /// What it imports (all within the allow-list, or it would have been refused).
    pub imports: Vec<String>,
    /// Milliseconds to validate, compile and configure it.
    pub load_ms: f64,
    /// The CPU time one call may use (`[policy] deadline_ms`), beside each sample's `cpu_micros`.
    pub deadline_ms: u64,
    /// One entry per sample.
    pub samples: Vec<Value>,
    /// Whether every sample gave a valid, replayable decision.
    pub ok: bool,
}

/// One call's decision, its cost, and the lines the plugin logged.
type Decided = (Value, CallStats, Vec<Value>);

fn decide(plugin: &std::sync::Arc<CompiledPlugin>, s: &Sample) -> std::result::Result<Decided, CallFailure> {
    let invalid = |m: String| CallFailure::new(super::plugin::FailureKind::Invalid, m);
    let logs = |l: &[(openlora_sdk::Level, String)]| l.iter().map(|(level, line)| json!([level, line])).collect();
    match plugin.world {
        World::Router => {
            let c = plugin.route(&s.request)?;
            if let RouteDecision::Reject(r) = &c.value {
                check_rejection(r).map_err(invalid)?;
            }
            Ok((json!(c.value), c.stats, logs(&c.logs)))
        }
        World::Pricer => {
            let c = plugin.price(&s.request, &s.usage)?;
            validate_currency(&c.value.currency).map_err(invalid)?;
            Ok((json!(c.value), c.stats, logs(&c.logs)))
        }
        World::Attributor => {
            let charge = s.charge.clone().unwrap_or_else(|| Money::new(1_000_000, "USD"));
            let c = plugin.attribute(&s.request, &s.usage, &charge)?;
            validate_splits(&charge, &c.value).map_err(invalid)?;
            Ok((json!({"charge": charge, "splits": c.value}), c.stats, logs(&c.logs)))
        }
    }
}

/// Validates `bytes` as a plugin (of `world`, or whichever it exports) configured with `config`,
/// then dry-runs it on `samples` twice each. Refusal is an error; failed samples are reported.
pub fn check(
    what: &str,
    bytes: &[u8],
    world: Option<World>,
    config: &str,
    samples: &[Sample],
    limits: &PolicyConfig,
) -> Result<CheckReport> {
    let runtime = WasmRuntime::new(limits, None)?;
    let start = Instant::now();
    let world = match world {
        Some(w) => w,
        None => runtime.detect_world(what, bytes)?,
    };
    let plugin = runtime.load(what, bytes, world, config)?;
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut ok = true;
    let mut out = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let first = decide(&plugin, s);
        let again = decide(&plugin, s);
        // What the plugin was given, beside what it decided and logged.
        let inputs = json!({"request": s.request, "usage": s.usage, "charge": s.charge});
        let entry = match (first, again) {
            (Ok((v, stats, logs)), Ok((w, _, _))) => {
                let replays = v == w;
                ok &= replays;
                json!({"sample": i, "inputs": inputs, "decision": v, "logs": logs, "fuel": stats.fuel,
                       "micros": stats.micros, "cpu_micros": stats.cpu_micros, "replays_exactly": replays})
            }
            (Err(e), _) | (_, Err(e)) => {
                ok = false;
                json!({"sample": i, "inputs": inputs, "failure": e.to_string()})
            }
        };
        out.push(entry);
    }
    Ok(CheckReport {
        world,
        sha256: plugin.sha256.clone(),
        size: plugin.size,
        imports: runtime.imports(bytes),
        load_ms,
        deadline_ms: limits.deadline_ms,
        samples: out,
        ok,
    })
}

/// Reads samples from a JSON file (a list of `{"request", "usage", "charge"}`); errors name the file.
pub fn read_samples(path: &std::path::Path) -> Result<Vec<Sample>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut de = serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(&mut de)
        .map_err(|e| Error::config(path, e.path().to_string(), e.inner().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_samples_file_parses_as_samples() {
        let text = include_str!("../../../examples/plugin-samples.json");
        let samples: Vec<Sample> = serde_json::from_str(text).expect("examples/plugin-samples.json");
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].request.metadata("project"), Some("demo"));
        assert_eq!(samples[1].usage.queue_ms, 0, "absent usage fields are 0");
    }
}
