//! Random weights on the host, for benchmarks and tests at realistic widths without shipping
//! weights: a Llama of any shape ([`llama`]); random PEFT LoRA folders, real
//! `adapter_config.json` and `adapter_model.safetensors` files as PEFT writes them, with seeded
//! uniform weights ([`write`]), or the same weights in memory ([`weights`]); and the GPU
//! benchmark's shape (Llama-7B, rank-r adapters on q/k/v/o).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::adapters::{CONFIG_FILE, LoraModule, LoraWeights, WEIGHTS_FILE};
use crate::error::{Error, LoadError, Result};
use crate::model::{Llama, ModelConfig, Proj};

/// A model of `cfg`'s shape with random weights (scaled like a trained model's), for
/// benchmarks at realistic widths without shipping weights.
pub fn llama(cfg: &ModelConfig, device: &Device) -> Result<Llama> {
    let h = cfg.hidden_size;
    let randn = |rows: usize, cols: usize| Tensor::randn(0f32, (1.0 / cols as f64).sqrt() as f32, (rows, cols), device);
    let ones = || Tensor::ones(h, DType::F32, device);
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for _ in 0..cfg.num_layers {
        let p = |p: Proj| {
            let (o, i) = p.shape(cfg);
            randn(o, i)
        };
        let proj = [p(Proj::Q)?, p(Proj::K)?, p(Proj::V)?, p(Proj::O)?, p(Proj::Gate)?, p(Proj::Up)?, p(Proj::Down)?];
        layers.push((proj, ones()?, ones()?));
    }
    let embed = randn(cfg.vocab_size, h)?;
    Llama::from_parts(cfg, embed.clone(), layers, ones()?, embed, device)
}

/// `config.json` of Llama-7B's shape (the HF PEFT baseline's `LlamaConfig`).
pub const LLAMA_7B_CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
    "torch_dtype": "bfloat16"}"#;

