//! openlora's compute kernels: CUDA C sources (compiled at run time with NVRTC by the
//! runtime's CUDA backend) and a CPU reference implementation of each op they provide.
//!
//! [`attention`] is causal grouped-query attention over a paged KV cache (block tables), each
//! head in one pass ([`head`]); [`lora`] is the batched heterogeneous LoRA op (shrink/expand;
//! SGMV for prefill, BGMV for decode) over adapter weights held in a unified page pool of f32
//! or bf16 values. [`gemm`] is the base model's dense CPU projection over weights kept in their
//! stored dtype (in cache-line-[`aligned`] buffers), on the vector instructions [`simd`] finds at
//! run time ([`floats`]: the half-precision conversions; [`compute`]: the thread pool a model
//! step runs on); its other CPU ops live in the runtime on candle-core. [`cuda`] holds the CUDA C
//! sources of the device kernels and (feature `nvrtc`) their compilation to PTX.

pub mod aligned;
pub mod attention;
pub mod compute;
pub mod cuda;
pub mod floats;
pub mod gemm;
pub mod head;
pub mod lora;
pub mod simd;
#[cfg(test)]
mod test_values;
pub mod vec;
