//! Exact money arithmetic in integer micro-units: nothing is lost to rounding, nothing overflows
//! silently, and parts always add up to the whole.

use crate::types::{Money, Split};

/// Micro-units in one unit of a currency.
pub const MICROS_PER_UNIT: u64 = 1_000_000;

/// Parts per million in a whole (for shares given in ppm).
pub const PPM: u64 = 1_000_000;

/// Splits `total` in proportion to `weights` by the largest-remainder method: each part is
/// `floor(total * w / sum)`, then the micro-units left over go one each to the largest remainders
/// (earlier entries first on ties). The parts always sum to `total` exactly.
///
/// Errors when `weights` is empty or all zero.
pub fn split_by_weights(total: u64, weights: &[u64]) -> Result<Vec<u64>, String> {
    let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    if sum == 0 {
        return Err("split_by_weights needs at least one non-zero weight".into());
    }
    let mut parts = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    let mut given: u128 = 0;
    for (i, &w) in weights.iter().enumerate() {
        let exact = u128::from(total) * u128::from(w);
        let part = exact / sum;
        given += part;
        // part <= total, so it fits in u64.
        parts.push(part as u64);
        remainders.push((exact % sum, i));
    }
    let left = (u128::from(total) - given) as usize;
    // Largest remainder first; ties go to the earlier entry.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders.iter().take(left) {
        parts[i] += 1;
    }
    Ok(parts)
}

/// `floor(total * ppm / 1,000,000)`, exact (no intermediate overflow). `ppm` above a million is an error.
pub fn share_ppm(total: u64, ppm: u64) -> Result<u64, String> {
    if ppm > PPM {
        return Err(format!("a share of {ppm} ppm is more than the whole"));
    }
    Ok((u128::from(total) * u128::from(ppm) / u128::from(PPM)) as u64)
}

/// `tokens * price_per_1k / 1000` rounded half up, or an error on overflow.
pub fn per_thousand(tokens: u32, price_per_1k: u64) -> Result<u64, String> {
    let exact = u128::from(tokens) * u128::from(price_per_1k);
    u64::try_from((exact + 500) / 1000).map_err(|_| format!("{tokens} tokens at {price_per_1k} per 1k overflows u64"))
}

/// The sum of `amounts`, or an error on overflow.
pub fn checked_sum(amounts: impl IntoIterator<Item = u64>) -> Result<u64, String> {
    amounts.into_iter().try_fold(0u64, |acc, a| acc.checked_add(a)).ok_or_else(|| "amounts overflow u64".to_string())
}

/// Checks a charge's currency code: 1 to 16 characters of `A-Z`, `0-9`, `_` or `-`.
pub fn validate_currency(currency: &str) -> Result<(), String> {
    let ok = !currency.is_empty()
        && currency.len() <= 16
        && currency.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(format!("currency {currency:?} is not 1-16 characters of A-Z, 0-9, _ or -")) }
}

/// The most splits one decision may return.
pub const MAX_SPLITS: usize = 256;

/// The longest payee or reason, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// Checks a payee name: 1-256 bytes of ASCII letters, digits and `: . _ @ / + -` (so it reads
/// the same in every log, export and spreadsheet).
pub fn validate_payee(payee: &str) -> Result<(), String> {
    let ok = !payee.is_empty()
        && payee.len() <= MAX_NAME_BYTES
        && payee.bytes().all(|b| b.is_ascii_alphanumeric() || b":._@/+-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "payee {:?} is not 1-{MAX_NAME_BYTES} characters of A-Z, a-z, 0-9 and : . _ @ / + -",
            payee.chars().take(64).collect::<String>()
        ))
    }
}

/// Checks a split's reason: at most 256 bytes of text (see [`validate_text`]).
pub fn validate_reason(reason: &str) -> Result<(), String> {
    validate_text(reason, MAX_NAME_BYTES)
}

/// Checks text a plugin hands the host to show people (a reason): at most `max` bytes, with no
/// control characters (newlines, NUL, escapes) and no bidirectional overrides that would make it
/// read otherwise.
pub fn validate_text(reason: &str, max: usize) -> Result<(), String> {
    if reason.len() > max {
        return Err(format!("a reason is at most {max} bytes"));
    }
    let bidi = |c: char| matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}');
    match reason.chars().find(|&c| c.is_control() || bidi(c)) {
        Some(c) => Err(format!("a reason may not hold control or direction characters ({:?})", c)),
        None => Ok(()),
    }
}

