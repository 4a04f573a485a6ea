//! The built-in policies: the official router, token pricer and proportional attributor plugins,
//! compiled natively into the server. They answer when a slot has no plugin, and whenever a
//! plugin fails in a fail-open slot.

use openlora_plugin_proportional_attributor::ProportionalAttributor;
use openlora_plugin_router::DefaultRouter;
use openlora_plugin_token_pricer::TokenPricer;
use openlora_sdk::{Attributor, Money, PluginConfig, Pricer, RequestInfo, RouteDecision, Router, Split, Usage};

use super::config::PolicyConfig;
use crate::error::{Error, Result};

/// The name a built-in decision is recorded under (in place of a plugin's sha256).
pub fn builtin_label(slot: &str) -> String {
    format!("builtin:{slot}@{}", env!("CARGO_PKG_VERSION"))
}

/// The built-in policies, configured from `[policy.slots.<slot>.builtin]`.
pub struct Builtins {
    router: <DefaultRouter as Router>::Config,
    pricer: <TokenPricer as Pricer>::Config,
    attributor: <ProportionalAttributor as Attributor>::Config,
    /// The configuration JSON of each, as given (for replay records).
    pub configs: [String; 3],
}

fn parse<C: PluginConfig>(slot: &str, json: &str, check: fn(&C) -> std::result::Result<(), String>) -> Result<C> {
    let field = format!("policy.slots.{slot}.builtin");
    let config = C::parse(json).map_err(|m| Error::config("server config", &field, m))?;
    check(&config).map_err(|m| Error::config("server config", &field, m))?;
    Ok(config)
}

impl Builtins {
    /// Parses and checks each built-in's configuration; errors name the config field.
    pub fn new(config: &PolicyConfig) -> Result<Self> {
        let json = |slot: &str| config.slot(slot).builtin.map(|v| v.to_string()).unwrap_or_default();
        Self::from_json([json("router"), json("pricer"), json("attributor")])
    }

    /// The built-ins configured from JSON texts (router, pricer, attributor; empty: defaults),
    /// as recorded with each decision.
    pub fn from_json(configs: [String; 3]) -> Result<Self> {
        Ok(Builtins {
            router: parse("router", &configs[0], DefaultRouter::check_config)?,
            pricer: parse("pricer", &configs[1], TokenPricer::check_config)?,
            attributor: parse("attributor", &configs[2], ProportionalAttributor::check_config)?,
            configs,
        })
    }

    /// Routes like the official router.
    pub fn route(&self, request: &RequestInfo) -> RouteDecision {
        DefaultRouter::route(&self.router, request)
    }

    /// Prices like the official token pricer.
    pub fn price(&self, request: &RequestInfo, usage: &Usage) -> std::result::Result<Money, String> {
        TokenPricer::price(&self.pricer, request, usage)
    }

    /// Attributes like the official proportional attributor.
    pub fn attribute(
        &self,
        request: &RequestInfo,
        usage: &Usage,
        charge: &Money,
    ) -> std::result::Result<Vec<Split>, String> {
        ProportionalAttributor::attribute(&self.attributor, request, usage, charge)
    }
}
