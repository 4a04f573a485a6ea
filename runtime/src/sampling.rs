//! Choosing the next token: greedy, temperature, top-k, top-p, repetition penalty, seeded.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result, SubmitError};

/// How one request wants its tokens chosen and when it wants to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (always the most likely token).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this mass.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Seed for the random choice; the same seed and inputs give the same tokens.
    pub seed: Option<u64>,
    /// Penalty (> 1 discourages) on tokens already in the prompt or output, as in CTRL / transformers.
    pub repetition_penalty: f32,
    /// OpenAI's presence penalty: subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty: subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// Most new tokens to produce.
    pub max_tokens: usize,
    /// Strings that end generation; the stop string itself is not returned.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (benchmarks and parity checks).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            max_tokens: 128,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Most stop strings one request may carry (OpenAI allows four).
pub const MAX_STOP_STRINGS: usize = 4;

/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

impl SamplingParams {
    /// Whether the next token is the plain argmax of the model's logits (greedy, no penalties),
    /// which a device can choose without sending the logits back.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature == 0.0
            && self.repetition_penalty == 1.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
    }

    /// Checks every field is in range, naming the first that is not.
    pub fn validate(&self) -> Result<()> {
        let bad = |param, message: String| Err(Error::from(SubmitError::InvalidParam { param, message }));
        if !self.temperature.is_finite() || !(0.0..=100.0).contains(&self.temperature) {
            return bad("temperature", format!("{} is not between 0 and 100", self.temperature));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return bad("top_p", format!("{} is not in (0, 1]", self.top_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad("repetition_penalty", format!("{} is not a positive number", self.repetition_penalty));
        }
        for (param, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                return bad(param, format!("{v} is not between -2 and 2"));
            }
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1".into());
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return bad("stop", format!("at most {MAX_STOP_STRINGS} stop strings"));
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "a stop string is empty".into());
        }
        if let Some(long) = self.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return bad("stop", format!("a stop string is {} bytes; at most {MAX_STOP_BYTES}", long.len()));
        }
        Ok(())
    }
}

/// Picks tokens for one sequence; owns that sequence's random stream.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler for `params`, seeded from `params.seed` or, without one, from the OS.
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Sampler { params, rng: StdRng::seed_from_u64(seed), scratch: Vec::new() }
    }

    /// The parameters this sampler follows.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from `logits` (modified in place) given every token so far, of
    /// which the first `prompt_len` are the prompt.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32], prompt_len: usize) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, history, p.repetition_penalty);
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let generated = history.get(prompt_len..).unwrap_or_default();
            apply_openai_penalties(logits, generated, p.presence_penalty, p.frequency_penalty);
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        let cand = &mut self.scratch;
        cand.clear();
        cand.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l * inv_t)));
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_logit_desc);
        let max = cand[0].1;
        let mut total = 0.0f64;
        for c in cand.iter_mut() {
            c.1 = (c.1 - max).exp();
            total += f64::from(c.1);
        }
        if p.top_p < 1.0 {
            let mut mass = 0.0f64;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                mass += f64::from(c.1) / total;
                if mass >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
            total = cand.iter().map(|c| f64::from(c.1)).sum();
        }
        let mut r = self.rng.random::<f64>() * total;
        for c in cand.iter() {
            r -= f64::from(c.1);
            if r <= 0.0 {
                return c.0;
            }
        }
        cand[cand.len() - 1].0
    }
}

/// The index of the largest logit; the lowest index wins a tie, as `torch.argmax` does.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// OpenAI's penalties over the generated tokens: `presence` once per distinct token,
/// `frequency` once per occurrence.
fn apply_openai_penalties(logits: &mut [f32], generated: &[u32], presence: f32, frequency: f32) {
    let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    for &t in generated {
        *counts.entry(t).or_default() += 1;
    }
    for (t, n) in counts {
        if let Some(l) = logits.get_mut(t as usize) {
            *l -= presence + frequency * n as f32;
        }
    }
}