/// Checks a set of splits of `charge` the way the host does before it accepts them: at least one,
/// at most [`MAX_SPLITS`], named payees, bounded text, and amounts that sum to the charge exactly.
pub fn validate_splits(charge: &Money, splits: &[Split]) -> Result<(), String> {
    if splits.is_empty() {
        return Err("no splits: the charge must go to someone".into());
    }
    if splits.len() > MAX_SPLITS {
        return Err(format!("{} splits, more than the {MAX_SPLITS} allowed", splits.len()));
    }
    for (i, s) in splits.iter().enumerate() {
        if s.payee.trim().is_empty() {
            return Err(format!("split {i} has no payee"));
        }
        validate_payee(&s.payee).map_err(|m| format!("split {i}: {m}"))?;
        validate_reason(&s.reason).map_err(|m| format!("split {i}: {m}"))?;
    }
    let sum = checked_sum(splits.iter().map(|s| s.amount)).map_err(|e| format!("splits: {e}"))?;
    if sum != charge.amount {
        return Err(format!("splits sum to {sum} but the charge is {} {}", charge.amount, charge.currency));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payees_and_reasons_are_plain_text() {
        for ok in ["operator:openlora", "contributor:ann", "owner:alice@example.org", "dataset/fortunes+v2", "a.b_c-d"]
        {
            assert!(validate_payee(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "=HYPERLINK(\"x\")", "nul\0", "line\nbreak", "\u{202e}gnp.exe", "é", &"x".repeat(257)] {
            assert!(validate_payee(bad).is_err(), "{bad:?}");
        }
        assert!(validate_reason("adapter share (40%), per contract §3").is_ok());
        for bad in ["tab\there", "new\nline", "nul\0", "\u{1b}[31mred", "\u{202e}reversed", "\u{2066}isolate"] {
            assert!(validate_reason(bad).is_err(), "{bad:?}");
        }
        let charge = Money::new(10, "USD");
        let splits = vec![Split::new("=cmd|' /C calc'!A0", 10, "x")];
        assert!(validate_splits(&charge, &splits).unwrap_err().contains("payee"));
    }

    #[test]
    fn largest_remainder_sums_exactly() {
        assert_eq!(split_by_weights(100, &[1, 1, 1]).unwrap(), vec![34, 33, 33]);
        assert_eq!(split_by_weights(2, &[1, 1, 1]).unwrap(), vec![1, 1, 0]);
        assert_eq!(split_by_weights(10, &[0, 3, 7]).unwrap(), vec![0, 3, 7]);
        assert_eq!(split_by_weights(u64::MAX, &[u64::MAX, u64::MAX]).unwrap(), vec![u64::MAX / 2 + 1, u64::MAX / 2]);
        assert!(split_by_weights(10, &[]).is_err());
        assert!(split_by_weights(10, &[0, 0]).is_err());
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let total = seed % 1_000_000_007;
            let weights: Vec<u64> = (0..(seed % 9 + 1)).map(|i| (seed >> (i * 5)) % 1000 + 1).collect();
            let parts = split_by_weights(total, &weights).unwrap();
            assert_eq!(parts.iter().sum::<u64>(), total);
        }
    }

    #[test]
    fn shares_and_prices_are_exact() {
        assert_eq!(share_ppm(u64::MAX, PPM).unwrap(), u64::MAX);
        assert_eq!(share_ppm(999, 500_000).unwrap(), 499);
        assert!(share_ppm(1, PPM + 1).is_err());
        assert_eq!(per_thousand(1500, 1000).unwrap(), 1500);
        assert_eq!(per_thousand(1, 500).unwrap(), 1);
        assert_eq!(per_thousand(1, 499).unwrap(), 0);
        assert!(per_thousand(u32::MAX, u64::MAX).is_err());
        assert!(checked_sum([u64::MAX, 1]).is_err());
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let charge = Money::new(10, "USD");
        assert!(validate_splits(&charge, &[Split::new("a", 4, ""), Split::new("b", 6, "")]).is_ok());
        let off = validate_splits(&charge, &[Split::new("a", 4, ""), Split::new("b", 5, "")]).unwrap_err();
        assert!(off.contains("sum to 9"), "{off}");
        let overflow = validate_splits(&charge, &[Split::new("a", u64::MAX, ""), Split::new("b", 11, "")]).unwrap_err();
        assert!(overflow.contains("overflow"), "{overflow}");
        assert!(validate_splits(&charge, &[]).is_err());
        assert!(validate_splits(&charge, &[Split::new(" ", 10, "")]).is_err());
    }
}
