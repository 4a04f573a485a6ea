//! openlora's compute kernels: CUDA C sources (compiled at run time with NVRTC by the
//! runtime's CUDA backend) and a CPU reference implementation of each op they provide.
//!
//! [`attention`] is causal grouped-query attention over a paged KV cache (block tables);
//! [`lora`] is the batched heterogeneous LoRA op (shrink/expand; SGMV for prefill, BGMV for
//! decode) over adapter weights held in a unified page pool. The base model's CPU ops live in
//! the runtime on candle-core.

pub mod attention;
pub mod lora;
pub mod vec;
