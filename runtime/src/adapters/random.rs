//! Random PEFT LoRA folders (for benchmarks and tests): real `adapter_config.json` and
//! `adapter_model.safetensors` files, as PEFT writes them, with seeded uniform weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{CONFIG_FILE, LoraModule, LoraWeights, WEIGHTS_FILE};
use crate::error::{Error, LoadError, Result};
use crate::model::{ModelConfig, Proj};

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
