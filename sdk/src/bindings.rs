//! The wit-bindgen guest bindings of the enabled world, and conversions to the plain types.

/// Conversions between one world's generated types and [`crate::types`].
macro_rules! conversions {
    ($world:ident) => {
        impl From<$world::openlora::policy::types::RequestInfo> for crate::RequestInfo {
            fn from(r: $world::openlora::policy::types::RequestInfo) -> Self {
                crate::RequestInfo {
                    request_id: r.request_id,
                    tenant: r.tenant,
                    requested_model: r.requested_model,
                    adapter: r.adapter,
                    adapter_owner: r.adapter_owner,
                    prompt_tokens: r.prompt_tokens,
                    max_tokens: r.max_tokens,
                    metadata: r.metadata.into_iter().map(|kv| (kv.key, kv.value)).collect(),
                    received_at_ms: r.received_at_ms,
                }
            }
        }

        impl From<crate::RouteDecision> for $world::openlora::policy::types::RouteDecision {
            fn from(d: crate::RouteDecision) -> Self {
                use $world::openlora::policy::types as t;
                match d {
                    crate::RouteDecision::Serve(r) => {
                        t::RouteDecision::Serve(t::Route { adapter: r.adapter, priority: r.priority })
                    }
                    crate::RouteDecision::Reject(reason) => t::RouteDecision::Reject(reason),
                }
            }
        }

        impl From<$world::openlora::policy::types::Usage> for crate::Usage {
            fn from(u: $world::openlora::policy::types::Usage) -> Self {
                crate::Usage {
                    prompt_tokens: u.prompt_tokens,
                    completion_tokens: u.completion_tokens,
                    queue_ms: u.queue_ms,
                    compute_ms: u.compute_ms,
                    adapter_load_ms: u.adapter_load_ms,
                    steps: u.steps,
                    batch_share_ppm: u.batch_share_ppm,
                    adapter_contribution_ppm: u.adapter_contribution_ppm,
                }
            }
        }

        impl From<$world::openlora::policy::types::Money> for crate::Money {
            fn from(m: $world::openlora::policy::types::Money) -> Self {
                crate::Money { amount: m.amount, currency: m.currency }
            }
        }

        impl From<crate::Money> for $world::openlora::policy::types::Money {
            fn from(m: crate::Money) -> Self {
                $world::openlora::policy::types::Money { amount: m.amount, currency: m.currency }
            }
        }

        impl From<crate::Split> for $world::openlora::policy::types::Split {
            fn from(s: crate::Split) -> Self {
                $world::openlora::policy::types::Split { payee: s.payee, amount: s.amount, reason: s.reason }
            }
        }

        /// Sends a log line to the host.
        #[allow(dead_code)]
        pub(crate) fn log_with(level: crate::Level, message: &str) {
            use $world::openlora::policy::host::{Level as L, log};
            let level = match level {
                crate::Level::Debug => L::Debug,
                crate::Level::Info => L::Info,
                crate::Level::Warn => L::Warn,
                crate::Level::Error => L::Error,
            };
            log(level, message);
        }
    };
}

/// Guest bindings of the `router` world.
#[cfg(feature = "router")]
pub mod router {
    wit_bindgen::generate!({
        world: "router",
        path: "wit",
        pub_export_macro: true,
        default_bindings_module: "openlora_sdk::bindings::router",
    });
    conversions!(self);
}

/// Guest bindings of the `pricer` world.
#[cfg(feature = "pricer")]
pub mod pricer {
    wit_bindgen::generate!({
        world: "pricer",
        path: "wit",
        pub_export_macro: true,
        default_bindings_module: "openlora_sdk::bindings::pricer",
    });
    conversions!(self);
}

/// Guest bindings of the `attributor` world.
#[cfg(feature = "attributor")]
pub mod attributor {
    wit_bindgen::generate!({
        world: "attributor",
        path: "wit",
        pub_export_macro: true,
        default_bindings_module: "openlora_sdk::bindings::attributor",
    });
    conversions!(self);
}

/// Sends a log line through whichever world is enabled.
#[allow(dead_code)]
pub(crate) fn log(level: crate::Level, message: &str) {
    #[cfg(feature = "attributor")]
    return attributor::log_with(level, message);
    #[cfg(all(feature = "pricer", not(feature = "attributor")))]
    return pricer::log_with(level, message);
    #[cfg(all(feature = "router", not(feature = "attributor"), not(feature = "pricer")))]
    return router::log_with(level, message);
}
