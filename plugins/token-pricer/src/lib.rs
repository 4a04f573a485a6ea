//! The official pricer: a price per 1,000 prompt and completion tokens, per adapter, in integer
//! micro-units (rounded half up per token kind).
//!
//! Config (JSON, all optional): `{"currency": "USD", "default": {"prompt_per_1k": 100,
//! "completion_per_1k": 300}, "base": {...}, "adapters": {"startrek": {...}}, "minimum": 0}`

use std::collections::BTreeMap;

use openlora_sdk::money::{checked_sum, per_thousand, validate_currency};
use openlora_sdk::{Money, Pricer, RequestInfo, Usage};
use serde::Deserialize;

/// Prices per 1,000 tokens, in micro-units.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Per 1,000 prompt tokens.
    pub prompt_per_1k: u64,
    /// Per 1,000 generated tokens.
    pub completion_per_1k: u64,
}

/// The price table an operator configures.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Currency of every price.
    pub currency: String,
    /// The rate of adapters not listed under `adapters`.
    pub default: Rate,
    /// The rate of requests served by the base model alone (default: `default`).
    pub base: Option<Rate>,
    /// Rates per adapter name.
    pub adapters: BTreeMap<String, Rate>,
    /// The least a request that produced a token is charged.
    pub minimum: u64,
}

impl Default for Config {
    /// The compiled-in table: USD 0.10 per 1k prompt tokens and 0.30 per 1k generated tokens.
    fn default() -> Self {
        Config {
            currency: "USD".into(),
            default: Rate { prompt_per_1k: 100_000, completion_per_1k: 300_000 },
            base: None,
            adapters: BTreeMap::new(),
            minimum: 0,
        }
    }
}

/// The official token pricer.
pub struct TokenPricer;

impl Pricer for TokenPricer {
    type Config = Config;

    fn check_config(config: &Config) -> Result<(), String> {
        validate_currency(&config.currency)
    }

    fn price(config: &Config, request: &RequestInfo, usage: &Usage) -> Result<Money, String> {
        let rate = match &request.adapter {
            Some(a) => config.adapters.get(a).copied().unwrap_or(config.default),
            None => config.base.unwrap_or(config.default),
        };
        let amount = checked_sum([
            per_thousand(usage.prompt_tokens, rate.prompt_per_1k)?,
            per_thousand(usage.completion_tokens, rate.completion_per_1k)?,
        ])?;
        let amount = if usage.completion_tokens > 0 { amount.max(config.minimum) } else { amount };
        Ok(Money::new(amount, config.currency.clone()))
    }
}

openlora_sdk::export_pricer!(TokenPricer);

#[cfg(test)]
mod tests {
    use openlora_sdk::testing::{run_pricer, sample_request, sample_usage};

    use super::*;

    #[test]
    fn prices_by_adapter_table() {
        let config = r#"{"currency": "EUR", "default": {"prompt_per_1k": 1000, "completion_per_1k": 3000},
            "adapters": {"startrek": {"prompt_per_1k": 2000, "completion_per_1k": 4000}}, "minimum": 500}"#;
        let (mut r, mut u) = (sample_request(), sample_usage());
        // 200 + 200 for startrek, lifted to the minimum of 500.
        assert_eq!(run_pricer::<TokenPricer>(config, &r, &u).unwrap(), Money::new(500, "EUR"));
        r.adapter = Some("other".into());
        assert_eq!(run_pricer::<TokenPricer>(config, &r, &u).unwrap(), Money::new(100 + 150, "EUR").max_amount(500));
        u.completion_tokens = 0;
        assert_eq!(run_pricer::<TokenPricer>(config, &r, &u).unwrap(), Money::new(100, "EUR"));
    }

    #[test]
    fn compiled_in_table_and_overflow() {
        let (r, mut u) = (sample_request(), sample_usage());
        assert_eq!(run_pricer::<TokenPricer>("", &r, &u).unwrap(), Money::new(10_000 + 15_000, "USD"));
        u.completion_tokens = u32::MAX;
        let huge = r#"{"default": {"prompt_per_1k": 18446744073709551615, "completion_per_1k": 18446744073709551615}}"#;
        assert!(run_pricer::<TokenPricer>(huge, &r, &u).unwrap_err().contains("overflow"));
        assert!(run_pricer::<TokenPricer>(r#"{"currency": "usd"}"#, &r, &u).is_err());
    }

    trait MaxAmount {
        fn max_amount(self, m: u64) -> Self;
    }
    impl MaxAmount for Money {
        fn max_amount(mut self, m: u64) -> Self {
            self.amount = self.amount.max(m);
            self
        }
    }
}
