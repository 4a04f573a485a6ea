//! `config.json` and `generation_config.json` of a Hugging Face Llama-family folder.
//!
//! Both the transformers 4.x form (top-level `rope_theta`, `rope_scaling`, `torch_dtype`)
//! and the 5.x form (`rope_parameters`, `dtype`) are accepted.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// How rotary position frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f32,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Divisor for low frequencies.
        factor: f32,
        /// Wavelength bound (in units of the original context) below which frequencies are scaled.
        low_freq_factor: f32,
        /// Wavelength bound above which frequencies are kept.
        high_freq_factor: f32,
        /// The context length the model was pre-trained on.
        original_max_position_embeddings: usize,
    },
}

/// The dtype weights are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

/// The parts of `config.json` the decoder needs, validated.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// `model_type` as written (`llama`, `mistral`, `qwen2`, `qwen3`).
    pub model_type: String,
    /// The family: what of the decoder differs from Llama.
    pub family: super::Family,
    /// Each layer's sliding attention window in tokens (`None`: the whole context).
    pub layer_windows: Vec<Option<usize>>,
    /// The RoPE base of sliding layers, where it differs from the global one (Gemma 3).
    pub rope_local_theta: Option<f32>,
    /// Attention scores are scaled by 1/√this (Gemma's `query_pre_attn_scalar`; else head_dim).
    pub query_pre_attn_scalar: Option<f32>,
    /// Logits become `tanh(logits / cap) · cap` (Gemma's `final_logit_softcapping`).
    pub final_logit_softcapping: Option<f32>,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f32,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Longest sequence the model handles.
    pub max_position_embeddings: usize,
    /// Whether the output head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Declared weight dtype, if the file states one.
    pub dtype: Option<WeightDType>,
    /// Beginning-of-sequence token, if declared.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens declared in `config.json`.
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f32>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    rope_local_base_freq: Option<f32>,
    query_pre_attn_scalar: Option<f64>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
    sliding_window_pattern: Option<usize>,
    #[serde(rename = "_sliding_window_pattern")]
    sliding_window_pattern_private: Option<usize>,
    sliding_window: Option<Value>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
}

/// Reads a JSON file into `T`, naming the file on any error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => Error::config(path, "-", "is not UTF-8 text"),
        _ => Error::io(path, e),
    })?;
    let mut de = serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." || field == "?" { "-".to_string() } else { field };
        let message = e.inner().to_string();
        Error::config_because(path, field, message, e.into_inner())
    })
}

fn required(file: &Path, field: &str, v: Option<usize>) -> Result<usize> {
    match v {
        Some(0) => Err(Error::config(file, field, "must be greater than zero")),
        Some(v) => Ok(v),
        None => Err(Error::config(file, field, "missing")),
    }
}

/// Reads token ids that may be written as a number, a list of numbers, or null.
pub(crate) fn token_ids(file: &Path, field: &str, v: Option<&Value>) -> Result<Vec<u32>> {
    let as_id = |v: &Value| {
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| Error::config(file, field, format!("not a token id: {v}")))
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

fn parse_dtype(file: &Path, field: &str, s: &str) -> Result<WeightDType> {
    match s {
        "float32" => Ok(WeightDType::F32),
        "float16" => Ok(WeightDType::F16),
        "bfloat16" => Ok(WeightDType::BF16),
        other => Err(Error::config(file, field, format!("unsupported dtype `{other}` (float32, float16, bfloat16)"))),
    }
}

fn rope_number(file: &Path, field: &str, obj: &Value, key: &str) -> Result<f64> {
    obj.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| Error::config(file, format!("{field}.{key}"), "missing or not a number"))
}

