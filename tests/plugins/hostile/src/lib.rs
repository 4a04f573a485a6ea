//! An attributor that misbehaves on purpose, for the sandbox tests. Its `mode` comes from its
//! configuration (`{"mode": "loop"}`) or, per request, from the metadata key `hostile-mode`.
//! `ok` answers correctly (everything to `operator:hostile`); `entropy` answers correctly with an
//! amount split driven by the clock and randomness (which the host makes deterministic);
//! `echo` answers whatever splits the metadata key `splits` lists (`payee=amount,...`), right or
//! wrong, for property tests of what the host accepts.

use std::collections::HashMap;

use openlora_sdk::{Attributor, Level, Money, RequestInfo, Split, Usage, log};
use serde::Deserialize;

/// The configured default mode.
#[derive(Debug, Default, Deserialize)]
pub struct Config {
    /// What to do when the request does not say.
    #[serde(default)]
    pub mode: String,
}

/// The misbehaving attributor.
pub struct Hostile;

#[inline(never)]
fn recurse(n: u64, pad: &mut [u64; 16]) -> u64 {
    pad[(n % 16) as usize] = n;
    if n == u64::MAX { 0 } else { recurse(n + 1, pad).wrapping_add(pad[(n % 7) as usize]) }
}

impl Attributor for Hostile {
    type Config = Config;

    fn attribute(config: &Config, request: &RequestInfo, _usage: &Usage, charge: &Money) -> Result<Vec<Split>, String> {
        let mode = request.metadata("hostile-mode").unwrap_or(&config.mode);
        match mode {
            "loop" => {
                let mut x: u64 = 1;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            "memory" => {
                // Ask for memory without touching it, so the cap (not fuel) is what stops it.
                let layout = std::alloc::Layout::from_size_align(8 << 20, 8).map_err(|e| e.to_string())?;
                loop {
                    // SAFETY: a non-zero-sized layout; the memory is deliberately leaked.
                    let p = unsafe { std::alloc::alloc(layout) };
                    if p.is_null() {
                        std::alloc::handle_alloc_error(layout);
                    }
                    std::hint::black_box(p);
                }
            }
            "recursion" => {
                let mut pad = [0u64; 16];
                let r = recurse(std::hint::black_box(0), &mut pad);
                Err(format!("unreachable {r}"))
            }
            "output" => {
                for i in 0..1_000_000u32 {
                    println!("line {i} of a flood of output");
                }
                Err("printed".into())
            }
            "huge-result" => {
                Ok((0..2_000_000u64).map(|i| Split::new(format!("payee-{i}"), 0, "x".repeat(64))).collect())
            }
            "log-spam" => {
                for i in 0..300 {
                    log(Level::Info, &format!("spam {i} {}", "y".repeat(2000)));
                }
                Ok(vec![Split::new("operator:hostile", charge.amount, "all")])
            }
            "off-by-one" => Ok(vec![
                Split::new("operator:hostile", charge.amount / 2, "half"),
                Split::new("base:hostile", charge.amount - charge.amount / 2 + 1, "half plus one"),
            ]),
            "overflow" => Ok(vec![
                Split::new("operator:hostile", u64::MAX, "everything"),
                Split::new("base:hostile", charge.amount.wrapping_add(1), "wraps around to the charge"),
            ]),
            "panic" => panic!("the plugin panicked on purpose"),
            "error" => Err("declined on purpose".into()),
            "entropy" => {
                // Clock and randomness: the host fixes both per request, so this replays exactly.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                let map: HashMap<u64, u64> = (0..8).map(|i| (i, i)).collect();
                let order: u64 = map.keys().enumerate().map(|(i, k)| (i as u64 + 1) * k).sum();
                let first = (now ^ order) % (charge.amount + 1);
                Ok(vec![
                    Split::new("operator:hostile", first, "entropy"),
                    Split::new("base:hostile", charge.amount - first, "rest"),
                ])
            }
            "echo" => request
                .metadata("splits")
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| {
                    let (payee, amount) = s.split_once('=').ok_or("splits: payee=amount")?;
                    let amount = amount.parse::<u64>().map_err(|e| format!("splits: {e}"))?;
                    Ok(Split::new(payee, amount, "echo"))
                })
                .collect(),
            _ => Ok(vec![Split::new("operator:hostile", charge.amount, "all")]),
        }
    }
}

openlora_sdk::export_attributor!(Hostile);
