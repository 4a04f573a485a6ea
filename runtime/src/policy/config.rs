//! `[policy]` in the server configuration: sandbox limits and what each slot does on failure.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// The longest `deadline_ms` accepted.
pub const MAX_DEADLINE_MS: u64 = 60_000;

/// Limits every plugin call runs under, and how slots behave; safe defaults for all.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Fuel (roughly, wasm instructions) one call may use.
    pub fuel: u64,
    /// CPU time one call may use, in milliseconds (checked every millisecond); ten times it of
    /// wall time stops a call whatever its CPU time.
    pub deadline_ms: u64,
    /// Most linear memory a plugin instance may grow to, in bytes.
    pub memory_bytes: usize,
    /// Most wasm stack a call may use, in bytes.
    pub stack_bytes: usize,
    /// Most bytes a call may write to stdout and stderr together.
    pub output_bytes: usize,
    /// Largest plugin file accepted, in bytes.
    pub max_plugin_bytes: usize,
    /// Consecutive failures after which a plugin is quarantined (its slot uses the built-in).
    pub quarantine_after: u32,
    /// Failure rate, in percent of its last 100 calls (once it has made 20), at which a plugin
    /// is quarantined; 0 turns the rate rule off.
    pub quarantine_rate_percent: u32,
    /// Configured, instantiated instances kept ready per plugin, off the request path.
    pub warm_instances: usize,
    /// Most warm instances kept ready at once, all plugins together: pools of plugins unused for
    /// 30 s are emptied, and when this is short the least recently used give theirs up first.
    pub warm_instances_total: usize,
    /// Folder watched for `<slot>.wasm` (+ optional `<slot>.json` config) to hot-load;
    /// default `<data_dir>/plugins/drop`.
    pub dir: Option<PathBuf>,
    /// Per-slot settings: `router`, `pricer`, `attributor`.
    pub slots: BTreeMap<String, SlotConfig>,
}

/// How one slot behaves.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlotConfig {
    /// What happens when the slot's plugin fails.
    pub on_failure: OnFailure,
    /// Configuration (any TOML table, passed on as JSON) of the built-in policy that answers
    /// when the slot has no plugin or its plugin fails.
    pub builtin: Option<serde_json::Value>,
}

/// Fail-open or fail-closed.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The built-in policy answers (fail-open).
    #[default]
    Builtin,
    /// The request is refused (fail-closed).
    Reject,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            fuel: 20_000_000,
            deadline_ms: 100,
            memory_bytes: 32 << 20,
            stack_bytes: 512 << 10,
            output_bytes: 64 << 10,
            max_plugin_bytes: 16 << 20,
            quarantine_after: 5,
            quarantine_rate_percent: 20,
            warm_instances: 8,
            warm_instances_total: 256,
            dir: None,
            slots: BTreeMap::new(),
        }
    }
}

impl PolicyConfig {
    /// Checks ranges and slot names; the error is `(field, message)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let positive = [
            ("policy.fuel", self.fuel),
            ("policy.deadline_ms", self.deadline_ms),
            ("policy.memory_bytes", self.memory_bytes as u64),
            ("policy.stack_bytes", self.stack_bytes as u64),
            ("policy.max_plugin_bytes", self.max_plugin_bytes as u64),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err((field.into(), "must be greater than zero".into()));
            }
        }
        if self.deadline_ms > MAX_DEADLINE_MS {
            return Err((
                "policy.deadline_ms".into(),
                format!("at most {MAX_DEADLINE_MS} (a minute of CPU time per call)"),
            ));
        }
        if self.quarantine_rate_percent > 100 {
            return Err(("policy.quarantine_rate_percent".into(), "is a percentage: at most 100".into()));
        }
        if self.warm_instances_total > 512 {
            return Err((
                "policy.warm_instances_total".into(),
                "at most 512 (the instance pool also holds every call in flight)".into(),
            ));
        }
        if self.memory_bytes < 1 << 20 {
            return Err(("policy.memory_bytes".into(), "must be at least 1 MiB (1048576)".into()));
        }
        for name in self.slots.keys() {
            if !["router", "pricer", "attributor"].contains(&name.as_str()) {
                return Err((
                    format!("policy.slots.{name}"),
                    "unknown slot; the slots are router, pricer and attributor".into(),
                ));
            }
        }
        Ok(())
    }

    /// The settings of `slot` (defaults when not configured).
    pub fn slot(&self, slot: &str) -> SlotConfig {
        self.slots.get(slot).cloned().unwrap_or_default()
    }
}
