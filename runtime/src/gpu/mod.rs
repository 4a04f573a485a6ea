//! The CUDA backend (feature `cuda`): the driver, NVRTC and cuBLAS are loaded at run time by
//! cudarc, the kernels of `kernels/cuda` are compiled with NVRTC for the device found, and the
//! base GEMMs run on cuBLAS in bf16 with f32 accumulation (tensor cores).
//!
//! [`Gpu`] holds the device: a compute stream, a copy stream (adapter uploads overlap compute),
//! the cuBLAS handle and the loaded kernels. [`model::GpuLlama`] is the decoder on it,
//! [`lora::GpuAdapters`] the adapter page pool, [`backend::GpuBackend`] the engine's backend.
//! The GPU benchmark, parity checks and random weights are [`crate::harness`]'s.

pub mod backend;
pub mod lora;
pub mod model;
pub mod step;

#[cfg(test)]
pub(crate) mod kernel_tests;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig};

use crate::device::{CudaDeviceInfo, probe_cuda};
use crate::error::{Error, Result};

/// A CUDA error as the runtime's error.
pub(crate) fn cuda_err(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    crate::error::DeviceError::Driver { what: "cuda".into(), source: Box::new(e) }.into()
}

/// One GPU, ready to run openlora's kernels.
pub struct Gpu {
    /// The device's context.
    pub ctx: Arc<CudaContext>,
    /// The stream every forward step runs on.
    pub stream: Arc<CudaStream>,
    /// The stream adapter uploads run on, overlapped with compute.
    pub copy_stream: Arc<CudaStream>,
    /// cuBLAS on the compute stream.
    pub blas: CudaBlas,
    /// What the probe found.
    pub info: CudaDeviceInfo,
    kernels: HashMap<&'static str, CudaFunction>,
}

/// The NVRTC target for a compute capability (PTX JIT-compiles forward to newer devices).
fn arch(capability: (i32, i32)) -> &'static str {
    match capability {
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 9) => "compute_89",
        (9, _) => "compute_90",
        (10, _) => "compute_100",
        (12, _) => "compute_120",
        (major, _) if major > 12 => "compute_120",
        _ => "compute_80",
    }
}

impl Gpu {
    /// Opens `cuda:ordinal`, compiles every kernel for it and loads them.
    pub fn open(ordinal: usize) -> Result<Self> {
        let info = probe_cuda(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(cuda_err)?;
        let stream = ctx.default_stream();
        let copy_stream = ctx.new_stream().map_err(cuda_err)?;
        let blas = CudaBlas::new(stream.clone()).map_err(cuda_err)?;
        let target = arch(info.capability);
        let mut kernels = HashMap::new();
        for (source, ptx) in openlora_kernels::cuda::nvrtc::compile_all(target)
            .map_err(|e| crate::error::DeviceError::Driver { what: "nvrtc".into(), source: Box::new(e) })?
        {
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(cuda_err)?;
            for &name in source.kernels {
                kernels.insert(name, module.load_function(name).map_err(cuda_err)?);
            }
        }
        Ok(Gpu { ctx, stream, copy_stream, blas, info, kernels })
    }

    /// A loaded kernel by name.
    pub fn kernel(&self, name: &str) -> Result<&CudaFunction> {
        self.kernels.get(name).ok_or_else(|| Error::device(format!("kernel {name} is not loaded")))
    }

    /// Zeroed device memory for `n` values.
    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(cuda_err)
    }

    /// Copies host values to new device memory (one zero for an empty slice, never read).
    pub fn upload<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        v: &[T],
    ) -> Result<CudaSlice<T>> {
        if v.is_empty() {
            return self.zeros::<T>(1);
        }
        self.stream.clone_htod(v).map_err(cuda_err)
    }

    /// Copies device values back to the host (waits for the stream).
    pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(&self, d: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(d).map_err(cuda_err)
    }

    /// Waits for the compute stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err)
    }
}

/// A launch of `grid` blocks of `block` threads with `shared` bytes of dynamic shared memory.
pub(crate) fn grid(grid: (u32, u32), block: u32, shared: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0.max(1), grid.1.max(1), 1), block_dim: (block, 1, 1), shared_mem_bytes: shared }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_capability_gets_a_target() {
        assert_eq!(arch((9, 0)), "compute_90");
        assert_eq!(arch((8, 0)), "compute_80");
        assert_eq!(arch((7, 5)), "compute_80");
        assert_eq!(arch((13, 0)), "compute_120");
    }

    #[test]
    fn opening_a_missing_gpu_is_an_error() {
        if let Err(e) = Gpu::open(0) {
            assert!(e.to_string().contains("cuda"), "{e}");
        }
    }
}
