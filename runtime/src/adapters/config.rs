//! `adapter_config.json` of a PEFT LoRA folder: what is supported, what is refused, and why.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::shape::Proj;

/// The validated parts of a PEFT LoRA configuration that change the math.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` declared by the config (tensors must agree).
    pub rank: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// Rank-stabilised scaling (`alpha / sqrt(r)` instead of `alpha / r`).
    pub use_rslora: bool,
    /// Projections the config names; `None` when given as a pattern or `all-linear`
    /// (the tensors present then decide).
    pub target_modules: Option<Vec<Proj>>,
    /// The base model the adapter was trained on, as recorded.
    pub base_model_name_or_path: Option<String>,
}

impl LoraConfig {
    /// The multiplier applied to `B·A·x`.
    pub fn scale(&self) -> f32 {
        let r = self.rank as f64;
        let s = if self.use_rslora { self.alpha / r.sqrt() } else { self.alpha / r };
        s as f32
    }
}

/// Fields that only matter for training or bookkeeping: accepted and ignored.
const IGNORED: &[&str] = &[
    "task_type",
    "inference_mode",
    "lora_dropout",
    "init_lora_weights",
    "revision",
    "auto_mapping",
    "peft_version",
    "loftq_config",
    "eva_config",
    "corda_config",
    "megatron_config",
    "megatron_core",
    "runtime_config",
    "layers_pattern",
    // Which layers carry LoRA weights is read from the tensors themselves.
    "layers_to_transform",
    "exclude_modules",
    "ensure_weight_tying",
    "qalora_group_size",
    "use_qalora",
];

/// Fields whose non-default value changes the math in a way openlora does not implement.
const REFUSED_UNLESS_DEFAULT: &[(&str, &str)] = &[
    ("use_dora", "DoRA (weight-decomposed LoRA) is not supported"),
    ("modules_to_save", "fully trained extra modules are not supported; only LoRA deltas are"),
    ("fan_in_fan_out", "fan_in_fan_out weights (GPT-2 Conv1D layout) do not apply to Llama"),
    ("rank_pattern", "per-module ranks are not supported"),
    ("alpha_pattern", "per-module alphas are not supported"),
    ("lora_bias", "trained LoRA biases are not supported"),
    ("layer_replication", "layer replication is not supported"),
    ("target_parameters", "LoRA on raw parameters is not supported"),
    ("trainable_token_indices", "trainable token embeddings are not supported"),
    ("alora_invocation_tokens", "activated LoRA is not supported"),
    ("arrow_config", "Arrow routing is not supported"),
    ("use_bdlora", "block-diagonal LoRA is not supported"),
];

