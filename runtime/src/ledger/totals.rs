//! Running totals beside the chain: per day, tenant, and payee or adapter, kept in the same
//! transaction as each entry, so usage and summaries read a few rows instead of every entry.
//! Amounts are kept exactly as two integer sums (the high and low 32 bits of each amount), so no
//! database integer overflows however large the amounts.

use std::collections::BTreeMap;

use serde::Serialize;

use super::entry::EntryBody;

/// Milliseconds in a day (totals are kept per UTC day of the entry's write time).
pub const DAY_MS: u64 = 86_400_000;

/// The grouping of an adapter owner's earnings rows, keyed by [`earning_key`].
pub const EARNING: &str = "earning";

/// The key of an earnings row: owner, adapter and payee, `/`-separated (owner and adapter
/// names hold no `/`, so the first two separate them); the empty payee is the owner's whole
/// share, one per entry.
pub fn earning_key(owner: &str, adapter: &str, payee: &str) -> String {
    format!("{owner}/{adapter}/{payee}")
}

/// The table, in a backend's integer type.
pub fn schema(bigint: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS ledger_totals (
            day {bigint} NOT NULL,
            tenant TEXT NOT NULL,
            grouping TEXT NOT NULL,
            key TEXT NOT NULL,
            currency TEXT NOT NULL,
            requests {bigint} NOT NULL,
            amount_hi {bigint} NOT NULL,
            amount_lo {bigint} NOT NULL,
            prompt_tokens {bigint} NOT NULL,
            completion_tokens {bigint} NOT NULL,
            PRIMARY KEY (day, tenant, grouping, key, currency)
        );"
    )
}

/// Adds `rows` rows' counts to the stored rows of the same keys (placeholders numbered from 1,
/// ten per row in column order; the rows' keys must differ).
pub fn upsert(rows: usize, placeholder: fn(usize) -> String) -> String {
    let values: Vec<String> = (0..rows)
        .map(|r| format!("({})", (1..=10).map(|i| placeholder(r * 10 + i)).collect::<Vec<_>>().join(", ")))
        .collect();
    format!(
        "INSERT INTO ledger_totals (day, tenant, grouping, key, currency, requests, amount_hi, amount_lo, \
         prompt_tokens, completion_tokens) VALUES {} ON CONFLICT (day, tenant, grouping, key, currency) DO UPDATE \
         SET requests = ledger_totals.requests + excluded.requests, \
         amount_hi = ledger_totals.amount_hi + excluded.amount_hi, \
         amount_lo = ledger_totals.amount_lo + excluded.amount_lo, \
         prompt_tokens = ledger_totals.prompt_tokens + excluded.prompt_tokens, \
         completion_tokens = ledger_totals.completion_tokens + excluded.completion_tokens",
        values.join(", ")
    )
}

/// The grouped sums of one grouping between two days (`key_column` is `key`, or `tenant` to
/// group adapter rows by tenant); placeholders: grouping, tenant (or NULL), first day, end day.
pub fn query(key_column: &str, placeholder: fn(usize) -> String, cast: &str) -> String {
    let p: Vec<String> = (1..=4).map(placeholder).collect();
    format!(
        "SELECT {key_column}, currency, SUM(requests){cast}, SUM(amount_hi){cast}, SUM(amount_lo){cast}, \
         SUM(prompt_tokens){cast}, SUM(completion_tokens){cast} FROM ledger_totals \
         WHERE grouping = {} AND ({} IS NULL OR tenant = {}) AND day >= {} AND day < {} \
         GROUP BY {key_column}, currency ORDER BY {key_column}, currency",
        p[0], p[1], p[1], p[2], p[3]
    )
}

/// One group's totals: what a summary answers, from the running totals or the entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SummaryRow {
    /// The payee, adapter or tenant.
    pub key: String,
    /// The currency of the amounts.
    pub currency: String,
    /// Entries that count towards it.
    pub requests: u64,
    /// Micro-units: earned (payee) or charged (adapter, tenant).
    pub amount: u128,
    /// Prompt tokens of those entries.
    pub prompt_tokens: u64,
    /// Completion tokens of those entries.
    pub completion_tokens: u64,
}

