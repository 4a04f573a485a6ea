//! An adapter owner's earnings (its division of its share, by adapter, payee or day) and a
//! contributor's (one payee's part of them), read from the running totals.

use std::collections::BTreeMap;

use serde::Serialize;

use super::entry::EntryBody;
use super::totals::{DAY_MS, EARNING, amount, rows as rows_of};
use crate::error::Result;
use crate::sql::{Db, Val};

/// How earnings are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarningsBy {
    /// By adapter.
    Adapter,
    /// By payee.
    Payee,
    /// By UTC day (`YYYY-MM-DD`).
    Day,
}

impl std::str::FromStr for EarningsBy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "adapter" => Ok(EarningsBy::Adapter),
            "payee" => Ok(EarningsBy::Payee),
            "day" => Ok(EarningsBy::Day),
            _ => Err(format!("`{s}`: by is adapter, payee or day")),
        }
    }
}

/// One day's earnings of one payee from one adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EarningRow {
    /// The UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// The adapter.
    pub adapter: String,
    /// The payee.
    pub payee: String,
    /// The currency.
    pub currency: String,
    /// Micro-units.
    pub amount: u128,
    /// Entries that paid it.
    pub requests: u64,
}

/// One group's earnings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EarningGroup {
    /// The adapter, payee or day.
    pub key: String,
    /// The currency.
    pub currency: String,
    /// Micro-units.
    pub amount: u128,
    /// Entries that paid it (an entry paying several payees counts once per payee).
    pub requests: u64,
}

