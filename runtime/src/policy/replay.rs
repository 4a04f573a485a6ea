//! Replaying a recorded settlement: the pricer and attributors that decided it (plugin bytes by
//! sha256, or the built-ins with their recorded configuration) run again on the recorded
//! request and usage. Plugins see the same clock and randomness (both follow the request), so
//! an honest entry replays to the same charge and splits, to the micro-unit.

use std::collections::HashMap;
use std::sync::Arc;

use openlora_sdk::money::validate_splits;
use openlora_sdk::{RequestInfo, Usage};

use super::builtin::{Builtins, builtin_label};
use super::config::PolicyConfig;
use super::host::divide_owner_share;
use super::plugin::CompiledPlugin;
use super::slot::World;
use super::wasm::{WasmRuntime, sha256_hex};
use crate::error::Result;
use crate::ledger::Decider;
use crate::ledger::verify::{BlobSource, Replay, Replayed};

/// Compiled plugins a replayer keeps at most.
const MAX_LOADED: usize = 64;

/// Replays settlements, keeping each plugin compiled once per configuration.
pub struct Replayer {
    runtime: Arc<WasmRuntime>,
    loaded: HashMap<(String, String, World), Arc<CompiledPlugin>>,
}

impl Replayer {
    /// A replayer with the given sandbox limits (those the server ran under).
    pub fn new(config: &PolicyConfig) -> Result<Self> {
        Ok(Replayer { runtime: WasmRuntime::new(config, None)?, loaded: HashMap::new() })
    }

    fn plugin(
        &mut self,
        d: &Decider,
        world: World,
        blobs: BlobSource<'_>,
    ) -> std::result::Result<Arc<CompiledPlugin>, String> {
        let Some(sha) = d.plugin.strip_prefix("sha256:") else {
            return Err(format!("{}: {} is not a plugin hash", d.slot, d.plugin));
        };
        let config = recorded_config(d, blobs)?;
        let key = (sha.to_string(), config.clone(), world);
        if let Some(p) = self.loaded.get(&key) {
            return Ok(p.clone());
        }
        let bytes = stored(blobs, sha, &d.slot, "plugin")?;
        if self.loaded.len() >= MAX_LOADED {
            // A long-lived replayer (the server's, for `explain`) keeps a bounded set.
            self.loaded.clear();
        }
        let p = self
            .runtime
            .load(&format!("sha256:{sha}"), &bytes, world, &config)
            .map_err(|e| format!("{}: {e}", d.slot))?;
        self.loaded.insert(key, p.clone());
        Ok(p)
    }
}

impl Replay for Replayer {
    fn settle(
        &mut self,
        request: &RequestInfo,
        usage: &Usage,
        deciders: &[Decider],
        blobs: BlobSource<'_>,
    ) -> std::result::Result<Replayed, String> {
        let find = |slot: &str| deciders.iter().find(|d| d.slot == slot);
        let pricer = find("pricer").ok_or("no pricer decision recorded")?;
        let attributor = find("attributor").ok_or("no attributor decision recorded")?;
        let charge = if is_builtin(pricer) {
            builtins(pricer, "pricer", blobs)?.price(request, usage)?
        } else {
            self.plugin(pricer, World::Pricer, blobs)?.price(request, usage).map_err(|f| f.to_string())?.value
        };
        let mut splits = if is_builtin(attributor) {
            builtins(attributor, "attributor", blobs)?.attribute(request, usage, &charge)?
        } else {
            let p = self.plugin(attributor, World::Attributor, blobs)?;
            p.attribute(request, usage, &charge).map_err(|f| f.to_string())?.value
        };
        validate_splits(&charge, &splits).map_err(|m| format!("attributor: {m}"))?;
        let owner = deciders.iter().find(|d| d.slot.starts_with("adapter:"));
        let owner_share = divide_owner_share(request, &charge, &mut splits, |share, original| {
            let Some(owner) = owner.filter(|o| !is_builtin(o)) else { return Ok(vec![original.clone()]) };
            let p = self.plugin(owner, World::Attributor, blobs)?;
            let sub = p.attribute(request, usage, share).map_err(|f| f.to_string())?.value;
            validate_splits(share, &sub).map_err(|m| format!("{}: {m}", owner.slot))?;
            Ok::<_, String>(sub)
        })?;
        Ok(Replayed { charge, splits, owner_share })
    }
}

fn is_builtin(d: &Decider) -> bool {
    d.plugin.starts_with("builtin:")
}

/// Bytes the ledger stores by sha256, checked against it (a database writer cannot swap them).
fn stored(blobs: BlobSource<'_>, sha: &str, slot: &str, what: &str) -> std::result::Result<Vec<u8>, String> {
    let bytes = blobs(sha)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{slot}: {what} sha256:{sha} is not stored in the ledger"))?;
    if sha256_hex(&bytes) != sha {
        return Err(format!("{slot}: the stored {what} sha256:{sha} does not match its hash (it was changed)"));
    }
    Ok(bytes)
}

/// The configuration a decision ran with: inline (format 1) or stored once by sha256.
fn recorded_config(d: &Decider, blobs: BlobSource<'_>) -> std::result::Result<String, String> {
    match (&d.config, &d.config_sha256) {
        (Some(inline), _) => Ok(inline.clone()),
        (None, Some(sha)) => String::from_utf8(stored(blobs, sha, &d.slot, "configuration")?)
            .map_err(|_| format!("{}: configuration sha256:{sha} is not UTF-8", d.slot)),
        (None, None) => Ok(String::new()),
    }
}

/// The built-ins as a decision recorded them, refusing another version's.
fn builtins(d: &Decider, slot: &str, blobs: BlobSource<'_>) -> std::result::Result<Builtins, String> {
    if d.plugin != builtin_label(slot) {
        return Err(format!(
            "{slot}: decided by {}, which this openlora ({}) cannot replay",
            d.plugin,
            builtin_label(slot)
        ));
    }
    let mut configs = [String::new(), String::new(), String::new()];
    configs[if slot == "pricer" { 1 } else { 2 }] = recorded_config(d, blobs)?;
    Builtins::from_json(configs).map_err(|e| e.to_string())
}