/// Which sums a summary reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TotalsQuery<'a> {
    /// `payee` or `adapter`.
    pub grouping: &'static str,
    /// Group by tenant instead of by key (adapter rows: each entry has exactly one).
    pub by_tenant: bool,
    /// Only this tenant's.
    pub tenant: Option<&'a str>,
    /// First day (inclusive) and end day (exclusive), days since the epoch.
    pub days: (i64, i64),
}

/// One row of counts to add.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TotalRow {
    /// Days since the Unix epoch.
    pub day: i64,
    /// The tenant.
    pub tenant: String,
    /// `payee` or `adapter`.
    pub grouping: &'static str,
    /// The payee, or the adapter's name (`(base)` for the base model).
    pub key: String,
    /// The currency.
    pub currency: String,
    /// Entries.
    pub requests: i64,
    /// Sum of the amounts' high 32 bits.
    pub amount_hi: i64,
    /// Sum of the amounts' low 32 bits.
    pub amount_lo: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
}

/// An exact amount from its two sums.
pub fn amount(hi: i64, lo: i64) -> u128 {
    ((hi as u128) << 32) + lo as u128
}

/// The rows to add for entries written at `recorded_at_ms`, merged by key.
pub fn rows<'a>(entries: impl IntoIterator<Item = (u64, &'a EntryBody)>) -> Vec<TotalRow> {
    let mut merged: BTreeMap<(i64, String, &'static str, String, String), TotalRow> = BTreeMap::new();
    for (recorded_at_ms, b) in entries {
        let day = (recorded_at_ms / DAY_MS) as i64;
        let mut add = |grouping: &'static str, key: &str, amount: u64| {
            let k = (day, b.tenant.clone(), grouping, key.to_string(), b.charge.currency.clone());
            let r = merged.entry(k).or_insert_with(|| TotalRow {
                day,
                tenant: b.tenant.clone(),
                grouping,
                key: key.to_string(),
                currency: b.charge.currency.clone(),
                ..TotalRow::default()
            });
            r.requests += 1;
            r.amount_hi += (amount >> 32) as i64;
            r.amount_lo += (amount & 0xffff_ffff) as i64;
            r.prompt_tokens += i64::from(b.usage.prompt_tokens);
            r.completion_tokens += i64::from(b.usage.completion_tokens);
        };
        add("adapter", b.adapter.as_ref().map_or("(base)", |a| a.name.as_str()), b.charge.amount);
        // One payee may hold several splits of one entry: counted once, its amounts summed.
        let mut per: BTreeMap<&str, u64> = BTreeMap::new();
        for s in &b.splits {
            *per.entry(s.payee.as_str()).or_default() += s.amount;
        }
        for (payee, amount) in per {
            add("payee", payee, amount);
        }
        // The adapter owner's earnings: its share (payee ``), and its division, payee by payee.
        if let (Some(owner), Some(adapter), Some(division), Some(share)) =
            (b.request.adapter_owner.as_deref(), b.adapter.as_ref(), b.owner_splits(), b.owner_share.as_ref())
        {
            add(EARNING, &earning_key(owner, &adapter.name, ""), share.amount);
            let mut per: BTreeMap<&str, u64> = BTreeMap::new();
            for s in division {
                *per.entry(s.payee.as_str()).or_default() += s.amount;
            }
            for (payee, amount) in per {
                add(EARNING, &earning_key(owner, &adapter.name, payee), amount);
            }
        }
    }
    merged.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_kept_exactly_in_two_sums() {
        let mut body = super::super::entry::tests::sample_body(1);
        body.charge.amount = u64::MAX;
        body.splits = vec![openlora_sdk::Split::new("p", u64::MAX, "all")];
        let r = rows([(0, &body), (DAY_MS - 1, &body)]);
        let payee = r.iter().find(|r| r.grouping == "payee").unwrap();
        assert_eq!(payee.requests, 2, "same day: one row");
        assert_eq!(amount(payee.amount_hi, payee.amount_lo), 2 * u128::from(u64::MAX));
        assert_eq!(rows([(DAY_MS, &body)])[0].day, 1);
    }
}
