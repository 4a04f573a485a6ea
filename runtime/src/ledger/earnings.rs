//! An adapter owner's earnings (its division of its share, by adapter, payee or day) and a
//! contributor's (one payee's part of them), read from the running totals.

use std::collections::BTreeMap;

use serde::Serialize;

use super::totals::{DAY_MS, EARNING, amount};
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

/// `owner`'s earnings rows (only `payee`'s, when given) on the whole UTC days that hold
/// `since_ms..until_ms`.
pub fn rows(
    db: &mut Db,
    owner: &str,
    payee: Option<&str>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
) -> Result<Vec<EarningRow>> {
    let first = since_ms.map_or(0, |t| (t / DAY_MS) as i64);
    let end = until_ms.map_or(i64::MAX, |t| t.div_ceil(DAY_MS).min(i64::MAX as u64) as i64);
    // Keys start with `<owner>/`; `0` is the character after `/`.
    let found = db.rows(
        "SELECT day, key, currency, CAST(SUM(requests) AS BIGINT), CAST(SUM(amount_hi) AS BIGINT), \
         CAST(SUM(amount_lo) AS BIGINT) FROM ledger_totals WHERE grouping = $1 AND key >= $2 AND key < $3 \
         AND day >= $4 AND day < $5 GROUP BY day, key, currency ORDER BY day, key, currency",
        &[EARNING.into(), format!("{owner}/").into(), format!("{owner}0").into(), Val::Int(first), Val::Int(end)],
    )?;
    let mut out = Vec::new();
    for r in found {
        let key = r[1].string();
        let mut parts = key.splitn(3, '/');
        let (Some(_), Some(adapter), Some(p)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if payee.is_some_and(|want| want != p) {
            continue;
        }
        let int = |i: usize| r[i].int().unwrap_or(0);
        out.push(EarningRow {
            day: day_name(int(0)),
            adapter: adapter.to_string(),
            payee: p.to_string(),
            currency: r[2].string(),
            amount: amount(int(4), int(5)),
            requests: int(3).max(0) as u64,
        });
    }
    Ok(out)
}

/// Rows summed by adapter, payee or day, sorted by key and currency.
pub fn group(rows: &[EarningRow], by: EarningsBy) -> Vec<EarningGroup> {
    let mut sums: BTreeMap<(String, String), (u128, u64)> = BTreeMap::new();
    for r in rows {
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

/// Rows as CSV with a header line (fields quoted where they need it).
pub fn csv(rows: &[EarningRow]) -> String {
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
        let rows = [row("d1", "a", "p", 5), row("d2", "a", "q", 7), row("d2", "b", "p", 1)];
        let by_payee = group(&rows, EarningsBy::Payee);
        assert_eq!(by_payee.iter().map(|g| (g.key.as_str(), g.amount)).collect::<Vec<_>>(), [("p", 6), ("q", 7)]);
        assert_eq!(group(&rows, EarningsBy::Day)[1].amount, 8);
        assert!(csv(&[row("d", "a", "x,\"y\"", 1)]).contains("\"x,\"\"y\"\"\""));
    }
}
