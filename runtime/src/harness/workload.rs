//! The S-LoRA serving workload: requests over N adapters whose popularity follows Zipf's law,
//! arriving as a Poisson process, with prompt and output lengths drawn from given ranges — a
//! request sequence fixed entirely by its seed.

use serde::Serialize;

/// A length drawn uniformly from `lo..=hi` (`lo == hi`: fixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LengthRange {
    /// Shortest.
    pub lo: usize,
    /// Longest.
    pub hi: usize,
}

impl std::str::FromStr for LengthRange {
    type Err = String;

    /// `32` (fixed) or `16-64` (uniform, inclusive); lengths are at least 1.
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str| t.trim().parse::<usize>().map_err(|_| format!("`{s}`: expected N or LO-HI"));
        let (lo, hi) = match s.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(s)?, num(s)?),
        };
        if lo == 0 || lo > hi {
            return Err(format!("`{s}`: lengths must satisfy 1 <= LO <= HI"));
        }
        Ok(LengthRange { lo, hi })
    }
}

/// What the workload is made of.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadSpec {
    /// Distinct adapters requests go to.
    pub adapters: usize,
    /// Zipf exponent of adapter popularity (0: uniform; S-LoRA uses about 1).
    pub zipf_exponent: f64,
    /// Mean arrivals per second (Poisson).
    pub rate: f64,
    /// Requests in the run.
    pub requests: usize,
    /// Prompt tokens per request.
    pub prompt: LengthRange,
    /// New tokens per request.
    pub output: LengthRange,
    /// Fixes the whole request sequence.
    pub seed: u64,
}

/// One request of the workload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Arrival {
    /// Seconds from the start of the run.
    pub at_s: f64,
    /// Which adapter (0 is the most popular).
    pub adapter: usize,
    /// Prompt tokens.
    pub prompt: usize,
    /// New tokens.
    pub output: usize,
}

/// splitmix64: a small, well-mixed generator, so the sequence is the same on every platform.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    fn length(&mut self, r: LengthRange) -> usize {
        r.lo + (self.next_u64() % (r.hi - r.lo + 1) as u64) as usize
    }
}

impl WorkloadSpec {
    /// The request sequence: arrival times, adapters and lengths, the same for the same spec.
    pub fn arrivals(&self) -> Vec<Arrival> {
        let n = self.adapters.max(1);
        // Zipf: P(rank i) ∝ 1 / (i + 1)^s, sampled through its cumulative distribution.
        let mut cdf: Vec<f64> = (0..n).map(|i| 1.0 / ((i + 1) as f64).powf(self.zipf_exponent)).collect();
        let mut total = 0.0;
        for w in cdf.iter_mut() {
            total += *w;
            *w = total;
        }
        let mut rng = Rng(self.seed);
        let mut at_s = 0.0;
        (0..self.requests)
            .map(|_| {
                at_s += -rng.unit().ln() / self.rate.max(f64::MIN_POSITIVE);
                let u = rng.unit() * total;
                let adapter = cdf.partition_point(|&c| c < u).min(n - 1);
                Arrival { at_s, adapter, prompt: rng.length(self.prompt), output: rng.length(self.output) }
            })
            .collect()
    }
}

/// The `q`-quantile (0..=1) of `values` by the nearest-rank method; 0 when empty.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(seed: u64) -> WorkloadSpec {
        WorkloadSpec {
            adapters: 100,
            zipf_exponent: 1.0,
            rate: 4.0,
            requests: 4000,
            prompt: "8-64".parse().expect("range"),
            output: "32".parse().expect("range"),
            seed,
        }
    }

    #[test]
    fn the_seed_fixes_the_sequence() {
        assert_eq!(spec(7).arrivals(), spec(7).arrivals());
        assert_ne!(spec(7).arrivals(), spec(8).arrivals());
    }

    #[test]
    fn arrivals_are_poisson_and_popularity_is_zipf() {
        let a = spec(1).arrivals();
        let last = a.last().expect("requests").at_s;
        // 4000 arrivals at 4/s take about 1000 s (the mean of a sum of exponentials).
        assert!((900.0..1100.0).contains(&last), "{last}");
        assert!(a.windows(2).all(|w| w[0].at_s <= w[1].at_s));
        let count = |i: usize| a.iter().filter(|r| r.adapter == i).count() as f64;
        // Zipf with s = 1: adapter 0 about twice as popular as adapter 1, 10x adapter 9.
        assert!((1.6..2.5).contains(&(count(0) / count(1))), "{}", count(0) / count(1));
        assert!((6.0..15.0).contains(&(count(0) / count(9))), "{}", count(0) / count(9));
        assert!(a.iter().all(|r| (8..=64).contains(&r.prompt) && r.output == 32 && r.adapter < 100));
    }

    #[test]
    fn lengths_and_quantiles_parse_and_compute() {
        assert!("0".parse::<LengthRange>().is_err());
        assert!("9-3".parse::<LengthRange>().is_err());
        assert!("x".parse::<LengthRange>().is_err());
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!((quantile(&v, 0.5), quantile(&v, 0.9), quantile(&v, 0.99)), (50.0, 90.0, 99.0));
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