/// Llama-7B's shape.
pub fn llama_7b() -> Result<ModelConfig> {
    let dir = std::env::temp_dir().join(format!("openlora-7b-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let path = dir.join("config.json");
    std::fs::write(&path, LLAMA_7B_CONFIG).map_err(|e| Error::io(&path, e))?;
    ModelConfig::from_file(&path)
}

/// The projections the baseline's adapters target.
pub const QKVO: [Proj; 4] = [Proj::Q, Proj::K, Proj::V, Proj::O];

/// The benchmark's adapters on q/k/v/o: rank `rank`, values from `seed`, made in memory (the
/// serving-path run writes the same to disk).
pub fn random_adapter(cfg: &ModelConfig, rank: usize, seed: u64) -> LoraWeights {
    let spec = RandomAdapter { rank, targets: &QKVO, scale: 1.0, seed, dtype: DType::BF16 };
    weights(cfg, &spec)
}

/// What to write.
#[derive(Debug, Clone)]
pub struct RandomAdapter<'a> {
    /// Rank of every module.
    pub rank: usize,
    /// Projections adapted in every layer.
    pub targets: &'a [Proj],
    /// `A` is uniform in ±`scale`/√in, `B` in ±`scale`/√rank.
    pub scale: f32,
    /// Seed of the values.
    pub seed: u64,
    /// Stored dtype (F32, F16 or BF16).
    pub dtype: DType,
}

/// The adapter's weights in memory, as a loaded folder holds them (scale `lora_alpha / r`,
/// with `lora_alpha = 2r` as [`write`] records).
pub fn weights(cfg: &ModelConfig, a: &RandomAdapter<'_>) -> LoraWeights {
    let mut rng = StdRng::seed_from_u64(a.seed);
    let mut uniform = |n: usize, bound: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
    let layers = (0..cfg.num_layers)
        .map(|_| {
            let mut mods: [Option<LoraModule>; 7] = Default::default();
            for &p in a.targets {
                let (out, inp) = p.shape(cfg);
                let lora_a = uniform(a.rank * inp, a.scale / (inp as f32).sqrt());
                let bt = uniform(a.rank * out, a.scale / (a.rank as f32).sqrt());
                mods[p as usize] = Some(LoraModule { rank: a.rank, scale: 2.0, a: lora_a, bt });
            }
            mods
        })
        .collect();
    LoraWeights { layers, bytes: 0 }
}

/// Writes a PEFT folder for `cfg` into `dir` (created if missing) holding [`weights`].
pub fn write(dir: &Path, cfg: &ModelConfig, a: &RandomAdapter<'_>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors = HashMap::new();
    for (l, layer) in weights(cfg, a).layers.iter().enumerate() {
        for &p in a.targets {
            let Some(m) = &layer[p as usize] else { continue };
            let (out, inp) = p.shape(cfg);
            let stem = format!("base_model.model.{}", p.tensor_name(l).trim_end_matches(".weight"));
            let t = |v: &[f32], shape: (usize, usize)| Tensor::from_slice(v, shape, &Device::Cpu);
            // PEFT stores B as [out, rank]; the host form holds Bᵀ.
            let b = t(&m.bt, (a.rank, out))?.t()?.contiguous()?;
            tensors.insert(format!("{stem}.lora_A.weight"), t(&m.a, (a.rank, inp))?.to_dtype(a.dtype)?);
            tensors.insert(format!("{stem}.lora_B.weight"), b.to_dtype(a.dtype)?);
        }
    }
    let weights = dir.join(WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &weights)
        .map_err(|e| Error::from(LoadError::WeightFile { file: weights.clone(), message: e.to_string() }))?;
    let targets: Vec<&str> = a.targets.iter().map(|p| p.module_name()).collect();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": a.rank, "lora_alpha": 2 * a.rank, "target_modules": targets,
        "bias": "none", "use_dora": false, "task_type": "CAUSAL_LM",
    });
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, config.to_string()).map_err(|e| Error::io(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::AdapterManifest;
    use crate::model::{LogitRows, SeqBatch, SeqKv};

    fn fixture_config() -> ModelConfig {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/gqa-llama3-f32");
        ModelConfig::from_file(&root.join("config.json")).expect("config")
    }

    #[test]
    fn the_benchmark_shape_is_llama_7b() {
        let cfg = llama_7b().expect("config");
        assert_eq!((cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, cfg.vocab_size), (4096, 32, 11008, 32000));
        let w = random_adapter(&cfg, 16, 1);
        let q = w.layers[3][Proj::Q as usize].as_ref().expect("q_proj");
        assert_eq!((q.a.len(), q.bt.len()), (16 * 4096, 16 * 4096));
        assert!(w.layers[0][Proj::Gate as usize].is_none());
    }

    #[test]
    fn a_random_llama_of_a_config_runs_a_forward_step_to_finite_logits() {
        let cfg = fixture_config();
        let model = llama(&cfg, &Device::Cpu).expect("model");
        assert_eq!(model.config().hidden_size, cfg.hidden_size);
        let mut kv = model.kv_cache_for(1);
        let mut seq = SeqKv::default();
        let tokens = [1u32, 5, 9];
        let mut batch = [SeqBatch::base(&tokens, &mut seq)];
        let logits = model.forward(&mut kv, &mut batch, LogitRows::All, None).expect("forward");
        assert_eq!(logits.dims(), [3, cfg.vocab_size]);
        let values = logits.flatten_all().expect("flatten").to_vec1::<f32>().expect("values");
        assert!(values.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn a_model_from_parts_of_the_wrong_shape_is_refused() {
        let cfg = fixture_config();
        let dev = Device::Cpu;
        let h = cfg.hidden_size;
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev).expect("zeros");
        let layer = |proj_in: usize| {
            let proj = Proj::ALL.map(|p| {
                let (o, i) = p.shape(&cfg);
                zeros(&[o, if p == Proj::Q { proj_in } else { i }])
            });
            (proj, zeros(&[h]), zeros(&[h]))
        };
        let embed = zeros(&[cfg.vocab_size, h]);
        let good = || (0..cfg.num_layers).map(|_| layer(h)).collect::<Vec<_>>();
        assert!(Llama::from_parts(&cfg, embed.clone(), good(), zeros(&[h]), embed.clone(), &dev).is_ok());
        let mut bad = good();
        bad[0] = layer(h + 1);
        let err = Llama::from_parts(&cfg, embed.clone(), bad, zeros(&[h]), embed.clone(), &dev).err();
        assert!(err.is_some_and(|e| e.to_string().contains("q_proj")), "names the tensor");
        assert!(Llama::from_parts(&cfg, embed.clone(), Vec::new(), zeros(&[h]), embed.clone(), &dev).is_err());
        assert!(Llama::from_parts(&cfg, embed.clone(), good(), zeros(&[h + 1]), embed, &dev).is_err());
    }

    #[test]
    fn a_written_folder_is_a_valid_peft_adapter_of_the_asked_shape() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/gqa-llama3-f32");
        let cfg = ModelConfig::from_file(&root.join("config.json")).expect("config");
        let dir = std::env::temp_dir().join(format!("openlora-random-adapter-{}", std::process::id()));
        let spec = RandomAdapter { rank: 4, targets: &[Proj::Q, Proj::O], scale: 1.0, seed: 3, dtype: DType::BF16 };
        write(&dir, &cfg, &spec).expect("write");
        let m = AdapterManifest::inspect(&dir, &cfg).expect("a valid PEFT folder");
        assert_eq!(m.config.rank, 4);
        assert_eq!(m.modules.len(), cfg.num_layers * 2);
        let w = m.load(&cfg).expect("load");
        let q = w.layers[0][Proj::Q as usize].as_ref().expect("q_proj");
        assert_eq!((q.rank, q.a.len()), (4, 4 * cfg.hidden_size));
        assert!(w.layers[0][Proj::V as usize].is_none());
        // What the folder holds is what `weights` makes (to bf16).
        let made = weights(&cfg, &spec);
        let m = made.layers[1][Proj::O as usize].as_ref().expect("o_proj");
        let loaded = w.layers[1][Proj::O as usize].as_ref().expect("o_proj");
        let bf = |v: &[f32]| v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect::<Vec<_>>();
        assert_eq!((bf(&m.a), bf(&m.bt), m.scale), (loaded.a.clone(), loaded.bt.clone(), loaded.scale));
        std::fs::remove_dir_all(&dir).ok();
    }
}
