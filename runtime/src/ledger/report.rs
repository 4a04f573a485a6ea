//! Reading the ledger out: exports (CSV, one row per split; JSONL, one line per entry) and
//! summaries by payee, adapter or tenant. Totals are exact integers (u128, never floats).

use std::collections::BTreeMap;
use std::io::Write;
use std::str::FromStr;

use serde_json::json;

use super::entry::{EntryBody, StoredEntry};
use super::store::{Filter, LedgerStore};
pub use super::totals::SummaryRow;
use super::totals::{DAY_MS, TotalsQuery};
use crate::error::{Error, LedgerError, Result};

/// Entries read per query.
const PAGE: usize = 1000;

/// Calls `f` on every entry matching the filter (all of its conditions), in order.
pub fn for_each(
    store: &mut dyn LedgerStore,
    filter: &Filter,
    mut f: impl FnMut(&StoredEntry, EntryBody) -> Result<()>,
) -> Result<()> {
    let mut last = 0;
    loop {
        let page = store.page(filter, last, PAGE)?;
        let Some(end) = page.last().map(|e| e.seq) else { return Ok(()) };
        for e in &page {
            let body = e.parse().map_err(LedgerError::Invalid)?;
            if filter.admits(&body) {
                f(e, body)?;
            }
        }
        last = end;
    }
}

/// Parses a time bound: Unix seconds, `YYYY-MM-DD` (midnight UTC) or `YYYY-MM-DDTHH:MM:SSZ`;
/// returns milliseconds since the epoch.
pub fn parse_time(text: &str) -> std::result::Result<u64, String> {
    let bad = || format!("{text:?} is not a time (Unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ)");
    if let Ok(secs) = text.parse::<u64>() {
        return secs.checked_mul(1000).ok_or_else(bad);
    }
    let (date, time) = text.split_once('T').unwrap_or((text, "00:00:00Z"));
    let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
    let d: Vec<&str> = date.split('-').collect();
    let t: Vec<&str> = time.strip_suffix('Z').ok_or_else(bad)?.split(':').collect();
    if d.len() != 3 || t.len() != 3 || d[0].len() != 4 {
        return Err(bad());
    }
    let (y, m, day) = (num(d[0])?, num(d[1])?, num(d[2])?);
    let (hh, mm, ss) = (num(t[0])?, num(t[1])?, num(t[2])?);
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || hh > 23
        || mm > 59
        || ss > 60
    {
        return Err(bad());
    }
    // Days from the civil date (Howard Hinnant's algorithm), for the proleptic Gregorian calendar.
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(((days * 86_400) + hh * 3600 + mm * 60 + ss) * 1000)
}

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One row per split (an entry without splits: one row with an empty payee), with the
    /// entry's usage and deciders on every row.
    Csv,
    /// One JSON object per entry: its place in the chain and its whole body.
    Jsonl,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "csv" => Ok(Format::Csv),
            "jsonl" => Ok(Format::Jsonl),
            other => Err(format!("unknown format {other:?} (csv or jsonl)")),
        }
    }
}

const CSV_HEADER: &str = "seq,recorded_at_ms,request_id,tenant,base_model,adapter,outcome,finish,prompt_tokens,\
completion_tokens,currency,charge,payee,amount,reason,hash,adapter_owner,queue_ms,compute_ms,adapter_load_ms,steps,\
batch_share_ppm,adapter_contribution_ppm,deciders";

/// The deciders of an entry in one field: `slot=plugin@vN` (the version only for installed
/// plugins; `!` after a decider whose plugin failed and whose built-in answered), `;`-separated.
fn deciders_field(b: &EntryBody) -> String {
    let one = |d: &super::entry::Decider| {
        let version = d.version.map(|v| format!("@v{v}")).unwrap_or_default();
        let failed = if d.failure.is_some() { "!" } else { "" };
        format!("{}={}{version}{failed}", d.slot, d.plugin)
    };
    b.deciders.iter().map(one).collect::<Vec<_>>().join(";")
}

/// A CSV field, quoted when it needs to be; a field a spreadsheet would read as a formula
/// (starting with `=`, `+`, `-`, `@`, a tab or a carriage return) is prefixed with `'` so it
/// stays text (OWASP's advice for CSV injection).
fn csv(field: &str) -> String {
    let field = if field.starts_with(['=', '+', '-', '@', '\t', '\r']) && field.parse::<f64>().is_err() {
        format!("'{field}")
    } else {
        field.to_string()
    };
    if field.contains([',', '"', '\n', '\r']) { format!("\"{}\"", field.replace('"', "\"\"")) } else { field }
}