/// Divides positive logits / multiplies negative ones of every token seen, once per token.
fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    let mut seen = std::collections::HashSet::with_capacity(history.len());
    for &t in history {
        if seen.insert(t)
            && let Some(l) = logits.get_mut(t as usize)
        {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![0.1, 2.0, 1.9, -1.0, 0.5, 1.0, 0.0, 0.3]
    }

    #[test]
    fn greedy_takes_the_max() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&mut logits(), &[], 0), 1);
    }

    #[test]
    fn repetition_penalty_can_flip_the_choice() {
        let p = SamplingParams { repetition_penalty: 1.2, ..Default::default() };
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&mut logits(), &[1, 1], 0), 2);
    }

    #[test]
    fn openai_penalties_apply_to_generated_tokens_only() {
        let p = SamplingParams { frequency_penalty: 0.1, presence_penalty: 0.05, ..Default::default() };
        let mut s = Sampler::new(p);
        // Token 1 is in the prompt only: no penalty, it still wins.
        assert_eq!(s.sample(&mut logits(), &[1, 1], 2), 1);
        // Generated twice: 2.0 - 0.05 - 0.2 = 1.75 < 1.9, so token 2 wins.
        assert_eq!(s.sample(&mut logits(), &[0, 1, 1], 1), 2);
    }

    #[test]
    fn same_seed_same_tokens() {
        let p = SamplingParams { temperature: 1.0, seed: Some(7), ..Default::default() };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..50).map(|_| s.sample(&mut logits(), &[], 0)).collect::<Vec<_>>()
        };
        assert_eq!(run(&p), run(&p));
        let other = SamplingParams { seed: Some(8), ..p.clone() };
        assert_ne!(run(&p), run(&other));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_choice() {
        let p = SamplingParams { temperature: 5.0, top_k: 2, seed: Some(1), ..Default::default() };
        let mut s = Sampler::new(p);
        for _ in 0..200 {
            assert!(matches!(s.sample(&mut logits(), &[], 0), 1 | 2));
        }
        // With a tiny nucleus only the single most likely token survives.
        let p = SamplingParams { temperature: 1.0, top_p: 0.01, seed: Some(1), ..Default::default() };
        let mut s = Sampler::new(p);
        for _ in 0..200 {
            assert_eq!(s.sample(&mut logits(), &[], 0), 1);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let p = SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() };
        let mut s = Sampler::new(p);
        let mut counts = [0usize; 2];
        for _ in 0..4000 {
            let t = s.sample(&mut vec![0.0, 2.0f32.ln()], &[], 0);
            counts[t as usize] += 1;
        }
        let frac = counts[1] as f64 / 4000.0; // expect 2/3
        assert!((frac - 2.0 / 3.0).abs() < 0.03, "{frac}");
    }

    #[test]
    fn validation_names_the_parameter() {
        let cases = [
            (SamplingParams { temperature: -1.0, ..Default::default() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplingParams { max_tokens: 0, ..Default::default() }, "max_tokens"),
            (SamplingParams { stop: vec![String::new()], ..Default::default() }, "stop"),
            (SamplingParams { stop: vec!["x".repeat(MAX_STOP_BYTES + 1)], ..Default::default() }, "stop"),
            (SamplingParams { repetition_penalty: f32::NAN, ..Default::default() }, "repetition_penalty"),
            (SamplingParams { presence_penalty: 2.5, ..Default::default() }, "presence_penalty"),
            (SamplingParams { frequency_penalty: -3.0, ..Default::default() }, "frequency_penalty"),
        ];
        for (p, name) in cases {
            match p.validate() {
                Err(Error::Submit(SubmitError::InvalidParam { param, .. })) => assert_eq!(param, name),
                other => panic!("expected {name} to be refused, got {other:?}"),
            }
        }
        assert!(SamplingParams::default().validate().is_ok());
    }
}
