//! An attributor an adapter owner uploads for their adapter: the owner keeps a share and the rest
//! of the adapter's earnings go to the people whose data trained it, by their weights. Exact:
//! largest-remainder split of integer micro-units.
//!
//! Config (JSON, required): `{"owner_keeps_ppm": 200000, "contributors": {"bob": 3, "carol": 1}}`

use std::collections::BTreeMap;

use openlora_sdk::money::{PPM, split_by_weights};
use openlora_sdk::{Attributor, Money, RequestInfo, Split, Usage, owner_account};
use serde::Deserialize;

/// The owner's share and the contributors' weights.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The share the adapter owner keeps, in millionths.
    #[serde(default)]
    pub owner_keeps_ppm: u64,
    /// Contributor name → weight (e.g. examples contributed); paid as `contributor:<name>`.
    pub contributors: BTreeMap<String, u64>,
}

/// The data-contributor attributor.
pub struct ContributorAttributor;

impl Attributor for ContributorAttributor {
    type Config = Config;

    fn check_config(config: &Config) -> Result<(), String> {
        if config.owner_keeps_ppm > PPM {
            return Err("owner_keeps_ppm must be at most 1000000".into());
        }
        if config.contributors.values().all(|&w| w == 0) {
            return Err("contributors: at least one contributor with a weight above 0 is needed".into());
        }
        if config.contributors.values().try_fold(0u64, |a, &w| a.checked_add(w)).is_none() {
            return Err("contributors: weights overflow".into());
        }
        Ok(())
    }

    fn attribute(config: &Config, request: &RequestInfo, _usage: &Usage, charge: &Money) -> Result<Vec<Split>, String> {
        let owner = request.owner_account().unwrap_or_else(|| owner_account("unknown"));
        let kept = u128::from(config.owner_keeps_ppm) * u128::from(charge.amount) / u128::from(PPM);
        let kept = kept as u64; // at most charge.amount
        let mut splits = vec![Split::new(owner, kept, "adapter owner")];
        let names: Vec<&String> = config.contributors.keys().collect();
        let weights: Vec<u64> = config.contributors.values().copied().collect();
        let parts = split_by_weights(charge.amount - kept, &weights)?;
        splits.extend(
            names.into_iter().zip(parts).map(|(n, a)| Split::new(format!("contributor:{n}"), a, "training data")),
        );
        Ok(splits)
    }
}

openlora_sdk::export_attributor!(ContributorAttributor);

#[cfg(test)]
mod tests {
    use openlora_sdk::testing::{run_attributor, sample_request, sample_usage};

    use super::*;

    #[test]
    fn contributors_share_by_weight() {
        let cfg = r#"{"owner_keeps_ppm": 200000, "contributors": {"bob": 3, "carol": 1}}"#;
        let (r, u) = (sample_request(), sample_usage());
        let splits = run_attributor::<ContributorAttributor>(cfg, &r, &u, &Money::new(1001, "USD")).unwrap();
        assert_eq!(
            splits,
            vec![
                Split::new("owner:alice", 200, "adapter owner"),
                Split::new("contributor:bob", 601, "training data"),
                Split::new("contributor:carol", 200, "training data"),
            ]
        );
    }

    #[test]
    fn config_is_required_and_checked() {
        let (r, u) = (sample_request(), sample_usage());
        let charge = Money::new(1, "USD");
        assert!(run_attributor::<ContributorAttributor>("", &r, &u, &charge).unwrap_err().contains("contributors"));
        assert!(run_attributor::<ContributorAttributor>(r#"{"contributors": {"a": 0}}"#, &r, &u, &charge).is_err());
    }
}
