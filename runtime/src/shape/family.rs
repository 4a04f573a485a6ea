//! The decoder families openlora runs, each described once by what differs from Llama: the CPU
//! decoder and the GPU decoder read the same description (through [`super::ModelConfig`]).

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// A family of decoder-only transformers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 1-3 (`LlamaForCausalLM`).
    Llama,
    /// Mistral (`MistralForCausalLM`): Llama with a sliding attention window.
    Mistral,
    /// Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): biases on q, k and v.
    Qwen2,
    /// Qwen3 (`Qwen3ForCausalLM`): RMSNorm per head on q and k, before RoPE.
    Qwen3,
    /// Gemma 3's text decoder (`Gemma3ForCausalLM`, `gemma3_text`): embeddings scaled by
    /// √hidden, RMSNorms scaling by (1 + w), GeGLU (tanh GELU), norms before and after attention
    /// and MLP, q/k norms, sliding and global layers with their own RoPE bases,
    /// `query_pre_attn_scalar`, optional final logit soft-capping.
    Gemma3,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (`silu`).
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

/// Families known but not served yet, with what to say.
const REFUSED: &[(&str, &str)] = &[
    ("gemma3", "the multimodal Gemma 3 folder; serve its text model (`gemma3_text`)"),
    ("gemma2", "Gemma 2 is not supported"),
    ("gemma", "Gemma is not supported"),
    ("qwen2_moe", "mixture-of-experts models are not supported"),
    ("qwen3_moe", "mixture-of-experts models are not supported"),
    ("mixtral", "mixture-of-experts models are not supported"),
];

impl Family {
    /// The family of a `config.json`'s `model_type` (absent: Llama).
    pub fn from_model_type(file: &Path, model_type: &str) -> Result<Self> {
        match model_type {
            "llama" => Ok(Family::Llama),
            "mistral" => Ok(Family::Mistral),
            "qwen2" => Ok(Family::Qwen2),
            "qwen3" => Ok(Family::Qwen3),
            "gemma3_text" => Ok(Family::Gemma3),
            other => {
                let why = REFUSED.iter().find(|(t, _)| *t == other).map_or("it is not a family openlora runs", |r| r.1);
                Err(Error::config(
                    file,
                    "model_type",
                    format!("`{other}`: {why} (llama, mistral, qwen2, qwen3, gemma3_text)"),
                ))
            }
        }
    }

    /// Whether the q, k and v projections carry biases.
    pub fn qkv_bias(self) -> bool {
        self == Family::Qwen2
    }

    /// Whether q and k are RMS-normed per head before RoPE.
    pub fn qk_norm(self) -> bool {
        matches!(self, Family::Qwen3 | Family::Gemma3)
    }

    /// Whether every RMSNorm scales by (1 + w) rather than w (the stored weight is w).
    pub fn norm_plus_one(self) -> bool {
        self == Family::Gemma3
    }

    /// Whether the embeddings are scaled by √hidden.
    pub fn scaled_embeddings(self) -> bool {
        self == Family::Gemma3
    }

    /// Whether each block has norms on both sides of attention and of the MLP (the attention
    /// output normed before the residual add, then a pre-MLP and a post-MLP norm).
    pub fn sandwich_norms(self) -> bool {
        self == Family::Gemma3
    }

    /// The config field naming the MLP activation, and the one the family's decoder computes.
    pub fn activation(self) -> (&'static str, Activation) {
        match self {
            Family::Gemma3 => ("hidden_activation", Activation::GeluTanh),
            _ => ("hidden_act", Activation::Silu),
        }
    }
}

/// The sliding-window fields of a `config.json`, as the families write them.
#[derive(Clone, Copy)]
pub struct WindowFields<'a> {
    /// `sliding_window` (a number, or null).
    pub sliding_window: Option<&'a Value>,
    /// Qwen's `use_sliding_window`.
    pub use_sliding_window: Option<bool>,
    /// Qwen's `max_window_layers`: layers below it attend to everything (default 28).
    pub max_window_layers: Option<usize>,
    /// transformers 5.x's `layer_types` (`full_attention` / `sliding_attention` per layer).
    pub layer_types: Option<&'a [String]>,
    /// Gemma's older form: every n-th layer global (`sliding_window_pattern`, default 6).
    pub sliding_window_pattern: Option<usize>,
}

