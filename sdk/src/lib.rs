//! Write openlora policy plugins in plain Rust.
//!
//! A plugin is a type implementing one of [`Router`], [`Pricer`] or [`Attributor`], exported with
//! [`export_router!`], [`export_pricer!`] or [`export_attributor!`] and built for `wasm32-wasip2`
//! with the matching cargo feature of this crate (`router`, `pricer` or `attributor`). The same
//! code runs natively under [`testing`], so a plugin is unit-tested with plain `cargo test`.
//! Money is integer micro-units; [`money`] has the exact helpers (largest-remainder splits).

pub mod money;
pub mod testing;
pub mod types;

#[cfg(any(feature = "router", feature = "pricer", feature = "attributor"))]
#[doc(hidden)]
pub mod bindings;

pub use types::{Level, Money, RequestInfo, Route, RouteDecision, Split, Usage, owner_account};

/// The README's Rust examples, compiled and run as doctests (`cargo test -p openlora-sdk --doc`),
/// so the contract it states is the one the code holds.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeExamples;

/// An operator-supplied plugin configuration, given as JSON when the plugin is loaded.
///
/// Implemented for every `serde` type with a `Default` (used when no configuration is given).
pub trait PluginConfig: Sized + Send + Sync + 'static {
    /// Parses the configuration; an empty string means "none given".
    fn parse(json: &str) -> Result<Self, String>;
}

impl<T: serde::de::DeserializeOwned + Default + Send + Sync + 'static> PluginConfig for T {
    fn parse(json: &str) -> Result<Self, String> {
        if json.trim().is_empty() {
            return Ok(T::default());
        }
        serde_json::from_str(json).map_err(|e| format!("invalid plugin config: {e}"))
    }
}

/// Chooses the adapter and priority of a request, or rejects it.
pub trait Router {
    /// The plugin's configuration (`()` for none).
    type Config: PluginConfig;
    /// Checks a parsed configuration beyond its shape; an error refuses the upload.
    fn check_config(_config: &Self::Config) -> Result<(), String> {
        Ok(())
    }
    /// Decides where a request goes.
    fn route(config: &Self::Config, request: &RequestInfo) -> RouteDecision;
}

/// Prices a finished request.
pub trait Pricer {
    /// The plugin's configuration (`()` for none).
    type Config: PluginConfig;
    /// Checks a parsed configuration beyond its shape; an error refuses the upload.
    fn check_config(_config: &Self::Config) -> Result<(), String> {
        Ok(())
    }
    /// The charge for a request, given what it used. An error is a failure: by the slot's
    /// `on_failure` the host prices with its built-in pricer (`"builtin"`, the default) or
    /// refuses the request (`"reject"`).
    fn price(config: &Self::Config, request: &RequestInfo, usage: &Usage) -> Result<Money, String>;
}

/// Splits a charge among payees; the amounts must add up to the charge exactly.
pub trait Attributor {
    /// The plugin's configuration (`()` for none).
    type Config: PluginConfig;
    /// Checks a parsed configuration beyond its shape; an error refuses the upload.
    fn check_config(_config: &Self::Config) -> Result<(), String> {
        Ok(())
    }
    /// The splits of `charge` (see [`money::split_by_weights`] for exact proportional splits).
    ///
    /// Splits that do not add up to `charge` are rejected as an error is: a failure. In the
    /// operator's `attributor` slot `charge` is the request's charge, and on failure the slot's
    /// `on_failure` decides (the built-in attributor, the default, or the request refused). In an adapter's
    /// `adapter:<name>` slot it is the adapter owner's share — the split the operator's
    /// attributor paid to [`RequestInfo::owner_account`]; the plugin is called only when there
    /// is one — and on failure the share stays one split to the owner, whatever the slot's
    /// `on_failure`. The README's "Slots" and "Usage" sections state the whole contract.
    fn attribute(
        config: &Self::Config,
        request: &RequestInfo,
        usage: &Usage,
        charge: &Money,
    ) -> Result<Vec<Split>, String>;
}

/// Where [`log`] sends lines when a plugin runs natively (linked into a host, not in wasm).
pub type NativeLogSink = fn(Level, &str);

static NATIVE_LOG_SINK: std::sync::OnceLock<NativeLogSink> = std::sync::OnceLock::new();

/// Installs the process-wide sink for natively run plugins' log lines (a host linking a plugin's
/// code calls this once at start); `false` if a sink was already installed (the first one stays).
pub fn set_native_log_sink(sink: NativeLogSink) -> bool {
    NATIVE_LOG_SINK.set(sink).is_ok()
}

