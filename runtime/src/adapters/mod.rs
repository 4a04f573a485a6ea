//! PEFT LoRA adapter folders: validation against the base model and loading to host memory.

pub mod config;
pub mod store;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

pub use config::LoraConfig;

use crate::error::{Error, LoadError, Result};
use crate::model::weights::WeightFiles;
use crate::shape::{ModelConfig, Proj};

/// File name of an adapter's weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// File name of an adapter's configuration.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// Optional openlora metadata in an adapter folder: `{"owner": "alice"}`.
pub const OWNER_FILE: &str = "openlora.json";

/// What a validated adapter folder holds, read from its config and safetensors header only.
#[derive(Debug, Clone)]
pub struct AdapterManifest {
    /// The folder.
    pub dir: PathBuf,
    /// Its configuration.
    pub config: LoraConfig,
    /// Every `(layer, projection)` that carries LoRA weights.
    pub modules: Vec<(usize, Proj)>,
    /// Bytes its weights take in f32.
    pub f32_bytes: usize,
    /// Who owns it (from `openlora.json`), the payee of its share of each charge.
    pub owner: Option<String>,
    /// sha256 of its configuration and weights (see [`crate::model::content_hash`]).
    pub sha256: String,
}

/// One projection's LoRA weights in host memory, f32.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// Rank.
    pub rank: usize,
    /// Multiplier applied to the product.
    pub scale: f32,
    /// `A`, `[rank, in]` row-major.
    pub a: Vec<f32>,
    /// `Bᵀ`, `[rank, out]` row-major (PEFT stores `B` as `[out, rank]`).
    pub bt: Vec<f32>,
}

/// An adapter loaded into host memory: per layer, per projection, its weights if it has any.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    /// `layers[l][proj as usize]`.
    pub layers: Vec<[Option<LoraModule>; 7]>,
    /// Bytes held.
    pub bytes: usize,
}

/// Splits a PEFT tensor name into `(layer, projection, is_a)`.
fn parse_tensor_name(name: &str) -> Option<(usize, Proj, bool)> {
    let rest = name.strip_prefix("base_model.model.")?;
    let rest = rest.strip_prefix("model.layers.")?;
    let (digits, rest) = rest.split_once('.')?;
    let layer: usize = digits.parse().ok()?;
    // Only the canonical spelling: `00` or `+0` would name layer 0 a second time.
    if layer.to_string() != digits {
        return None;
    }
    let (module, rest) = rest.split_once(".lora_")?;
    let proj = config::proj_from_module(module)?;
    let parent_ok = match proj {
        Proj::Q | Proj::K | Proj::V | Proj::O => module == format!("self_attn.{}", proj.module_name()),
        _ => module == format!("mlp.{}", proj.module_name()),
    };
    if !parent_ok {
        return None;
    }
    match rest {
        "A.weight" => Some((layer, proj, true)),
        "B.weight" => Some((layer, proj, false)),
        _ => None,
    }
}

