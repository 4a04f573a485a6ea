//! Random weights made on the device by the `fill_random_bf16` kernel (its source is in
//! `kernels/cuda`; [`crate::gpu::Gpu::open`] loads it with the others): a [`GpuLlama`] of any
//! shape, for benchmarks at real sizes without shipping weights.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::error::Result;
use crate::gpu::model::{GpuLayer, GpuLlama, check_shape};
use crate::gpu::{Gpu, cuda_err};
use crate::model::{ModelConfig, Proj};

/// Random bf16 values in [-scale, scale) on the device, from `seed`.
pub fn random_bf16(gpu: &Gpu, n: usize, seed: u64, scale: f32) -> Result<CudaSlice<bf16>> {
    let mut x = gpu.zeros::<bf16>(n)?;
    let f = gpu.kernel("fill_random_bf16")?;
    let (n64, cfg) = (n as u64, LaunchConfig::for_num_elems(n as u32));
    let mut b = gpu.stream.launch_builder(f);
    b.arg(&mut x).arg(&n64).arg(&seed).arg(&scale);
    // SAFETY: the kernel writes x[0..n], which x holds.
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(x)
}

/// A model of `cfg`'s shape with random weights made on the device (for benchmarks at real
/// sizes without shipping weights); norms are ones.
pub fn llama(gpu: &Gpu, cfg: &ModelConfig, seed: u64) -> Result<GpuLlama> {
    check_shape(cfg)?;
    let h = cfg.hidden_size;
    let ones = || gpu.upload(&vec![bf16::ONE; h]);
    let mut n = seed;
    let mut rand = |rows: usize, cols: usize| {
        n += 1;
        // Uniform in ±sqrt(3/cols): unit variance of each output, as a trained model's.
        random_bf16(gpu, rows * cols, n, (3.0 / cols as f32).sqrt())
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for _ in 0..cfg.num_layers {
        let proj = Proj::ALL
            .iter()
            .map(|&p| {
                let (o, i) = p.shape(cfg);
                rand(o, i)
            })
            .collect::<Result<Vec<_>>>()?;
        layers.push(GpuLayer {
            proj,
            input_norm: ones()?,
            post_norm: ones()?,
            qkv_bias: None,
            qk_norm: None,
            ffn_norms: None,
        });
    }
    // The embedding, then the head: the seeds they had when the decoder made them itself.
    let embed = rand(cfg.vocab_size, h)?;
    let norm = ones()?;
    let lm_head = Some(rand(cfg.vocab_size, h)?);
    GpuLlama::from_weights(gpu, cfg, embed, layers, norm, lm_head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernel_tests::gpu;
    use crate::gpu::model::{GpuKv, GpuSeq};

    #[test]
    fn a_step_allocates_no_device_memory_once_its_buffers_are_large_enough() {
        use crate::model::{AllocStatus, BLOCK_SIZE, ModelConfig, SeqKv};
        let Some(gpu) = gpu() else { return };
        let dir = std::env::temp_dir().join(format!("openlora-step-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let text = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 128}"#;
        std::fs::write(dir.join("config.json"), text).expect("config");
        let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
        let model = llama(&gpu, &cfg, 3).expect("model");
        let mut kv = GpuKv::new(&gpu, &cfg, 16).expect("kv");
        let mut held = vec![SeqKv::default(); 4];
        for h in &mut held {
            assert_eq!(kv.blocks.reserve(h, 4 * BLOCK_SIZE), AllocStatus::Ok);
        }
        let prompt: Vec<u32> = (0..20).collect();
        let mut step = |n: usize, tokens: &[u32], start: usize| {
            let seqs: Vec<GpuSeq<'_>> =
                held[..n].iter().map(|h| GpuSeq { tokens, start, blocks: h.blocks(), adapter: None }).collect();
            let mut out = model.forward(&gpu, &mut kv, None, &seqs, false).expect("step");
            out.sample(&gpu, &vec![0.0; n], &vec![0; n]).expect("sample");
            drop(out);
            model.step_allocations()
        };
        let first = step(2, &prompt, 0);
        assert!(first > 0, "the first step allocates its buffers");
        for pos in 20..24 {
            assert_eq!(step(2, &[7], pos), first, "a decode step after a larger prefill allocates nothing");
        }
        let grown = step(4, &prompt, 24);
        assert!(grown > first, "a larger step grows the buffers");
        assert_eq!(step(3, &[9], 44), grown, "a smaller step after it allocates nothing");
        assert_eq!(step(4, &prompt[..17], 45), grown, "nor does one of the same size");
    }

    #[test]
    fn a_random_decoder_of_an_unsupported_shape_is_refused() {
        let Some(gpu) = gpu() else { return };
        let mut cfg = crate::harness::random::llama_7b().expect("config");
        cfg.head_dim = crate::gpu::model::MAX_HEAD_DIM + 1;
        assert!(llama(&gpu, &cfg, 1).is_err());
    }
}