fn parse_rope(file: &Path, field: &str, obj: &Value) -> Result<RopeScaling> {
    if obj.is_null() {
        return Ok(RopeScaling::Default);
    }
    let kind = obj.get("rope_type").or_else(|| obj.get("type")).and_then(Value::as_str).unwrap_or("default");
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear { factor: rope_number(file, field, obj, "factor")? as f32 }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: rope_number(file, field, obj, "factor")? as f32,
            low_freq_factor: rope_number(file, field, obj, "low_freq_factor")? as f32,
            high_freq_factor: rope_number(file, field, obj, "high_freq_factor")? as f32,
            original_max_position_embeddings: rope_number(file, field, obj, "original_max_position_embeddings")?
                as usize,
        }),
        other => Err(Error::config(
            file,
            format!("{field}.rope_type"),
            format!("unsupported RoPE scaling `{other}` (default, linear, llama3)"),
        )),
    }
}

/// One named weight of a layer, and its length.
pub type Named = (String, usize);

/// The weights a layer has beyond Llama's, as the family names them (`None`: the family has no
/// such group); the CPU and the GPU loaders both read them from here.
pub struct LayerExtras {
    /// q, k and v biases (Qwen2).
    pub qkv_bias: Option<[Named; 3]>,
    /// q and k per-head norms (Qwen3, Gemma 3).
    pub qk_norm: Option<[Named; 2]>,
    /// The pre- and post-MLP norms (Gemma 3).
    pub ffn_norms: Option<[Named; 2]>,
}

impl LayerExtras {
    /// One group loaded with `load(name, length)`.
    pub fn load<T, const N: usize>(
        group: &Option<[Named; N]>,
        mut load: impl FnMut(&str, usize) -> Result<T>,
    ) -> Result<Option<[T; N]>> {
        let Some(group) = group else { return Ok(None) };
        let loaded = group.iter().map(|(name, len)| load(name, *len)).collect::<Result<Vec<T>>>()?;
        Ok(loaded.try_into().ok())
    }
}

impl ModelConfig {
    /// Layer `l`'s weights beyond Llama's (see [`LayerExtras`]).
    pub fn layer_extras(&self, l: usize) -> LayerExtras {
        let at = |name: &str, len: usize| (format!("model.layers.{l}.{name}"), len);
        let (q, kv, hd, h) =
            (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim, self.hidden_size);
        LayerExtras {
            qkv_bias: self.family.qkv_bias().then(|| {
                [at("self_attn.q_proj.bias", q), at("self_attn.k_proj.bias", kv), at("self_attn.v_proj.bias", kv)]
            }),
            qk_norm: self
                .family
                .qk_norm()
                .then(|| [at("self_attn.q_norm.weight", hd), at("self_attn.k_norm.weight", hd)]),
            ffn_norms: self
                .family
                .sandwich_norms()
                .then(|| [at("pre_feedforward_layernorm.weight", h), at("post_feedforward_layernorm.weight", h)]),
        }
    }

