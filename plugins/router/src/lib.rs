//! The official router: the adapter named by `model` (after aliases), per-tenant allow-lists,
//! and a scheduling priority from the tenant's tier.
//!
//! Config (JSON, all optional):
//! `{"aliases": {"trek": "startrek"}, "tiers": {"gold": 10, "free": -5},
//!   "tenants": {"acme": {"tier": "gold", "allow": ["startrek", "computers"]}},
//!   "default_tier": "free", "unknown_tenants": "allow"}`

use std::collections::BTreeMap;

use openlora_sdk::{Level, RequestInfo, Route, RouteDecision, Router, log};
use serde::Deserialize;

/// What an operator configures.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Other names for adapters: alias → adapter name.
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    /// Scheduling priority per tier name (higher runs first).
    #[serde(default)]
    pub tiers: BTreeMap<String, i32>,
    /// What each tenant may use and how urgently it is served.
    #[serde(default)]
    pub tenants: BTreeMap<String, Tenant>,
    /// The tier of tenants without one.
    #[serde(default)]
    pub default_tier: Option<String>,
    /// Whether tenants not listed under `tenants` are served (`allow`, the default) or refused (`deny`).
    #[serde(default)]
    pub unknown_tenants: Unknown,
}

/// One tenant's settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// The tenant's tier (a key of `tiers`).
    #[serde(default)]
    pub tier: Option<String>,
    /// The adapters the tenant may use; absent means all. The base model is always allowed.
    #[serde(default)]
    pub allow: Option<Vec<String>>,
}

/// What happens to tenants the config does not list.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Unknown {
    /// Served with the default tier.
    #[default]
    Allow,
    /// Refused.
    Deny,
}

/// The official router.
pub struct DefaultRouter;

impl Router for DefaultRouter {
    type Config = Config;

    fn check_config(config: &Config) -> Result<(), String> {
        let tiers = config.tenants.values().filter_map(|t| t.tier.as_ref()).chain(config.default_tier.as_ref());
        for tier in tiers {
            if !config.tiers.contains_key(tier) {
                return Err(format!("tier {tier:?} is used but not defined under \"tiers\""));
            }
        }
        for (alias, target) in &config.aliases {
            if config.aliases.contains_key(target) {
                return Err(format!("alias {alias:?} points to another alias {target:?}"));
            }
        }
        Ok(())
    }

    fn route(config: &Config, request: &RequestInfo) -> RouteDecision {
        let tenant = config.tenants.get(&request.tenant);
        if tenant.is_none() && config.unknown_tenants == Unknown::Deny {
            return RouteDecision::Reject(format!("tenant {:?} is not allowed here", request.tenant));
        }
        // The host passes `adapter` = the requested name unless it names the base model.
        let adapter = request.adapter.as_ref().map(|name| config.aliases.get(name).unwrap_or(name).clone());
        if let (Some(adapter), Some(allow)) = (&adapter, tenant.and_then(|t| t.allow.as_ref()))
            && !allow.iter().any(|a| a == adapter || a == "*")
        {
            log(Level::Info, &format!("tenant {} refused adapter {adapter}", request.tenant));
            return RouteDecision::Reject(format!("tenant {:?} may not use adapter {adapter:?}", request.tenant));
        }
        let tier = tenant.and_then(|t| t.tier.as_ref()).or(config.default_tier.as_ref());
        let priority = tier.and_then(|t| config.tiers.get(t)).copied().unwrap_or(0);
        RouteDecision::Serve(Route { adapter, priority })
    }
}

openlora_sdk::export_router!(DefaultRouter);

#[cfg(test)]
mod tests {
    use openlora_sdk::testing::{run_router, sample_request};

    use super::*;

    const CONFIG: &str = r#"{"aliases": {"trek": "startrek"}, "tiers": {"gold": 10, "free": -5},
        "tenants": {"acme": {"tier": "gold", "allow": ["startrek"]}}, "default_tier": "free"}"#;

    fn route(tenant: &str, adapter: Option<&str>) -> RouteDecision {
        let mut r = sample_request();
        r.tenant = tenant.into();
        r.adapter = adapter.map(Into::into);
        run_router::<DefaultRouter>(CONFIG, &r).unwrap()
    }

    #[test]
    fn aliases_tiers_and_allow_lists() {
        assert_eq!(
            route("acme", Some("trek")),
            RouteDecision::Serve(Route { adapter: Some("startrek".into()), priority: 10 })
        );
        assert!(matches!(route("acme", Some("love")), RouteDecision::Reject(m) if m.contains("love")));
        assert_eq!(route("acme", None), RouteDecision::Serve(Route { adapter: None, priority: 10 }));
        assert_eq!(
            route("bob", Some("love")),
            RouteDecision::Serve(Route { adapter: Some("love".into()), priority: -5 })
        );
    }

    #[test]
    fn no_config_serves_what_was_asked() {
        let r = sample_request();
        let d = run_router::<DefaultRouter>("", &r).unwrap();
        assert_eq!(d, RouteDecision::Serve(Route { adapter: Some("startrek".into()), priority: 0 }));
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let r = sample_request();
        let e = run_router::<DefaultRouter>(r#"{"default_tier": "gold"}"#, &r).unwrap_err();
        assert!(e.contains("gold"), "{e}");
        let e = run_router::<DefaultRouter>(r#"{"alias": {}}"#, &r).unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
        let e = run_router::<DefaultRouter>(r#"{"aliases": {"a": "b", "b": "c"}}"#, &r).unwrap_err();
        assert!(e.contains("another alias"), "{e}");
        let denied = run_router::<DefaultRouter>(r#"{"unknown_tenants": "deny"}"#, &r).unwrap();
        assert!(matches!(denied, RouteDecision::Reject(_)));
    }
}
