//! Dry-running a candidate attributor for an adapter's `adapter:<name>` slot: it runs in the
//! sandbox on the adapter's recorded entries, each with its recorded request, usage and owner's
//! share, and says what it would have paid beside what was paid. Nothing is installed.

use std::collections::BTreeMap;

use openlora_sdk::money::validate_splits;
use openlora_sdk::{Level, Money, Split, Usage, owner_account};
use serde::Serialize;

use std::sync::Arc;

use super::host::PolicyHost;
use super::plugin::CompiledPlugin;
use super::slot::Slot;
use crate::error::{PolicyError, Result};
use crate::ledger::StoredEntry;

/// Failed calls after which a dry-run stops calling the candidate (a hostile one could
/// otherwise spend a deadline on every entry).
const MAX_FAILURES: usize = 10;

/// The most a dry-run spends calling the candidate; later entries are not run.
const TIME_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);

/// The most log text a dry-run's report carries, as JSON, over all its entries (a candidate may
/// log up to the sandbox's per-call limit on each of a thousand entries); once a line does not
/// fit, it and every later line are counted, not kept.
const LOG_BUDGET_BYTES: usize = 256 << 10;

/// One entry, dry-run.
#[derive(Debug, Clone, Serialize)]
pub struct DryRunEntry {
    /// The request.
    pub request_id: String,
    /// Its place in the ledger.
    pub seq: u64,
    /// The usage the entry records: what the candidate was given beside the request (its
    /// `adapter_contribution_ppm` is what a threshold decides on).
    pub usage: Option<Usage>,
    /// The owner's share the entry records.
    pub share: Option<Money>,
    /// What the share was paid as.
    pub paid: Vec<Split>,
    /// What the candidate would have paid it as.
    pub would_pay: Option<Vec<Split>>,
    /// Why the candidate gave nothing for it.
    pub error: Option<String>,
    /// The candidate's log lines for it (`host.log`, then captured stdout/stderr), while the
    /// report's log budget lasts.
    pub logs: Vec<(Level, String)>,
}

/// A dry-run's report.
#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    /// The slot.
    pub slot: Slot,
    /// Entries the candidate ran on.
    pub checked: usize,
    /// Entries it failed on.
    pub failed: usize,
    /// Entries it was not run on: no owner's share recorded, or the dry-run's failure or time
    /// budget spent.
    pub skipped: usize,
    /// Entry by entry, oldest first.
    pub entries: Vec<DryRunEntry>,
    /// Log lines left out of `entries` once the report carried [`LOG_BUDGET_BYTES`] of them.
    pub logs_dropped: usize,
    /// Sums by payee of what was paid and what would have been, over the entries it ran on.
    pub totals: Totals,
}

/// Sums by payee.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// What was paid.
    pub paid: BTreeMap<String, u128>,
    /// What the candidate would have paid.
    pub would_pay: BTreeMap<String, u128>,
}

/// Why an entry has no `would_pay`.
enum NotRun {
    /// The candidate failed on it.
    Fail(String),
    /// It was not run on it.
    Skip(String),
}
use NotRun::{Fail, Skip};

impl PolicyHost {
    /// Runs `bytes` (with `config`) as `slot`'s attributor on `entries` (those of its adapter).
    pub fn dry_run(&self, slot: &Slot, bytes: &[u8], config: &str, entries: &[StoredEntry]) -> Result<DryRun> {
        if !matches!(slot, Slot::Adapter(_)) {
            return Err(PolicyError::PluginInvalid {
                what: format!("for slot {slot}"),
                message: "dry-runs are for adapters' `adapter:<name>` slots".into(),
            }
            .into());
        }
        let plugin = self.registry.candidate(slot, bytes, config)?;
        Ok(run(&plugin, slot, entries))
    }
}

/// Runs a compiled attributor as `slot`'s on `entries`, each with its recorded request, usage
/// and owner's share (the server's dry-run, and `openlora plugin check --from-ledger`).
pub fn run(plugin: &Arc<CompiledPlugin>, slot: &Slot, entries: &[StoredEntry]) -> DryRun {
    let mut report = DryRun {
        slot: slot.clone(),
        checked: 0,
        failed: 0,
        skipped: 0,
        entries: Vec::new(),
        logs_dropped: 0,
        totals: Totals::default(),
    };
    let mut log_budget = LOG_BUDGET_BYTES;
    let started = std::time::Instant::now();
    for stored in entries {
        let mut row = DryRunEntry {
            request_id: String::new(),
            seq: stored.seq,
            usage: None,
            share: None,
            paid: Vec::new(),
            would_pay: None,
            error: None,
            logs: Vec::new(),
        };
        let ran = (|| {
            let body = stored.parse().map_err(Skip)?;
            row.request_id = body.request_id.clone();
            row.usage = Some(body.usage.clone());
            // The share: recorded (format 3), or the owner's undivided split of an older entry.
            let (amount, paid) = match (&body.owner_share, body.owner_splits()) {
                (Some(o), Some(division)) => (o.amount, division.to_vec()),
                _ => {
                    let owner =
                        body.request.adapter_owner.as_deref().or(body.request.adapter.as_deref()).unwrap_or_default();
                    let undivided = !body.deciders.iter().any(|d| d.slot.starts_with("adapter:"));
                    let split = body.splits.iter().find(|s| undivided && s.payee == owner_account(owner));
                    let split = split.ok_or_else(|| Skip("the entry records no owner's share".into()))?;
                    (split.amount, vec![split.clone()])
                }
            };
            let share = Money::new(amount, body.charge.currency.clone());
            row.share = Some(share.clone());
            row.paid = paid;
            if report.failed >= MAX_FAILURES {
                return Err(Skip("not run: the candidate failed too often".into()));
            }
            if started.elapsed() > TIME_BUDGET {
                return Err(Skip("not run: the dry-run's time budget is spent".into()));
            }
            let called = plugin.attribute(&body.request, &body.usage, &share).map_err(|f| {
                row.logs = f.logs.clone();
                Fail(f.to_string())
            })?;
            row.logs = called.logs;
            validate_splits(&share, &called.value).map_err(Fail)?;
            Ok(called.value)
        })();
        match ran {
            Ok(sub) => {
                report.checked += 1;
                for s in &row.paid {
                    *report.totals.paid.entry(s.payee.clone()).or_default() += u128::from(s.amount);
                }
                for s in &sub {
                    *report.totals.would_pay.entry(s.payee.clone()).or_default() += u128::from(s.amount);
                }
                row.would_pay = Some(sub);
            }
            Err(Fail(e)) => {
                report.failed += 1;
                row.error = Some(e);
            }
            Err(Skip(e)) => {
                report.skipped += 1;
                row.error = Some(e);
            }
        }
        // Each line costs what it takes in the JSON report (escapes included) and a little for
        // its place; the first line over the budget spends it, so no later line is kept.
        row.logs.retain(|(_, line)| {
            let cost = serde_json::to_string(line).map_or(usize::MAX, |j| j.len()).saturating_add(16);
            if cost <= log_budget {
                log_budget -= cost;
                true
            } else {
                log_budget = 0;
                report.logs_dropped += 1;
                false
            }
        });
        report.entries.push(row);
    }
    report
}