/// Writes a line to the server's log. Natively: to the [`testing`] buffer while this thread
/// captures logs ([`testing::capture_logs`], or inside `testing::run_*`), else to the sink
/// installed with [`set_native_log_sink`], else to stderr. Nothing is kept unless captured.
pub fn log(level: Level, message: &str) {
    #[cfg(all(target_arch = "wasm32", any(feature = "router", feature = "pricer", feature = "attributor")))]
    bindings::log(level, message);
    #[cfg(not(all(target_arch = "wasm32", any(feature = "router", feature = "pricer", feature = "attributor"))))]
    if !testing::record_log(level, message) {
        match NATIVE_LOG_SINK.get() {
            Some(sink) => sink(level, message),
            None => eprintln!("openlora plugin {level:?}: {message:?}"),
        }
    }
}

/// What the export macros expand to; not for direct use.
#[doc(hidden)]
pub mod __private {
    use std::sync::OnceLock;

    use crate::PluginConfig;

    /// Parses, checks and keeps the configuration of this instance.
    pub fn configure<C: PluginConfig>(
        cell: &OnceLock<C>,
        json: &str,
        check: fn(&C) -> Result<(), String>,
    ) -> Result<(), String> {
        let config = C::parse(json)?;
        check(&config)?;
        cell.set(config).map_err(|_| "plugin configured twice".to_string())
    }

    /// The configuration kept by [`configure`].
    pub fn config<C: PluginConfig>(cell: &OnceLock<C>) -> Result<&C, String> {
        cell.get().ok_or_else(|| "plugin not configured".to_string())
    }
}

/// Exports a [`Router`] implementation as this component's `router` world (wasm32 only; a no-op natively).
#[macro_export]
macro_rules! export_router {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            static CONFIG: ::std::sync::OnceLock<<$plugin as $crate::Router>::Config> = ::std::sync::OnceLock::new();
            struct OpenloraGuest;
            impl $crate::bindings::router::exports::openlora::policy::routing::Guest for OpenloraGuest {
                fn configure(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::configure(&CONFIG, &config, <$plugin as $crate::Router>::check_config)
                }
                fn route(
                    request: $crate::bindings::router::openlora::policy::types::RequestInfo,
                ) -> $crate::bindings::router::openlora::policy::types::RouteDecision {
                    match $crate::__private::config(&CONFIG) {
                        Ok(config) => <$plugin as $crate::Router>::route(config, &request.into()).into(),
                        Err(e) => $crate::RouteDecision::Reject(e).into(),
                    }
                }
            }
    $crate::bindings::router::export!(OpenloraGuest with_types_in $crate::bindings::router);
        };
    };
}

/// Exports a [`Pricer`] implementation as this component's `pricer` world (wasm32 only; a no-op natively).
#[macro_export]
macro_rules! export_pricer {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            static CONFIG: ::std::sync::OnceLock<<$plugin as $crate::Pricer>::Config> = ::std::sync::OnceLock::new();
            struct OpenloraGuest;
            impl $crate::bindings::pricer::exports::openlora::policy::pricing::Guest for OpenloraGuest {
                fn configure(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::configure(&CONFIG, &config, <$plugin as $crate::Pricer>::check_config)
                }
                fn price(
                    request: $crate::bindings::pricer::openlora::policy::types::RequestInfo,
                    usage: $crate::bindings::pricer::openlora::policy::types::Usage,
                ) -> ::std::result::Result<
                    $crate::bindings::pricer::openlora::policy::types::Money,
                    ::std::string::String,
                > {
                    let config = $crate::__private::config(&CONFIG)?;
                    <$plugin as $crate::Pricer>::price(config, &request.into(), &usage.into()).map(Into::into)
                }
            }
    $crate::bindings::pricer::export!(OpenloraGuest with_types_in $crate::bindings::pricer);
        };
    };
}

/// Exports an [`Attributor`] implementation as this component's `attributor` world (wasm32 only; a
/// no-op natively).
#[macro_export]
macro_rules! export_attributor {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            static CONFIG: ::std::sync::OnceLock<<$plugin as $crate::Attributor>::Config> =
                ::std::sync::OnceLock::new();
            struct OpenloraGuest;
            impl $crate::bindings::attributor::exports::openlora::policy::attribution::Guest for OpenloraGuest {
                fn configure(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::configure(&CONFIG, &config, <$plugin as $crate::Attributor>::check_config)
                }
                fn attribute(
                    request: $crate::bindings::attributor::openlora::policy::types::RequestInfo,
                    usage: $crate::bindings::attributor::openlora::policy::types::Usage,
                    charge: $crate::bindings::attributor::openlora::policy::types::Money,
                ) -> ::std::result::Result<
                    ::std::vec::Vec<$crate::bindings::attributor::openlora::policy::types::Split>,
                    ::std::string::String,
                > {
                    let config = $crate::__private::config(&CONFIG)?;
                    <$plugin as $crate::Attributor>::attribute(config, &request.into(), &usage.into(), &charge.into())
                        .map(|splits| splits.into_iter().map(Into::into).collect())
                }
            }
    $crate::bindings::attributor::export!(OpenloraGuest with_types_in $crate::bindings::attributor);
        };
    };
}
