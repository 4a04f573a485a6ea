//! Slots (where a plugin plugs in) and worlds (what kind of plugin it is).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One of the three kinds of plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum World {
    /// Exports `routing`.
    Router,
    /// Exports `pricing`.
    Pricer,
    /// Exports `attribution`.
    Attributor,
}

impl World {
    /// The world's name in the WIT package.
    pub fn name(self) -> &'static str {
        match self {
            World::Router => "router",
            World::Pricer => "pricer",
            World::Attributor => "attributor",
        }
    }

    /// The interface this world exports, as a component export name.
    pub fn export_name(self) -> &'static str {
        match self {
            World::Router => "openlora:policy/routing@0.1.0",
            World::Pricer => "openlora:policy/pricing@0.1.0",
            World::Attributor => "openlora:policy/attribution@0.1.0",
        }
    }
}

impl FromStr for World {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "router" => Ok(World::Router),
            "pricer" => Ok(World::Pricer),
            "attributor" => Ok(World::Attributor),
            _ => Err(format!("unknown world {s:?}; the worlds are router, pricer and attributor")),
        }
    }
}

/// Where a plugin is installed: the operator's three slots, or an adapter owner's attributor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// The operator's router.
    Router,
    /// The operator's pricer.
    Pricer,
    /// The operator's attributor (base owner / adapter owner / operator).
    Attributor,
    /// An adapter owner's attributor, dividing the owner's share of that adapter's charges.
    Adapter(String),
}

impl Slot {
    /// The world a plugin in this slot must export.
    pub fn world(&self) -> World {
        match self {
            Slot::Router => World::Router,
            Slot::Pricer => World::Pricer,
            Slot::Attributor | Slot::Adapter(_) => World::Attributor,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Slot::Router => f.write_str("router"),
            Slot::Pricer => f.write_str("pricer"),
            Slot::Attributor => f.write_str("attributor"),
            Slot::Adapter(name) => write!(f, "adapter:{name}"),
        }
    }
}

impl FromStr for Slot {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "router" => Ok(Slot::Router),
            "pricer" => Ok(Slot::Pricer),
            "attributor" => Ok(Slot::Attributor),
            _ => match s.strip_prefix("adapter:") {
                Some(name)
                    if !name.is_empty()
                        && name.len() <= 128
                        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
                {
                    Ok(Slot::Adapter(name.to_string()))
                }
                _ => Err(format!(
                    "unknown slot {s:?}; the slots are router, pricer, attributor and adapter:<adapter-name>"
                )),
            },
        }
    }
}

impl Serialize for Slot {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Slot {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_round_trip_and_refuse_bad_names() {
        for s in ["router", "pricer", "attributor", "adapter:star-trek_1.0"] {
            assert_eq!(s.parse::<Slot>().unwrap().to_string(), s);
        }
        for bad in ["", "adapter:", "adapter:../x", "ledger", "adapter:a b"] {
            assert!(bad.parse::<Slot>().is_err(), "{bad}");
        }
        assert_eq!("adapter:x".parse::<Slot>().unwrap().world(), World::Attributor);
    }
}
