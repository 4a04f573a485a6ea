//! `openlora plugin new` (a plugin crate from a template) and `openlora plugin check
//! --from-ledger` (a candidate attributor run on an adapter's recorded traffic, as the server's
//! dry-run does, from the command line).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use openlora::ledger::explain::latest_of_adapter;
use openlora::policy::check::Sample;
use openlora::policy::dry_run::{DryRun, run};
use openlora::policy::{Slot, WasmRuntime, World};

use crate::LedgerArgs;

/// Runs the attributor in `bytes` (with `config`) as `slot`'s on the adapter's latest `limit`
/// entries written in `range` of the ledger `server` names; false when it failed on any.
pub fn check_on_ledger(
    server: &LedgerArgs,
    file: &Path,
    bytes: &[u8],
    config: &str,
    slot: &str,
    (range, limit): ((Option<u64>, Option<u64>), usize),
    json: bool,
) -> anyhow::Result<bool> {
    let Some(Slot::Adapter(adapter)) = parse_slot(slot)? else {
        anyhow::bail!("--from-ledger runs an adapter's attributor: give --slot adapter:NAME");
    };
    let slot = Slot::Adapter(adapter.clone());
    let (server_config, location) = server.location(false)?;
    let runtime = WasmRuntime::new(&server_config.policy, None)?;
    let plugin = runtime.load(&file.display().to_string(), bytes, World::Attributor, config)?;
    let mut db = location.connect().with_context(|| format!("opening the ledger {location}"))?;
    let entries = latest_of_adapter(&mut db, &adapter, range, limit.clamp(1, 1000))?;
    let report = run(&plugin, &slot, &entries);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&report));
    }
    Ok(report.failed == 0)
}

/// `--slot operator`: the operator's slot of the plugin's world (router, pricer or attributor).
pub const OPERATOR: &str = "operator";

/// `--slot`: the slot named, or `None` for `operator` (the operator's slot of the plugin's world).
fn parse_slot(slot: &str) -> anyhow::Result<Option<Slot>> {
    if slot == OPERATOR {
        return Ok(None);
    }
    slot.parse().map(Some).map_err(|e: String| anyhow::anyhow!("--slot: {e} (or {OPERATOR})"))
}

/// Samples as `slot` sees them: in an `adapter:NAME` slot, only requests on an adapter, made on
/// NAME (the operator's slots see every sample).
pub fn as_slot_sees(samples: Vec<Sample>, slot: &str) -> anyhow::Result<Vec<Sample>> {
    let Some(Slot::Adapter(name)) = parse_slot(slot)? else { return Ok(samples) };
    let on_adapters: Vec<Sample> = samples
        .into_iter()
        .filter(|s| s.request.adapter.is_some())
        .map(|mut s| {
            s.request.adapter = Some(name.clone());
            s.request.requested_model = name.clone();
            s
        })
        .collect();
    anyhow::ensure!(!on_adapters.is_empty(), "--slot adapter:{name}: no sample is a request on an adapter");
    Ok(on_adapters)
}

/// A dry-run as text: entry by entry, then the totals.
fn text(r: &DryRun) -> String {
    let splits = |v: &[openlora_sdk::Split]| {
        v.iter().map(|s| format!("{} {}", s.payee, s.amount)).collect::<Vec<_>>().join(", ")
    };
    let mut out = format!(
        "{} entries of {}: {} run, {} failed, {} skipped\n",
        r.entries.len(),
        r.slot,
        r.checked,
        r.failed,
        r.skipped
    );
    for e in &r.entries {
        let share = e.share.as_ref().map_or("-".to_string(), |m| format!("{} {}", m.amount, m.currency));
        out += &format!("entry {} ({}): share {share}\n", e.seq, e.request_id);
        if let Some(u) = &e.usage {
            out += &format!(
                "  usage:     {} prompt + {} completion tokens, contribution {} ppm\n",
                u.prompt_tokens, u.completion_tokens, u.adapter_contribution_ppm
            );
        }
        out += &format!("  paid:      {}\n", splits(&e.paid));
        match (&e.would_pay, &e.error) {
            (Some(w), _) => out += &format!("  would pay: {}\n", splits(w)),
            (None, Some(why)) => out += &format!("  not paid:  {why}\n"),
            (None, None) => {}
        }
        for (level, line) in &e.logs {
            out += &format!("  log {} {}\n", serde_json::json!(level), serde_json::json!(line));
        }
    }
    let totals = |m: &std::collections::BTreeMap<String, u128>| {
        m.iter().map(|(p, a)| format!("{p} {a}")).collect::<Vec<_>>().join(", ")
    };
    if r.logs_dropped > 0 {
        out += &format!("({} log lines left out: the report's log budget is spent)\n", r.logs_dropped);
    }
    out += &format!("total paid:      {}\ntotal would pay: {}\n", totals(&r.totals.paid), totals(&r.totals.would_pay));
    out
}

/// `openlora plugin new`.
#[derive(Args)]
pub struct NewArgs {
    /// The crate's name (a-z 0-9 - _); also its folder unless --dir says otherwise.
    name: String,
    /// The world it exports: router, pricer or attributor.
    #[arg(long)]
    world: String,
    /// Where to create it (default: ./NAME).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// openlora's `sdk` folder (default: the one of the checkout this binary was built from).
    #[arg(long)]
    sdk: Option<PathBuf>,
}

/// Creates the crate and says what to run next.
pub fn run_new(args: NewArgs) -> anyhow::Result<()> {
    use openlora::policy::template::{NewPlugin, generate};
    let world: World = args.world.parse().map_err(|e: String| anyhow::anyhow!("--world: {e}"))?;
    let sdk = args.sdk.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk"));
    let sdk = sdk.canonicalize().with_context(|| format!("the SDK folder {} (give --sdk)", sdk.display()))?;
    // The lock file of the SDK's checkout, else of the checkout this binary was built from.
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    let lockfile = sdk.parent().map(|root| root.join("Cargo.lock")).filter(|l| l.is_file()).or(Some(built_from));
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    let plugin = NewPlugin { dir: &dir, name: &args.name, world, sdk: &sdk, lockfile: lockfile.as_deref() };
    let files = generate(&plugin)?;
    for f in &files {
        println!("created {}", f.display());
    }
    println!("next: cd {} && cargo test && cargo build --release --target wasm32-wasip2", dir.display());
    Ok(())
}
