//! A royalty attributor: an adapter owner pays the licence holder of the dataset the adapter
//! was trained on a share of everything the adapter earns, and keeps the rest.

use openlora_sdk::money::{PPM, split_by_weights};
use openlora_sdk::{Attributor, Level, Money, RequestInfo, Split, Usage, log};
use serde::Deserialize;

/// What the owner configures when uploading the plugin.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The dataset's licence holder, paid as `dataset:<name>`.
    pub dataset: String,
    /// The licence holder's share, in millionths (300000 = 30%).
    pub royalty_ppm: u64,
}

/// The plugin.
pub struct Royalty;

impl Attributor for Royalty {
    type Config = Config;

    fn check_config(config: &Config) -> Result<(), String> {
        if config.dataset.is_empty() {
            return Err("dataset: name the licence holder".into());
        }
        if config.royalty_ppm > PPM {
            return Err("royalty_ppm: at most 1000000".into());
        }
        Ok(())
    }

    fn attribute(config: &Config, request: &RequestInfo, _usage: &Usage, charge: &Money) -> Result<Vec<Split>, String> {
        // `owner:<owner>`, exactly as the host names the account it pays the owner's share to.
        let owner = request.owner_account().ok_or("a request on the base model: no adapter owner to pay")?;
        // Largest-remainder split: the two parts always add up to the charge exactly.
        let parts = split_by_weights(charge.amount, &[config.royalty_ppm, PPM - config.royalty_ppm])?;
        log(Level::Debug, &format!("royalty {} of {}", parts[0], charge.amount));
        Ok(vec![
            Split::new(format!("dataset:{}", config.dataset), parts[0], "dataset royalty"),
            Split::new(owner, parts[1], "adapter owner"),
        ])
    }
}

openlora_sdk::export_attributor!(Royalty);

#[cfg(test)]
mod tests {
    use openlora_sdk::testing::{run_attributor, sample_request, sample_usage};

    use super::*;

    const CONFIG: &str = r#"{"dataset": "fortunes", "royalty_ppm": 300000}"#;

    #[test]
    fn pays_the_royalty_and_the_rest_to_the_owner() {
        let splits = run_attributor::<Royalty>(CONFIG, &sample_request(), &sample_usage(), &Money::new(1001, "USD"));
        assert_eq!(
            splits.unwrap(),
            vec![Split::new("dataset:fortunes", 300, "dataset royalty"), Split::new("owner:alice", 701, "adapter owner")]
        );
    }

    #[test]
    fn refuses_a_config_without_a_dataset() {
        let charge = Money::new(1, "USD");
        let err = run_attributor::<Royalty>("{\"royalty_ppm\": 1}", &sample_request(), &sample_usage(), &charge);
        assert!(err.unwrap_err().contains("dataset"));
    }
}
