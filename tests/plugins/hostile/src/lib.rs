//! An attributor that misbehaves on purpose, for the sandbox tests. Its `mode` comes from its
//! configuration (`{"mode": "loop"}`) or, per request, from the metadata key `hostile-mode`.
//! `ok` answers correctly (everything to `operator:hostile`); `entropy` answers correctly with an
//! amount split driven by the clock and randomness (which the host makes deterministic);
//! `echo` answers whatever splits the metadata key `splits` lists (`payee=amount,...`), right or
//! wrong, for property tests of what the host accepts. `sleep` and `sleep-forever` sleep (3 s,
//! 584 years) and then answer correctly; `timing` puts what it measures of time into its split;
//! `huge-error` declines with an 8 MB message; `poll-count` counts how often a 1 ms timer is
//! polled before it is ready (real time, on a host that lets it block); `random-flood` asks WASI
//! for 64 MiB of random bytes at once. `huge-payees` answers splits whose payees are 2 MiB each;
//! `forge-log` logs a line holding a newline, a forged log record and terminal escapes;
//! `odd-stall` loops only on requests whose id ends in an odd digit; `spin` computes for
//! `spin-iterations` (metadata) rounds, then answers correctly. Configured with the mode
//! `configure-sleep` or `configure-loop`, its `configure` sleeps 3 s or never returns.

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

    fn check_config(config: &Config) -> Result<(), String> {
        match config.mode.as_str() {
            "configure-sleep" => std::thread::sleep(std::time::Duration::from_secs(3)),
            "configure-loop" => loop {
                std::hint::black_box(std::time::Instant::now());
            },
            _ => {}
        }
        Ok(())
    }

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
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3));
                Ok(vec![Split::new("operator:hostile", charge.amount, "slept")])
            }
            "sleep-forever" => {
                std::thread::sleep(std::time::Duration::from_nanos(u64::MAX));
                Ok(vec![Split::new("operator:hostile", charge.amount, "slept long")])
            }
            "timing" => {
                // Real time would differ run to run; the sandbox's virtual time does not.
                let start = std::time::Instant::now();
                let mut spins = 0u64;
                while start.elapsed() < std::time::Duration::from_micros(1) && spins < 1_000 {
                    spins += 1;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
                let elapsed = start.elapsed().as_nanos() as u64;
                let wall = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                let first = (elapsed ^ wall ^ spins) % (charge.amount + 1);
                Ok(vec![
                    Split::new("operator:hostile", first, "timing"),
                    Split::new("base:hostile", charge.amount - first, "rest"),
                ])
            }
            "huge-error" => Err("E".repeat(8 << 20)),
            #[cfg(target_arch = "wasm32")]
            "poll-count" => {
                let timer = wasip2::clocks::monotonic_clock::subscribe_duration(1_000_000);
                let mut polls = 0u64;
                while !timer.ready() && polls < 100_000_000 {
                    polls += 1;
                }
                let first = polls % (charge.amount + 1);
                Ok(vec![
                    Split::new("operator:hostile", first, "polls"),
                    Split::new("base:hostile", charge.amount - first, "rest"),
                ])
            }
            #[cfg(target_arch = "wasm32")]
            "random-flood" => {
                let bytes = wasip2::random::random::get_random_bytes(64 << 20);
                Err(format!("got {} random bytes", bytes.len()))
            }
            "error" => Err("declined on purpose".into()),
            "huge-payees" => {
                let payee = "p".repeat(2 << 20);
                Ok((0..12)
                    .map(|_| Split::new(payee.clone(), 0, "x"))
                    .chain([Split::new("operator:hostile", charge.amount, "all")])
                    .collect())
            }
            "forge-log" => {
                log(
                    Level::Error,
                    "ok\n2026-12-02T00:00:00.000000Z ERROR openlora: FORGED server line \u{1b}[31mred\u{1b}[0m",
                );
                Ok(vec![Split::new("operator:hostile", charge.amount, "all")])
            }
            "spin" => {
                // Honest work of a chosen length: `spin-iterations` rounds of arithmetic.
                let n: u64 = request.metadata("spin-iterations").and_then(|v| v.parse().ok()).unwrap_or(0);
                let mut x: u64 = 1;
                for _ in 0..n {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
                Ok(vec![Split::new("operator:hostile", charge.amount, format!("spun {}", x % 2))])
            }
            "odd-stall" if request.request_id.ends_with(['1', '3', '5', '7', '9']) => loop {
                std::hint::black_box(std::time::Instant::now());
            },
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