    /// The configuration RoPE tables are made from for layer `l`: the sliding layers' own base
    /// (unscaled) where the family gives them one, else this one.
    pub fn rope_for_layer(&self, l: usize) -> std::borrow::Cow<'_, ModelConfig> {
        match (self.rope_local_theta, self.layer_windows.get(l).copied().flatten()) {
            (Some(theta), Some(_)) => std::borrow::Cow::Owned(ModelConfig {
                rope_theta: theta,
                rope_scaling: RopeScaling::Default,
                ..self.clone()
            }),
            _ => std::borrow::Cow::Borrowed(self),
        }
    }

    /// Whether layer `l` reads the sliding layers' RoPE tables rather than the global ones.
    pub fn local_rope(&self, l: usize) -> bool {
        self.rope_local_theta.is_some() && self.layer_windows.get(l).copied().flatten().is_some()
    }

    /// The scale of attention scores: 1/√`query_pre_attn_scalar` where given, else 1/√head_dim.
    pub fn attention_scale(&self) -> f32 {
        1.0 / self.query_pre_attn_scalar.unwrap_or(self.head_dim as f32).sqrt()
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: RawConfig = read_json(path)?;
        let f = path;
        let model_type = raw.model_type.clone().unwrap_or_else(|| "llama".to_string());
        let family = super::Family::from_model_type(f, &model_type)?;
        // Qwen2's q/k/v biases are the family's own; a bias on every attention projection
        // (`attention_bias`, o included) is not supported in any family.
        if raw.attention_bias == Some(true) {
            return Err(Error::config(f, "attention_bias", "attention biases are not supported"));
        }
        if raw.mlp_bias == Some(true) {
            return Err(Error::config(f, "mlp_bias", "MLP biases are not supported"));
        }
        let (act_field, _) = family.activation();
        let (given, name) = match act_field {
            "hidden_activation" => {
                (raw.hidden_activation.as_deref().or(raw.hidden_act.as_deref()), "gelu_pytorch_tanh")
            }
            _ => (raw.hidden_act.as_deref(), "silu"),
        };
        if let Some(given) = given
            && given != name
            && !(name == "gelu_pytorch_tanh" && given == "gelu_tanh")
        {
            return Err(Error::config(f, act_field, format!("`{given}` is not supported ({name})")));
        }
        if raw.attn_logit_softcapping.is_some() {
            return Err(Error::config(f, "attn_logit_softcapping", "attention logit soft-capping is not supported"));
        }
        if raw.use_bidirectional_attention == Some(true) {
            return Err(Error::config(f, "use_bidirectional_attention", "only causal attention is supported"));
        }
        let positive = |field: &str, v: Option<f64>| match v {
            Some(x) if !(x.is_finite() && x > 0.0) => Err(Error::config(f, field, "must be a positive number")),
            v => Ok(v.map(|x| x as f32)),
        };
        let gemma = family == super::Family::Gemma3;
        // Gemma3TextConfig's default, where a config leaves it out.
        let query_pre_attn_scalar =
            positive("query_pre_attn_scalar", raw.query_pre_attn_scalar)?.or(gemma.then_some(256.0));
        let final_logit_softcapping = positive("final_logit_softcapping", raw.final_logit_softcapping)?;
        let hidden_size = required(f, "hidden_size", raw.hidden_size)?;
        let num_heads = required(f, "num_attention_heads", raw.num_attention_heads)?;
        let num_kv_heads = required(f, "num_key_value_heads", raw.num_key_value_heads.or(Some(num_heads)))?;
        if num_heads % num_kv_heads != 0 {
            return Err(Error::config(
                f,
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => required(f, "head_dim", Some(d))?,
            // Qwen3's own default, independent of hidden / heads (transformers' Qwen3Config).
            None if family == super::Family::Qwen3 => 128,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => return Err(Error::config(f, "hidden_size", "not a multiple of num_attention_heads")),
        };
        if head_dim % 2 != 0 {
            return Err(Error::config(f, "head_dim", "must be even for RoPE"));
        }
        // Gemma 3 (transformers 5.x): one rope_parameters per layer type; the global layers'
        // first, the sliding layers' base kept apart.
        let per_type = raw.rope_parameters.as_ref().and_then(|p| p.get("full_attention").map(|g| (g, p)));
        let rope_local_theta = match per_type {
            Some((_, p)) => {
                let local = p.get("sliding_attention");
                let kind = local.and_then(|l| l.get("rope_type")).and_then(Value::as_str).unwrap_or("default");
                if kind != "default" {
                    let message = format!("`{kind}` is not supported for sliding layers (default)");
                    return Err(Error::config(f, "rope_parameters.sliding_attention.rope_type", message));
                }
                local.and_then(|l| l.get("rope_theta")).and_then(Value::as_f64).map(|t| t as f32)
            }
            None => raw.rope_local_base_freq,
        }
        // Gemma 3's sliding layers: base 10,000 unless the config says otherwise.
        .or(gemma.then_some(10_000.0));
        let global = per_type.map(|(g, _)| g.clone()).or_else(|| raw.rope_parameters.clone());
        // transformers 5.x: rope_parameters holds theta and scaling; 4.x: top-level fields.
        let (rope_theta, rope_scaling) = match &global {
            Some(p) if !p.is_null() => {
                let theta = p.get("rope_theta").and_then(Value::as_f64).map(|t| t as f32);
                (theta.or(raw.rope_theta), parse_rope(f, "rope_parameters", p)?)
            }
            _ => (
                raw.rope_theta,
                match &raw.rope_scaling {
                    Some(s) => parse_rope(f, "rope_scaling", s)?,
                    None => RopeScaling::Default,
                },
            ),
        };
        let rope_theta = rope_theta.unwrap_or(10000.0);
        if rope_theta.is_nan() || rope_theta <= 1.0 {
            return Err(Error::config(f, "rope_theta", "must be greater than 1"));
        }
        let dtype = match (&raw.dtype, &raw.torch_dtype) {
            (Some(d), _) => Some(parse_dtype(f, "dtype", d)?),
            (None, Some(d)) => Some(parse_dtype(f, "torch_dtype", d)?),
            (None, None) => None,
        };
        let bos = token_ids(f, "bos_token_id", raw.bos_token_id.as_ref())?;
        let num_layers = required(f, "num_hidden_layers", raw.num_hidden_layers)?;
        let windows = super::family::WindowFields {
            sliding_window: raw.sliding_window.as_ref(),
            use_sliding_window: raw.use_sliding_window,
            max_window_layers: raw.max_window_layers,
            layer_types: raw.layer_types.as_deref(),
            sliding_window_pattern: raw.sliding_window_pattern.or(raw.sliding_window_pattern_private),
        };
        let layer_windows = family.layer_windows(f, num_layers, &windows)?;
        Ok(ModelConfig {
            model_type,
            family,
            layer_windows,
            rope_local_theta,
            query_pre_attn_scalar,
            final_logit_softcapping,
            vocab_size: required(f, "vocab_size", raw.vocab_size)?,
            hidden_size,
            intermediate_size: required(f, "intermediate_size", raw.intermediate_size)?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: required(
                f,
                "max_position_embeddings",
                raw.max_position_embeddings.or(Some(2048)),
            )?,
            // transformers' defaults: tied for Gemma 3 (its hub configs leave the field out).
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(family == super::Family::Gemma3),
            dtype,
            bos_token_id: bos.first().copied(),
            eos_token_ids: token_ids(f, "eos_token_id", raw.eos_token_id.as_ref())?,
        })
    }
}

/// Defaults from `generation_config.json` (all optional).
#[derive(Debug, Clone, Default)]
pub struct GenerationDefaults {
    /// Extra end-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
    /// Whether the model's authors meant it to be sampled rather than decoded greedily.
    pub do_sample: bool,
    /// Default temperature.
    pub temperature: Option<f32>,
    /// Default nucleus mass.
    pub top_p: Option<f32>,
    /// Default top-k.
    pub top_k: Option<usize>,
    /// Default repetition penalty.
    pub repetition_penalty: Option<f32>,
}

#[derive(Deserialize)]
struct RawGeneration {
    eos_token_id: Option<Value>,
    do_sample: Option<bool>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    repetition_penalty: Option<f32>,
}

impl GenerationDefaults {
    /// Reads `generation_config.json`; a folder without one gets the defaults.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let raw: RawGeneration = read_json(path)?;
        Ok(GenerationDefaults {
            eos_token_ids: token_ids(path, "eos_token_id", raw.eos_token_id.as_ref())?,
            do_sample: raw.do_sample.unwrap_or(false),
            temperature: raw.temperature,
            top_p: raw.top_p,
            top_k: raw.top_k,
            repetition_penalty: raw.repetition_penalty,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> std::path::PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, text).expect("write temp config");
        p
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("openlora-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    /// A Gemma 3 text config as the hub's 1B carries it (4.x form, fields at their defaults left
    /// out) takes transformers' defaults; the 5.x form's per-layer-type RoPE is read per layer.
    #[test]
    fn gemma3_configs_take_transformers_defaults() {
        let d = tmp("gemma3");
        let legacy = r#"{"model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 7, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 512,
            "sliding_window_pattern": 6, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32}"#;
        let c = ModelConfig::from_file(&write(&d, legacy)).expect("parses");
        assert!(c.tie_word_embeddings, "tied unless said otherwise");
        assert_eq!(c.query_pre_attn_scalar, Some(256.0));
        assert_eq!(c.layer_windows[5], None, "every sixth layer is global");
        assert_eq!(c.layer_windows[0], Some(512));
        assert!(c.local_rope(0) && !c.local_rope(5));
        assert_eq!((c.rope_for_layer(0).rope_theta, c.rope_for_layer(5).rope_theta), (10_000.0, 1_000_000.0));
        let v5 = r#"{"model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 4, "max_position_embeddings": 32,
            "layer_types": ["sliding_attention", "full_attention"], "query_pre_attn_scalar": 16,
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}"#;
        let c = ModelConfig::from_file(&write(&d, v5)).expect("parses");
        assert_eq!(c.layer_windows, [Some(4096), None], "the default window");
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 8.0 }, "scaling on the global layers");
        assert_eq!(c.rope_for_layer(0).rope_scaling, RopeScaling::Default, "none on the sliding ones");
        assert!((c.attention_scale() - 0.25).abs() < 1e-6);
        let capped = v5.replace(r#""query_pre_attn_scalar": 16"#, r#""attn_logit_softcapping": 50.0"#);
        let e = ModelConfig::from_file(&write(&d, &capped)).unwrap_err().to_string();
        assert!(e.contains("attn_logit_softcapping"), "{e}");
        std::fs::remove_dir_all(&d).ok();
    }

    const BASE: &str = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32"#;

    #[test]
    fn legacy_and_v5_forms_agree() {
        let d = tmp("forms");
        let legacy = write(
            &d,
            &format!(
                r#"{{{BASE}, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
            "rope_scaling": {{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}}}"#
            ),
        );
        let a = ModelConfig::from_file(&legacy).expect("legacy config");
        let v5 = write(
            &d,
            &format!(
                r#"{{{BASE}, "dtype": "bfloat16", "rope_parameters": {{"rope_theta": 500000.0,
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}}}}"#
            ),
        );
        let b = ModelConfig::from_file(&v5).expect("v5 config");
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert_eq!(a.rope_theta, b.rope_theta);
        assert_eq!(a.dtype, Some(WeightDType::BF16));
        assert_eq!(b.dtype, Some(WeightDType::BF16));
        assert_eq!(a.num_kv_heads, 2);
        assert_eq!(a.head_dim, 4);
    }

    #[test]
    fn errors_name_the_field() {
        let d = tmp("errors");
        let cases = [
            (format!(r#"{{{BASE}, "num_key_value_heads": 3}}"#), "num_key_value_heads"),
            (r#"{"vocab_size": 10}"#.to_string(), "hidden_size"),
            (
                format!(r#"{{{BASE}, "rope_scaling": {{"rope_type": "yarn", "factor": 2.0}}}}"#),
                "rope_scaling.rope_type",
            ),
            (
                format!(r#"{{{BASE}, "rope_scaling": {{"rope_type": "llama3", "factor": 2.0}}}}"#),
                "rope_scaling.low_freq_factor",
            ),
            (format!(r#"{{{BASE}, "torch_dtype": "int8"}}"#), "torch_dtype"),
            (format!(r#"{{{BASE}, "model_type": "gpt2"}}"#), "model_type"),
            (format!(r#"{{{BASE}, "attention_bias": true}}"#), "attention_bias"),
            ("{not json".to_string(), "-"),
        ];
        for (text, field) in cases {
            let p = write(&d, &text);
            match ModelConfig::from_file(&p) {
                Err(Error::Config { field: got, .. }) => assert_eq!(got, field, "for {text}"),
                other => panic!("expected a config error on {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn eos_may_be_a_list() {
        let d = tmp("eos");
        let p = write(&d, &format!(r#"{{{BASE}, "eos_token_id": [1, 7], "bos_token_id": 0}}"#));
        let c = ModelConfig::from_file(&p).expect("config");
        assert_eq!(c.eos_token_ids, vec![1, 7]);
        assert_eq!(c.bos_token_id, Some(0));
    }

    /// `config.json` in the other form transformers writes: 5.x (`rope_parameters`, per layer
    /// type for Gemma 3; `dtype`; `layer_types`) to 4.x (top-level `rope_theta` /
    /// `rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`, `torch_dtype`), and back.
    fn other_form(mut c: serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
        let rename = |c: &mut serde_json::Map<String, Value>, from: &str, to: &str| {
            if let Some(v) = c.remove(from) {
                c.insert(to.into(), v);
            }
        };
        // What a 4.x `rope_scaling` holds of a 5.x `rope_parameters` entry (none when default).
        let scaling = |p: &Value| {
            let mut p = p.as_object().cloned().unwrap_or_default();
            let theta = p.remove("rope_theta");
            let default = p.get("rope_type").and_then(Value::as_str).unwrap_or("default") == "default";
            (theta, (!default).then_some(Value::Object(p)))
        };
        match c.remove("rope_parameters") {
            Some(rope) => {
                rename(&mut c, "dtype", "torch_dtype");
                let global = match rope.get("full_attention") {
                    Some(full) => {
                        let local = rope.get("sliding_attention").and_then(|l| l.get("rope_theta")).cloned();
                        c.insert("rope_local_base_freq".into(), local.expect("a sliding base"));
                        full.clone()
                    }
                    None => rope,
                };
                let (theta, scaled) = scaling(&global);
                c.insert("rope_theta".into(), theta.expect("rope_theta"));
                if let Some(s) = scaled {
                    c.insert("rope_scaling".into(), s);
                }
                if let Some(Value::Array(types)) = c.remove("layer_types") {
                    if c.get("model_type").and_then(Value::as_str) == Some("gemma3_text") {
                        // Every n-th layer global: n is where the first global one lies.
                        let n = types.iter().position(|t| t == "full_attention").expect("a global layer") + 1;
                        c.remove("_sliding_window_pattern");
                        c.insert("sliding_window_pattern".into(), n.into());
                    }
                }
            }
            None => {
                rename(&mut c, "torch_dtype", "dtype");
                let mut rope = c.remove("rope_scaling").and_then(|s| s.as_object().cloned()).unwrap_or_default();
                rope.entry("rope_type").or_insert("default".into());
                rope.insert("rope_theta".into(), c.remove("rope_theta").unwrap_or(10_000.0.into()));
                c.insert("rope_parameters".into(), Value::Object(rope));
            }
        }
        c
    }

    /// Every family's fixture (written by transformers in one form) reads the same in the other.
    #[test]
    fn every_fixture_reads_the_same_in_both_config_forms() {
        let d = tmp("both-forms");
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
        let (mut forms, mut gemma) = (std::collections::BTreeSet::new(), false);
        for entry in std::fs::read_dir(&models).expect("fixtures") {
            let path = entry.expect("entry").path().join("config.json");
            let text = std::fs::read_to_string(&path).expect("config");
            let raw: serde_json::Map<String, Value> = serde_json::from_str(&text).expect("json");
            let other = serde_json::to_string(&other_form(raw.clone())).expect("json");
            let (a, b) =
                (ModelConfig::from_file(&path).expect("as written"), ModelConfig::from_file(&write(&d, &other)));
            let b = b.unwrap_or_else(|e| panic!("{}: the other form: {e}\n{other}", path.display()));
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "{}: the forms disagree\n{other}", path.display());
            forms.insert(raw.contains_key("rope_parameters"));
            gemma |= a.family == crate::shape::Family::Gemma3;
        }
        assert!(forms.len() == 2 && gemma, "fixtures of both forms, Gemma 3 among them");
        std::fs::remove_dir_all(&d).ok();
    }
}