impl AdapterManifest {
    /// Validates an adapter folder against a base model without reading its weight data:
    /// the config's fields, every tensor's name and shape, and that `A` and `B` come in pairs.
    pub fn inspect(dir: &Path, base: &ModelConfig) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::from(LoadError::MissingFile { path: dir.to_path_buf(), what: "adapter folder" }));
        }
        let cfg_path = dir.join(CONFIG_FILE);
        if !cfg_path.exists() {
            return Err(Error::from(LoadError::MissingFile { path: cfg_path, what: "PEFT adapter configuration" }));
        }
        let config = LoraConfig::from_file(&cfg_path)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.exists() {
            let bin = dir.join("adapter_model.bin");
            if bin.exists() {
                return Err(Error::from(LoadError::WeightFile {
                    file: bin,
                    message: "pickled adapters are not loaded (they can run code); convert with \
                              `PeftModel.from_pretrained(base, dir).save_pretrained(dir, safe_serialization=True)`"
                        .into(),
                }));
            }
            return Err(Error::from(LoadError::MissingFile { path: weights_path, what: "adapter weights" }));
        }
        let files = WeightFiles::open(dir, std::slice::from_ref(&weights_path))?;
        let mut seen: Vec<(usize, Proj, bool)> = Vec::new();
        let mut f32_bytes = 0;
        let mut names: Vec<&str> = files.names().collect();
        names.sort_unstable();
        for name in names {
            let (layer, proj, is_a) = parse_tensor_name(name).ok_or_else(|| {
                Error::from(LoadError::WeightFile {
                    file: weights_path.clone(),
                    message: format!("tensor `{name}` is not a LoRA A/B weight of a Llama projection"),
                })
            })?;
            if layer >= base.num_layers {
                return Err(Error::from(LoadError::WeightFile {
                    file: weights_path.clone(),
                    message: format!("tensor `{name}`: the base model has {} layers", base.num_layers),
                }));
            }
            if let Some(targets) = &config.target_modules
                && !targets.contains(&proj)
            {
                return Err(Error::config(
                    &cfg_path,
                    "target_modules",
                    format!("does not list `{}`, but tensor `{name}` exists", proj.module_name()),
                ));
            }
            let (out_dim, in_dim) = proj.shape(base);
            let expected = if is_a { vec![config.rank, in_dim] } else { vec![out_dim, config.rank] };
            let (_, got) = files.shape(name)?;
            let dtype = files.dtype(name)?;
            if !matches!(dtype, safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16) {
                return Err(Error::from(LoadError::WeightFile {
                    file: weights_path.clone(),
                    message: format!("tensor `{name}` has dtype {dtype:?}; LoRA weights are F32, F16 or BF16"),
                }));
            }
            if got != expected {
                return Err(Error::from(LoadError::TensorShape {
                    file: weights_path.clone(),
                    tensor: name.to_string(),
                    expected,
                    got,
                }));
            }
            f32_bytes += expected.iter().product::<usize>() * 4;
            seen.push((layer, proj, is_a));
        }
        let mut modules: Vec<(usize, Proj)> = seen.iter().filter(|s| s.2).map(|s| (s.0, s.1)).collect();
        modules.sort_by_key(|&(l, p)| (l, p as usize));
        for &(layer, proj, is_a) in &seen {
            if !seen.contains(&(layer, proj, !is_a)) {
                let (have, missing) = if is_a { ("A", "B") } else { ("B", "A") };
                return Err(Error::from(LoadError::MissingTensor {
                    file: weights_path.clone(),
                    tensor: format!(
                        "base_model.model.{}",
                        proj.tensor_name(layer).replace(".weight", &format!(".lora_{missing}.weight"))
                    ) + &format!(" (lora_{have} is present)"),
                }));
            }
        }
        if modules.is_empty() {
            return Err(Error::from(LoadError::WeightFile {
                file: weights_path,
                message: "holds no LoRA weights".into(),
            }));
        }
        let owner = read_owner(dir)?;
        let sha256 = crate::model::content_hash(dir, &[cfg_path.clone(), weights_path.clone()])?;
        Ok(AdapterManifest { dir: dir.to_path_buf(), config, modules, f32_bytes, owner, sha256 })
    }

    /// Reads the weights into host memory as f32 (re-validating shapes against the file, which
    /// may have changed since registration).
    pub fn load(&self, base: &ModelConfig) -> Result<LoraWeights> {
        let weights_path = self.dir.join(WEIGHTS_FILE);
        let files = WeightFiles::open(&self.dir, std::slice::from_ref(&weights_path))?;
        let mut layers: Vec<[Option<LoraModule>; 7]> = (0..base.num_layers).map(|_| Default::default()).collect();
        let scale = self.config.scale();
        let r = self.config.rank;
        for &(layer, proj) in &self.modules {
            let (out_dim, in_dim) = proj.shape(base);
            let stem = format!("base_model.model.{}", proj.tensor_name(layer).trim_end_matches(".weight"));
            let a = files.load(&format!("{stem}.lora_A.weight"), &[r, in_dim], DType::F32, &Device::Cpu)?;
            let b = files.load(&format!("{stem}.lora_B.weight"), &[out_dim, r], DType::F32, &Device::Cpu)?;
            let a: Vec<f32> = a.flatten_all()?.to_vec1()?;
            let bt: Vec<f32> = b.t()?.contiguous()?.flatten_all()?.to_vec1()?;
            layers[layer][proj as usize] = Some(LoraModule { rank: r, scale, a, bt });
        }
        Ok(LoraWeights { layers, bytes: self.f32_bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_parse() {
        assert_eq!(
            parse_tensor_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, Proj::Q, true))
        );
        assert_eq!(
            parse_tensor_name("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"),
            Some((0, Proj::Down, false))
        );
        assert_eq!(parse_tensor_name("base_model.model.model.layers.0.mlp.q_proj.lora_B.weight"), None);
        assert_eq!(parse_tensor_name("base_model.model.lm_head.lora_A.weight"), None);
        assert_eq!(parse_tensor_name("base_model.model.model.layers.00.self_attn.q_proj.lora_A.weight"), None);
        assert_eq!(parse_tensor_name("base_model.model.model.layers.+0.self_attn.q_proj.lora_A.weight"), None);
        assert_eq!(parse_tensor_name("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"), None);
    }
}

/// The owner named by a folder's `openlora.json`, if the file exists; errors name the field.
fn read_owner(dir: &Path) -> Result<Option<String>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Meta {
        owner: Option<String>,
    }
    let path = dir.join(OWNER_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let meta: Meta =
        serde_json::from_str(&text).map_err(|e| Error::config_because(&path, "owner", e.to_string(), e))?;
    match meta.owner {
        Some(o) if !valid_owner(&o) => {
            Err(Error::config(&path, "owner", "owners are 1-64 characters of A-Z a-z 0-9 - _ . @"))
        }
        other => Ok(other),
    }
}

/// Whether `owner` is an acceptable owner name (it becomes part of a ledger account name).
pub fn valid_owner(owner: &str) -> bool {
    !owner.is_empty()
        && owner.len() <= 64
        && owner.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}
