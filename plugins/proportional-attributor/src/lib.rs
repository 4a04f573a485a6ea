//! The official operator attributor: the operator takes a fixed share, and the rest is divided
//! between the base-model owner and the adapter owner in proportion to the adapter's measured
//! contribution to the output. Exact: largest-remainder split of integer micro-units.
//!
//! Config (JSON, all optional): `{"base_owner": "base:openlora", "operator": "operator:openlora",
//! "operator_ppm": 100000, "adapter_multiplier_ppm": 1000000, "adapter_floor_ppm": 0}`

use openlora_sdk::money::{PPM, split_by_weights};
use openlora_sdk::{Attributor, Money, RequestInfo, Split, Usage, owner_account};
use serde::Deserialize;

/// Who is paid and in what proportions.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The base model owner's account.
    pub base_owner: String,
    /// The operator's account.
    pub operator: String,
    /// The operator's share of every charge, in millionths.
    pub operator_ppm: u64,
    /// Scales the measured adapter contribution (1,000,000 = as measured).
    pub adapter_multiplier_ppm: u64,
    /// The least share of the non-operator part the adapter owner gets, in millionths.
    pub adapter_floor_ppm: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            base_owner: "base:openlora".into(),
            operator: "operator:openlora".into(),
            operator_ppm: 100_000,
            adapter_multiplier_ppm: PPM,
            adapter_floor_ppm: 0,
        }
    }
}

/// The official proportional attributor.
pub struct ProportionalAttributor;

impl Attributor for ProportionalAttributor {
    type Config = Config;

    fn check_config(config: &Config) -> Result<(), String> {
        if config.operator_ppm > PPM || config.adapter_floor_ppm > PPM {
            return Err("operator_ppm and adapter_floor_ppm must be at most 1000000".into());
        }
        if config.adapter_multiplier_ppm > 100 * PPM {
            return Err("adapter_multiplier_ppm must be at most 100000000".into());
        }
        if config.base_owner.is_empty() || config.operator.is_empty() {
            return Err("base_owner and operator must name accounts".into());
        }
        Ok(())
    }

    fn attribute(config: &Config, request: &RequestInfo, usage: &Usage, charge: &Money) -> Result<Vec<Split>, String> {
        let rest = PPM - config.operator_ppm;
        let mut payees = vec![(config.operator.clone(), "operator", config.operator_ppm * PPM)];
        match &request.adapter {
            Some(adapter) => {
                let measured = u64::from(usage.adapter_contribution_ppm) * config.adapter_multiplier_ppm / PPM;
                let adapter_ppm = measured.max(config.adapter_floor_ppm).min(PPM);
                let owner = request.adapter_owner.as_deref().unwrap_or(adapter);
                payees.push((config.base_owner.clone(), "base model", rest * (PPM - adapter_ppm)));
                payees.push((owner_account(owner), "adapter", rest * adapter_ppm));
            }
            None => payees.push((config.base_owner.clone(), "base model", rest * PPM)),
        }
        let weights: Vec<u64> = payees.iter().map(|p| p.2).collect();
        let parts = split_by_weights(charge.amount, &weights)?;
        Ok(payees
            .into_iter()
            .zip(parts)
            .map(|((payee, reason, _), amount)| Split::new(payee, amount, reason))
            .collect())
    }
}

openlora_sdk::export_attributor!(ProportionalAttributor);

#[cfg(test)]
mod tests {
    use openlora_sdk::testing::{run_attributor, sample_request, sample_usage};

    use super::*;

    #[test]
    fn splits_by_measured_contribution() {
        let (mut r, u) = (sample_request(), sample_usage());
        let splits = run_attributor::<ProportionalAttributor>("", &r, &u, &Money::new(1_000_001, "USD")).unwrap();
        // 10% operator; of the 90% left, 30% (measured) to the adapter owner.
        assert_eq!(
            splits,
            vec![
                Split::new("operator:openlora", 100_000, "operator"),
                Split::new("base:openlora", 630_001, "base model"),
                Split::new("owner:alice", 270_000, "adapter"),
            ]
        );
        r.adapter = None;
        let splits = run_attributor::<ProportionalAttributor>("", &r, &u, &Money::new(7, "USD")).unwrap();
        assert_eq!(splits.iter().map(|s| s.amount).sum::<u64>(), 7);
        assert_eq!(splits.len(), 2);
    }

    #[test]
    fn floor_and_bad_config() {
        let (r, mut u) = (sample_request(), sample_usage());
        u.adapter_contribution_ppm = 0;
        let cfg = r#"{"operator_ppm": 0, "adapter_floor_ppm": 250000}"#;
        let splits = run_attributor::<ProportionalAttributor>(cfg, &r, &u, &Money::new(100, "USD")).unwrap();
        assert_eq!(splits[2], Split::new("owner:alice", 25, "adapter"));
        assert!(
            run_attributor::<ProportionalAttributor>(r#"{"operator_ppm": 2000000}"#, &r, &u, &Money::new(1, "USD"))
                .is_err()
        );
    }
}