impl Family {
    /// Each layer's attention window in tokens (`None`: the whole context).
    pub fn layer_windows(self, file: &Path, layers: usize, f: &WindowFields<'_>) -> Result<Vec<Option<usize>>> {
        let window = match f.sliding_window {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64().and_then(|w| usize::try_from(w).ok()) {
                Some(w) if w > 0 => Some(w),
                _ => return Err(Error::config(file, "sliding_window", format!("not a window size: {v}"))),
            },
        };
        // Qwen: no window at all unless use_sliding_window (transformers drops it otherwise).
        let window = match self {
            Family::Qwen2 | Family::Qwen3 if f.use_sliding_window != Some(true) => None,
            _ => window,
        };
        if self == Family::Gemma3 {
            // Gemma3TextConfig's default window where the config leaves it out.
            let window = window.or(Some(4096)).map(Value::from);
            // Every `pattern`-th layer is global, the rest slide (transformers' older form).
            let pattern = f.sliding_window_pattern.unwrap_or(6).max(1);
            let types: Vec<String> = match f.layer_types {
                Some(t) => t.to_vec(),
                None => (0..layers)
                    .map(|l| if (l + 1) % pattern == 0 { "full_attention" } else { "sliding_attention" }.to_string())
                    .collect(),
            };
            let fields = WindowFields {
                sliding_window: window.as_ref(),
                use_sliding_window: Some(true),
                layer_types: Some(&types),
                ..*f
            };
            return Family::Qwen3.layer_windows(file, layers, &fields);
        }
        // Mistral windows every layer whatever `layer_types` says (as transformers does).
        if self == Family::Mistral || self == Family::Llama {
            return Ok(vec![if self == Family::Mistral { window } else { None }; layers]);
        }
        if let Some(types) = f.layer_types {
            if types.len() != layers {
                return Err(Error::config(file, "layer_types", format!("{} entries for {layers} layers", types.len())));
            }
            return types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(None),
                    // A sliding layer without a window attends to everything, as in transformers.
                    "sliding_attention" => Ok(window),
                    other => Err(Error::config(file, "layer_types", format!("`{other}` is not supported"))),
                })
                .collect();
        }
        // Qwen's older form: the layers from `max_window_layers` on (transformers' default 28).
        let from = f.max_window_layers.unwrap_or(28);
        Ok((0..layers).map(|l| window.filter(|_| l >= from)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(w: Option<&'a Value>, types: Option<&'a [String]>) -> WindowFields<'a> {
        WindowFields {
            sliding_window: w,
            use_sliding_window: None,
            max_window_layers: None,
            layer_types: types,
            sliding_window_pattern: None,
        }
    }

    #[test]
    fn families_are_named_and_the_rest_refused_by_name() {
        let f = Path::new("config.json");
        assert_eq!(Family::from_model_type(f, "qwen3").unwrap(), Family::Qwen3);
        assert_eq!(Family::from_model_type(f, "gemma3_text").unwrap(), Family::Gemma3);
        let e = Family::from_model_type(f, "gemma3").unwrap_err().to_string();
        assert!(e.contains("model_type") && e.contains("gemma3_text)"), "{e}");
        assert!(Family::from_model_type(f, "qwen3_moe").unwrap_err().to_string().contains("mixture-of-experts"));
        assert!(Family::Qwen2.qkv_bias() && !Family::Qwen3.qkv_bias() && Family::Qwen3.qk_norm());
    }

    #[test]
    fn windows_follow_each_familys_fields() {
        let f = Path::new("config.json");
        let eight = Value::from(8);
        assert_eq!(Family::Mistral.layer_windows(f, 2, &fields(Some(&eight), None)).unwrap(), [Some(8), Some(8)]);
        assert_eq!(Family::Mistral.layer_windows(f, 2, &fields(Some(&Value::Null), None)).unwrap(), [None, None]);
        // Qwen: off unless use_sliding_window, and then only from max_window_layers on.
        assert_eq!(Family::Qwen2.layer_windows(f, 2, &fields(Some(&eight), None)).unwrap(), [None, None]);
        let on =
            WindowFields { use_sliding_window: Some(true), max_window_layers: Some(1), ..fields(Some(&eight), None) };
        assert_eq!(Family::Qwen2.layer_windows(f, 2, &on).unwrap(), [None, Some(8)]);
        let on_by_default = WindowFields { use_sliding_window: Some(true), ..fields(Some(&eight), None) };
        assert_eq!(Family::Qwen2.layer_windows(f, 30, &on_by_default).unwrap()[27..], [None, Some(8), Some(8)]);
        let types = ["sliding_attention".to_string(), "full_attention".to_string()];
        let typed = WindowFields { use_sliding_window: Some(true), ..fields(Some(&eight), Some(&types)) };
        assert_eq!(Family::Qwen3.layer_windows(f, 2, &typed).unwrap(), [Some(8), None]);
        // use_sliding_window false drops the window even where layer_types says sliding.
        assert_eq!(Family::Qwen3.layer_windows(f, 2, &fields(Some(&eight), Some(&types))).unwrap(), [None, None]);
        // Mistral windows every layer, whatever layer_types says; no window: full attention.
        assert_eq!(Family::Mistral.layer_windows(f, 2, &fields(Some(&eight), Some(&types))).unwrap(), [Some(8); 2]);
        assert_eq!(Family::Mistral.layer_windows(f, 2, &fields(None, Some(&types))).unwrap(), [None, None]);
        assert!(Family::Mistral.layer_windows(f, 2, &fields(Some(&Value::from(0)), None)).is_err());
        // Gemma 3: every sixth layer global unless layer_types says otherwise.
        let gemma = Family::Gemma3.layer_windows(f, 7, &fields(Some(&eight), None)).unwrap();
        assert_eq!(gemma, [Some(8), Some(8), Some(8), Some(8), Some(8), None, Some(8)]);
    }
}