/// Writes the matching entries to `out`; returns how many.
pub fn export(store: &mut dyn LedgerStore, filter: &Filter, format: Format, out: &mut dyn Write) -> Result<u64> {
    let io = |e: std::io::Error| Error::from(LedgerError::Export(e));
    let mut n = 0;
    if format == Format::Csv {
        writeln!(out, "{CSV_HEADER}").map_err(io)?;
    }
    for_each(store, filter, |e, b| {
        n += 1;
        match format {
            Format::Jsonl => {
                let line = json!({"seq": e.seq, "recorded_at_ms": e.recorded_at_ms, "prev_hash": e.prev_hash,
                    "hash": e.hash, "entry": b});
                writeln!(out, "{line}").map_err(io)
            }
            Format::Csv => {
                let adapter = b.adapter.as_ref().map(|a| a.name.as_str()).unwrap_or("");
                let fixed = [
                    e.seq.to_string(),
                    e.recorded_at_ms.to_string(),
                    csv(&b.request_id),
                    csv(&b.tenant),
                    csv(&b.base_model.name),
                    csv(adapter),
                    b.outcome.as_str().to_string(),
                    csv(&b.finish),
                    b.usage.prompt_tokens.to_string(),
                    b.usage.completion_tokens.to_string(),
                    csv(&b.charge.currency),
                    b.charge.amount.to_string(),
                ]
                .join(",");
                let u = &b.usage;
                let after = [
                    e.hash.clone(),
                    csv(b.request.adapter_owner.as_deref().unwrap_or("")),
                    u.queue_ms.to_string(),
                    u.compute_ms.to_string(),
                    u.adapter_load_ms.to_string(),
                    u.steps.to_string(),
                    u.batch_share_ppm.to_string(),
                    u.adapter_contribution_ppm.to_string(),
                    csv(&deciders_field(&b)),
                ]
                .join(",");
                if b.splits.is_empty() {
                    writeln!(out, "{fixed},,,,{after}").map_err(io)?;
                }
                for s in &b.splits {
                    writeln!(out, "{fixed},{},{},{},{after}", csv(&s.payee), s.amount, csv(&s.reason)).map_err(io)?;
                }
                Ok(())
            }
        }
    })?;
    Ok(n)
}

/// What a summary groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// Who is paid: each split's payee, its amounts summed.
    Payee,
    /// Which adapter served (`(base)` for the base model): charges summed.
    Adapter,
    /// Who asked: charges summed.
    Tenant,
}

impl FromStr for GroupBy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "payee" => Ok(GroupBy::Payee),
            "adapter" => Ok(GroupBy::Adapter),
            "tenant" => Ok(GroupBy::Tenant),
            other => Err(format!("unknown grouping {other:?} (payee, adapter or tenant)")),
        }
    }
}

/// Totals per group (and currency), sorted by key: from the running totals when the time bounds
/// fall on whole (UTC) days and no adapter or owner is asked for, else by reading the entries.
pub fn summary(store: &mut dyn LedgerStore, filter: &Filter, by: GroupBy) -> Result<Vec<SummaryRow>> {
    let whole_day = |t: Option<u64>| t.is_none_or(|t| t.is_multiple_of(DAY_MS));
    if whole_day(filter.since_ms) && whole_day(filter.until_ms) && filter.by_time_and_tenant_only() {
        let query = TotalsQuery {
            grouping: if by == GroupBy::Payee { "payee" } else { "adapter" },
            by_tenant: by == GroupBy::Tenant,
            tenant: filter.tenant.as_deref(),
            days: (
                filter.since_ms.map_or(0, |t| (t / DAY_MS) as i64),
                filter.until_ms.map_or(i64::MAX, |t| (t / DAY_MS).min(i64::MAX as u64) as i64),
            ),
        };
        return store.totals(&query);
    }
    scan_summary(store, filter, by)
}

/// [`summary`] by reading every matching entry.
pub fn scan_summary(store: &mut dyn LedgerStore, filter: &Filter, by: GroupBy) -> Result<Vec<SummaryRow>> {
    let mut rows: BTreeMap<(String, String), SummaryRow> = BTreeMap::new();
    for_each(store, filter, |_, b| {
        let mut add = |key: &str, amount: u64| {
            let currency = b.charge.currency.clone();
            let r = rows.entry((key.to_string(), currency.clone())).or_insert_with(|| SummaryRow {
                key: key.to_string(),
                currency,
                ..Default::default()
            });
            r.requests += 1;
            r.amount += u128::from(amount);
            r.prompt_tokens += u64::from(b.usage.prompt_tokens);
            r.completion_tokens += u64::from(b.usage.completion_tokens);
        };
        match by {
            GroupBy::Payee => {
                // One payee may hold several splits of one entry: count the entry once.
                let mut per: BTreeMap<&str, u64> = BTreeMap::new();
                for s in &b.splits {
                    *per.entry(s.payee.as_str()).or_default() += s.amount;
                }
                for (payee, amount) in per {
                    add(payee, amount);
                }
            }
            GroupBy::Adapter => add(b.adapter.as_ref().map_or("(base)", |a| a.name.as_str()), b.charge.amount),
            GroupBy::Tenant => add(&b.tenant, b.charge.amount),
        }
        Ok(())
    })?;
    Ok(rows.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_to_epoch_milliseconds() {
        assert_eq!(parse_time("0").unwrap(), 0);
        assert_eq!(parse_time("1700000000").unwrap(), 1_700_000_000_000);
        assert_eq!(parse_time("1970-01-01").unwrap(), 0);
        assert_eq!(parse_time("2023-11-14T22:13:20Z").unwrap(), 1_700_000_000_000);
        assert_eq!(parse_time("2000-03-01").unwrap(), 951_868_800_000);
        for bad in ["", "yesterday", "2023-13-01", "2023-11-14T22:13:20", "23-11-14"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv("plain"), "plain");
        assert_eq!(csv("a,b"), "\"a,b\"");
        assert_eq!(csv("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv("=HYPERLINK(\"http://x\",\"y\")"), "\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\"");
        assert_eq!(csv("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv("-5"), "-5", "a number stays a number");
    }
}