/// `YYYY-MM-DD` of a day number (days since the Unix epoch).
pub fn day_name(day: i64) -> String {
    // Howard Hinnant's civil-from-days.
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `owner`'s earnings rows: its share per adapter and day (payee ``), then what each payee got
/// (only `payee`'s, when given). Whole-day bounds read the running totals; others read the
/// entries in the range.
pub fn rows(
    db: &mut Db,
    owner: &str,
    payee: Option<&str>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
) -> Result<Vec<EarningRow>> {
    let whole = |t: Option<u64>| t.is_none_or(|t| t % DAY_MS == 0);
    let sums = if whole(since_ms) && whole(until_ms) {
        from_totals(db, owner, since_ms, until_ms)?
    } else {
        from_entries(db, owner, since_ms, until_ms)?
    };
    let mut out = Vec::new();
    for ((day, key, currency), (requests, amount)) in sums {
        let mut parts = key.splitn(3, '/');
        let (Some(o), Some(adapter), Some(p)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let wanted = match payee {
            Some(want) => p == want,
            None => true,
        };
        if o == owner && wanted {
            out.push(EarningRow {
                day: day_name(day),
                adapter: adapter.to_string(),
                payee: p.to_string(),
                currency,
                amount,
                requests,
            });
        }
    }
    Ok(out)
}

/// Sums by (day, key, currency): entries and micro-units.
type Sums = BTreeMap<(i64, String, String), (u64, u128)>;

/// `LIKE` text matching `text` exactly, escaped with `!`.
fn like_escaped(text: &str) -> String {
    text.chars().flat_map(|c| if matches!(c, '!' | '%' | '_') { vec!['!', c] } else { vec![c] }).collect()
}

fn from_totals(db: &mut Db, owner: &str, since_ms: Option<u64>, until_ms: Option<u64>) -> Result<Sums> {
    let first = since_ms.map_or(0, |t| (t / DAY_MS) as i64);
    let end = until_ms.map_or(i64::MAX, |t| (t / DAY_MS).min(i64::MAX as u64) as i64);
    // Keys start with `<owner>/`: LIKE narrows (SQLite's ignores case), `rows` checks exactly.
    let found = db.rows(
        "SELECT day, key, currency, CAST(SUM(requests) AS BIGINT), CAST(SUM(amount_hi) AS BIGINT), \
         CAST(SUM(amount_lo) AS BIGINT) FROM ledger_totals WHERE grouping = $1 AND key LIKE $2 ESCAPE '!' \
         AND day >= $3 AND day < $4 GROUP BY day, key, currency",
        &[EARNING.into(), format!("{}/%", like_escaped(owner)).into(), Val::Int(first), Val::Int(end)],
    )?;
    let int = |v: &Val| v.int().unwrap_or(0);
    Ok(found
        .into_iter()
        .map(|r| {
            ((int(&r[0]), r[1].string(), r[2].string()), (int(&r[3]).max(0) as u64, amount(int(&r[4]), int(&r[5]))))
        })
        .collect())
}

/// The same sums from the entries written in `since_ms..until_ms`, as their transactions added
/// them to the totals.
fn from_entries(db: &mut Db, owner: &str, since_ms: Option<u64>, until_ms: Option<u64>) -> Result<Sums> {
    let pattern = format!("%\"adapter_owner\":\"{}\"%", like_escaped(owner));
    let (since, until) = (since_ms.unwrap_or(0), until_ms.unwrap_or(i64::MAX as u64));
    let mut sums = Sums::new();
    let mut after = 0u64;
    loop {
        let page = db.rows(
            "SELECT seq, recorded_at_ms, body FROM ledger_entries WHERE recorded_at_ms >= $1 AND recorded_at_ms < $2 \
             AND seq > $3 AND body LIKE $4 ESCAPE '!' ORDER BY seq LIMIT 1000",
            &[since.into(), until.into(), after.into(), pattern.clone().into()],
        )?;
        let Some(last) = page.last() else { break };
        after = last[0].int().unwrap_or(0).max(0) as u64;
        for r in &page {
            let Ok(body) = serde_json::from_str::<EntryBody>(&r[2].string()) else { continue };
            if body.request.adapter_owner.as_deref() != Some(owner) {
                continue;
            }
            let at = r[1].int().unwrap_or(0).max(0) as u64;
            for t in rows_of([(at, &body)]).into_iter().filter(|t| t.grouping == EARNING) {
                let s = sums.entry((t.day, t.key, t.currency)).or_default();
                s.0 += t.requests.max(0) as u64;
                s.1 += amount(t.amount_hi, t.amount_lo);
            }
        }
    }
    Ok(sums)
}

/// Rows summed by adapter, payee or day, sorted by key and currency. By adapter or day, an
/// owner's rows count its share (each entry once); a contributor's rows are its payee's alone.
pub fn group(rows: &[EarningRow], by: EarningsBy) -> Vec<EarningGroup> {
    let has_shares = rows.iter().any(|r| r.payee.is_empty());
    let mut sums: BTreeMap<(String, String), (u128, u64)> = BTreeMap::new();
    for r in rows {
        let counted = match by {
            EarningsBy::Payee => !r.payee.is_empty(),
            _ => r.payee.is_empty() || !has_shares,
        };
        if !counted {
            continue;
        }
        let key = match by {
            EarningsBy::Adapter => &r.adapter,
            EarningsBy::Payee => &r.payee,
            EarningsBy::Day => &r.day,
        };
        let s = sums.entry((key.clone(), r.currency.clone())).or_default();
        s.0 += r.amount;
        s.1 += r.requests;
    }
    sums.into_iter()
        .map(|((key, currency), (amount, requests))| EarningGroup { key, currency, amount, requests })
        .collect()
}

/// What each payee got, day by day and adapter by adapter (the share rows left out).
pub fn payouts(rows: &[EarningRow]) -> Vec<&EarningRow> {
    rows.iter().filter(|r| !r.payee.is_empty()).collect()
}

/// Payout rows as CSV with a header line (fields quoted where they need it).
pub fn csv(rows: &[&EarningRow]) -> String {
    let field = |s: &str| {
        if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
    };
    let mut out = String::from("day,adapter,payee,currency,amount,requests\n");
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{}\n",
            r.day,
            field(&r.adapter),
            field(&r.payee),
            field(&r.currency),
            r.amount,
            r.requests
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_named_and_rows_grouped() {
        assert_eq!(day_name(0), "1970-01-01");
        assert_eq!(day_name(20_423), "2025-12-01");
        assert_eq!(day_name(11_016), "2000-02-29");
        let row = |day: &str, adapter: &str, payee: &str, amount| EarningRow {
            day: day.into(),
            adapter: adapter.into(),
            payee: payee.into(),
            currency: "USD".into(),
            amount,
            requests: 1,
        };
        // A contributor's rows: its payee's alone.
        let rows = [row("d1", "a", "p", 5), row("d2", "a", "q", 7), row("d2", "b", "p", 1)];
        let by_payee = group(&rows, EarningsBy::Payee);
        assert_eq!(by_payee.iter().map(|g| (g.key.as_str(), g.amount)).collect::<Vec<_>>(), [("p", 6), ("q", 7)]);
        assert_eq!(group(&rows, EarningsBy::Day)[1].amount, 8);
        // An owner's: by adapter or day, its share rows count each entry once.
        let owner = [row("d1", "a", "", 10), row("d1", "a", "p", 4), row("d1", "a", "q", 6)];
        let by_adapter = group(&owner, EarningsBy::Adapter);
        assert_eq!((by_adapter[0].amount, by_adapter[0].requests), (10, 1));
        assert_eq!(group(&owner, EarningsBy::Payee).len(), 2);
        assert_eq!(payouts(&owner).len(), 2);
        let odd = row("d", "a", "x,\"y\"", 1);
        assert!(csv(&[&odd]).contains("\"x,\"\"y\"\"\""));
    }
}
