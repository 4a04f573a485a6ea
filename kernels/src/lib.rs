//! openlora's compute kernels: CUDA C sources (compiled at run time with NVRTC by the
//! runtime's CUDA backend) and a CPU reference implementation of each op they provide.
//!
//! The batched heterogeneous LoRA op (shrink/expand, SGMV for prefill, BGMV for decode)
//! lands here with the adapters work; the base model's CPU ops live in the runtime on
//! candle-core.
