//! Llama-family models loaded from a Hugging Face folder.

pub mod dense;
pub mod kv;
pub mod llama;
pub mod lora;
pub mod ops;
pub mod rope;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use candle_core::Device;

pub use crate::shape::{GenerationDefaults, ModelConfig, Proj, RopeScaling, WeightDType};
pub use dense::ServeDType;
pub use kv::{AllocStatus, BLOCK_SIZE, BlockPool, KvDType, PagedKvCache, SeqKv};
pub use llama::{Llama, LogitRows, SeqBatch};
pub use tokenizer::{StreamDecoder, TextTokenizer};
pub use weights::WeightFiles;

use crate::error::{Error, LoadError, Result};

/// Everything loaded from one model folder: configuration, weights and tokenizer.
pub struct LoadedModel {
    /// The folder the model came from.
    pub folder: PathBuf,
    /// Its configuration.
    config: ModelConfig,
    /// The decoder on the CPU (`None` when a GPU backend holds the weights).
    llama: Option<Llama>,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// Defaults from `generation_config.json`.
    pub generation: GenerationDefaults,
    /// Every token id that ends a sequence (config, generation config and tokenizer combined).
    pub eos_token_ids: Vec<u32>,
    /// sha256 of its files (config, tokenizer, weights): the identity ledger entries record.
    pub sha256: String,
}

/// sha256 (hex) over files of a folder, each as its name (relative to `dir`), its length and
/// its bytes, in name order: one hash naming a model's or an adapter's exact content.
pub fn content_hash(dir: &Path, files: &[PathBuf]) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut sorted: Vec<&PathBuf> = files.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for path in sorted {
        let name = path.strip_prefix(dir).unwrap_or(path).to_string_lossy().into_owned();
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        h.update((name.len() as u64).to_be_bytes());
        h.update(name.as_bytes());
        h.update(len.to_be_bytes());
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl LoadedModel {
    /// Loads a model folder on the CPU: `config.json`, `*.safetensors` (memory-mapped),
    /// `tokenizer.json`, and `tokenizer_config.json` / `generation_config.json` when present.
    pub fn load(folder: &Path) -> Result<Self> {
        Self::open(folder, Some(dense::ServeDType::Auto))
    }

    /// [`LoadedModel::load`], the dense weights kept in the dtype `dtype` chooses.
    pub fn load_as(folder: &Path, dtype: dense::ServeDType) -> Result<Self> {
        Self::open(folder, Some(dtype))
    }

    /// Loads and checks everything of a model folder but keeps no CPU weights: for a GPU
    /// backend, which uploads the weights itself.
    pub fn load_without_weights(folder: &Path) -> Result<Self> {
        Self::open(folder, None)
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The decoder on the CPU, if this model was loaded with its weights there.
    pub fn llama(&self) -> Result<&Llama> {
        self.llama.as_ref().ok_or_else(|| Error::device("the model's weights are on the GPU, not the CPU"))
    }

    /// Whether the CPU decoder serves in bf16 (`dtype = "bf16"`, asked for, not merely stored):
    /// its adapter pool then holds bf16 too, as PEFT cast to bf16 does. False when no weights
    /// are on the CPU.
    pub fn serves_bf16(&self) -> bool {
        self.llama.as_ref().is_some_and(|l| l.dtype() == dense::ServeDType::Bf16)
    }

    /// Opens a model folder; with `cpu_dtype`, its weights are loaded for the CPU in that dtype.
    fn open(folder: &Path, cpu_dtype: Option<dense::ServeDType>) -> Result<Self> {
        if !folder.is_dir() {
            return Err(Error::from(LoadError::MissingFile { path: folder.to_path_buf(), what: "model folder" }));
        }
        let config_path = folder.join("config.json");
        if !config_path.exists() {
            return Err(Error::from(LoadError::MissingFile {
                path: config_path,
                what: "model configuration (config.json)",
            }));
        }
        let cfg = ModelConfig::from_file(&config_path)?;
        let tokenizer = TextTokenizer::from_folder(folder)?;
        if tokenizer.vocab_size() > cfg.vocab_size {
            return Err(Error::config(
                &config_path,
                "vocab_size",
                format!("{} is smaller than the tokenizer's vocabulary ({})", cfg.vocab_size, tokenizer.vocab_size()),
            ));
        }
        let generation = GenerationDefaults::from_file(&folder.join("generation_config.json"))?;
        let files = WeightFiles::discover(folder)?;
        let weights = WeightFiles::open(folder, &files)?;
        let llama = match cpu_dtype {
            Some(dtype) => Some(Llama::load_as(&cfg, &weights, &Device::Cpu, dtype)?),
            None => None,
        };
        let mut eos_token_ids = cfg.eos_token_ids.clone();
        for id in generation.eos_token_ids.iter().chain(&tokenizer.eos_token_ids) {
            if !eos_token_ids.contains(id) {
                eos_token_ids.push(*id);
            }
        }
        let mut hashed = files.clone();
        hashed.push(config_path.clone());
        hashed.extend(
            ["tokenizer.json", "tokenizer_config.json"].map(|f| folder.join(f)).into_iter().filter(|p| p.exists()),
        );
        let sha256 = content_hash(folder, &hashed)?;
        Ok(LoadedModel {
            folder: folder.to_path_buf(),
            config: cfg,
            llama,
            tokenizer,
            generation,
            eos_token_ids,
            sha256,
        })
    }
}