fn is_default(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

/// Maps a PEFT module name (`q_proj`, or a dotted path ending in it) to a projection.
pub fn proj_from_module(name: &str) -> Option<Proj> {
    let last = name.rsplit('.').next().unwrap_or(name);
    Proj::ALL.into_iter().find(|p| p.module_name() == last)
}

impl LoraConfig {
    /// Reads and validates `adapter_config.json`, naming the field at fault in any error.
    pub fn from_file(path: &Path) -> Result<Self> {
        let v: Value = crate::shape::read_json(path)?;
        let obj = v.as_object().ok_or_else(|| Error::config(path, "-", "not a JSON object"))?;
        Self::from_map(path, obj)
    }

    fn from_map(path: &Path, obj: &Map<String, Value>) -> Result<Self> {
        let err = |field: &str, msg: String| Error::config(path, field, msg);
        let peft_type = obj.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(err("peft_type", format!("`{peft_type}` adapters are not supported (LORA)")));
        }
        match obj.get("bias") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "none" => {}
            Some(other) => return Err(err("bias", format!("{other}: trained biases are not supported (\"none\")"))),
        }
        for (field, why) in REFUSED_UNLESS_DEFAULT {
            if let Some(v) = obj.get(*field)
                && !is_default(v)
            {
                return Err(err(field, format!("{why} (found {v})")));
            }
        }
        let known = |k: &str| {
            IGNORED.contains(&k)
                || REFUSED_UNLESS_DEFAULT.iter().any(|(f, _)| *f == k)
                || matches!(
                    k,
                    "peft_type"
                        | "bias"
                        | "r"
                        | "lora_alpha"
                        | "use_rslora"
                        | "target_modules"
                        | "base_model_name_or_path"
                )
        };
        if let Some((k, v)) = obj.iter().find(|(k, v)| !known(k) && !is_default(v)) {
            return Err(err(
                k,
                format!("unknown field set to {v}; it may change the adapter's math, so it is refused"),
            ));
        }
        let rank = obj
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| err("r", "missing or not a positive integer".into()))? as usize;
        let alpha = match obj.get("lora_alpha") {
            None | Some(Value::Null) => 8.0,
            Some(v) => {
                v.as_f64().filter(|a| a.is_finite()).ok_or_else(|| err("lora_alpha", format!("{v} is not a number")))?
            }
        };
        let use_rslora = match obj.get("use_rslora") {
            None | Some(Value::Null) => false,
            Some(v) => v.as_bool().ok_or_else(|| err("use_rslora", format!("{v} is not true or false")))?,
        };
        let target_modules = match obj.get("target_modules") {
            None | Some(Value::Null) => None,
            Some(Value::String(_)) => None,
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for item in items {
                    let name = item.as_str().ok_or_else(|| err("target_modules", format!("{item} is not a string")))?;
                    let p = proj_from_module(name).ok_or_else(|| {
                        err(
                            "target_modules",
                            format!(
                                "`{name}` is not a Llama projection (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                            ),
                        )
                    })?;
                    if !out.contains(&p) {
                        out.push(p);
                    }
                }
                Some(out)
            }
            Some(other) => return Err(err("target_modules", format!("{other} is not a list or a pattern"))),
        };
        let base_model_name_or_path = obj.get("base_model_name_or_path").and_then(Value::as_str).map(str::to_string);
        Ok(LoraConfig { rank, alpha, use_rslora, target_modules, base_model_name_or_path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<LoraConfig> {
        let v: Value = serde_json::from_str(json).expect("test json");
        LoraConfig::from_map(Path::new("adapter_config.json"), v.as_object().expect("object"))
    }

    fn field_of(r: Result<LoraConfig>) -> String {
        match r {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn reads_a_real_peft_config() {
        let c = parse(
            r#"{"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
            "lora_dropout": 0.05, "bias": "none", "use_rslora": false, "use_dora": false,
            "modules_to_save": null, "task_type": "CAUSAL_LM", "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
            "fan_in_fan_out": false, "init_lora_weights": true, "layers_to_transform": null, "rank_pattern": {},
            "alpha_pattern": {}, "inference_mode": true, "revision": null}"#,
        )
        .expect("valid");
        assert_eq!(c.rank, 16);
        assert_eq!(c.scale(), 2.0);
        assert_eq!(c.target_modules, Some(vec![Proj::Q, Proj::V]));
        assert_eq!(c.base_model_name_or_path.as_deref(), Some("meta-llama/Llama-3.2-1B"));
    }

    #[test]
    fn rslora_scales_by_sqrt_rank() {
        let c =
            parse(r#"{"r": 16, "lora_alpha": 8, "use_rslora": true, "target_modules": "all-linear"}"#).expect("valid");
        assert_eq!(c.scale(), 2.0);
        assert_eq!(c.target_modules, None);
    }

    #[test]
    fn refusals_name_the_field() {
        let base = r#""r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]"#;
        let cases = [
            (format!(r#"{{{base}, "use_dora": true}}"#), "use_dora"),
            (format!(r#"{{{base}, "bias": "all"}}"#), "bias"),
            (format!(r#"{{{base}, "modules_to_save": ["lm_head"]}}"#), "modules_to_save"),
            (format!(r#"{{{base}, "rank_pattern": {{"q_proj": 4}}}}"#), "rank_pattern"),
            (format!(r#"{{{base}, "magic_scaling": 3.0}}"#), "magic_scaling"),
            (format!(r#"{{{base}, "peft_type": "IA3"}}"#), "peft_type"),
            (r#"{"r": 0, "target_modules": ["q_proj"]}"#.to_string(), "r"),
            (r#"{"r": 4, "target_modules": ["embed_tokens"]}"#.to_string(), "target_modules"),
        ];
        for (json, field) in cases {
            assert_eq!(field_of(parse(&json)), field, "{json}");
        }
        // An unknown field left at its default is harmless.
        assert!(parse(&format!(r#"{{{base}, "future_flag": null}}"#)).is_ok());
    }
}
