//! A decoder step's device buffers, allocated by the first step and grown (to the next power of
//! two) only when a larger step comes, so a step allocates no device memory; and what a step
//! gives back ([`Step`]): its logits, read in place, and each sequence's measured adapter share.

use std::sync::MutexGuard;

use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, PushKernelArg, ValidAsZeroBits};
use half::bf16;

use super::{Gpu, cuda_err, grid};
use crate::error::{Error, Result};
use crate::model::lora::AdapterShare;

/// Device memory for a buffer whose needed length varies from step to step.
pub(crate) struct Grow<T>(Option<CudaSlice<T>>);

impl<T> Default for Grow<T> {
    fn default() -> Self {
        Grow(None)
    }
}

impl<T: DeviceRepr + ValidAsZeroBits> Grow<T> {
    /// Takes the buffer out, at least `n` long: the one there, or a new one when it is shorter
    /// or missing (counted in `grown`). [`Grow::put`] gives it back after the step.
    pub(crate) fn take(&mut self, gpu: &Gpu, n: usize, grown: &mut usize) -> Result<CudaSlice<T>> {
        match self.0.take() {
            Some(b) if b.len() >= n => Ok(b),
            old => {
                drop(old); // the old one goes first: the device holds one of them at a time
                *grown += 1;
                gpu.zeros::<T>(n.max(1).next_power_of_two())
            }
        }
    }

    /// Gives a buffer back for the next step.
    pub(crate) fn put(&mut self, b: CudaSlice<T>) {
        self.0 = Some(b);
    }
}

/// Every buffer a step of [`super::model::GpuLlama`] uses.
#[derive(Default)]
pub(crate) struct StepBuffers {
    pub plan: Grow<u32>,
    pub x: Grow<bf16>,
    pub hn: Grow<bf16>,
    pub q: Grow<bf16>,
    pub k: Grow<bf16>,
    pub v: Grow<bf16>,
    pub attn: Grow<bf16>,
    pub out: Grow<bf16>,
    pub gate: Grow<bf16>,
    pub up: Grow<bf16>,
    pub act: Grow<bf16>,
    pub lora_tmp: Grow<f32>,
    pub sums: Grow<f32>,
    pub picked: Grow<bf16>,
    pub normed: Grow<bf16>,
    pub logits16: Grow<bf16>,
    pub logits: Grow<f32>,
    pub temperatures: Grow<f32>,
    pub seeds: Grow<u64>,
    pub ids: Grow<u32>,
    /// How many times a buffer was (re)allocated.
    pub grown: usize,
}

/// One step's results, read from the step buffers in place (they stay locked until dropped).
pub struct Step<'m> {
    pub(crate) bufs: MutexGuard<'m, StepBuffers>,
    pub(crate) rows: usize,
    pub(crate) vocab: usize,
    /// Each sequence's measured adapter share.
    pub shares: Vec<AdapterShare>,
}

impl Step<'_> {
    /// The f32 logits, `[rows, vocab]`.
    pub fn logits(&self) -> Result<CudaView<'_, f32>> {
        let n = self.rows * self.vocab;
        match &self.bufs.logits.0 {
            Some(l) if l.len() >= n => Ok(l.slice(0..n)),
            _ => Err(Error::device("the step has no logits")),
        }
    }

    /// Every row's logits, on the host.
    pub fn download_logits(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        gpu.stream.clone_dtoh(&self.logits()?).map_err(cuda_err)
    }

    /// Row `i`'s logits, on the host (only that row is copied).
    pub fn download_row(&self, gpu: &Gpu, i: usize) -> Result<Vec<f32>> {
        let v = self.vocab;
        gpu.stream.clone_dtoh(&self.logits()?.slice(i * v..(i + 1) * v)).map_err(cuda_err)
    }

    /// Each row's next token chosen on the device: the argmax where its temperature is 0, else
    /// a Gumbel-max draw from its seed. Only the ids come back.
    pub fn sample(&mut self, gpu: &Gpu, temperatures: &[f32], seeds: &[u64]) -> Result<Vec<u32>> {
        let rows = temperatures.len().min(self.rows);
        if rows == 0 {
            return Ok(Vec::new());
        }
        let vocab = self.vocab as i32;
        let n = self.rows * self.vocab;
        let bufs = &mut *self.bufs;
        let mut t = bufs.temperatures.take(gpu, rows, &mut bufs.grown)?;
        let mut sd = bufs.seeds.take(gpu, rows, &mut bufs.grown)?;
        let mut ids = bufs.ids.take(gpu, rows, &mut bufs.grown)?;
        gpu.stream.memcpy_htod(&temperatures[..rows], &mut t.slice_mut(0..rows)).map_err(cuda_err)?;
        gpu.stream.memcpy_htod(&seeds[..rows], &mut sd.slice_mut(0..rows)).map_err(cuda_err)?;
        let logits = bufs.logits.0.as_ref().ok_or_else(|| Error::device("the step has no logits"))?;
        let logits = logits.slice(0..n);
        let mut b = gpu.stream.launch_builder(gpu.kernel("sample_rows")?);
        b.arg(&logits).arg(&vocab).arg(&t).arg(&sd).arg(&mut ids);
        // SAFETY: reads rows × vocab logits, rows temperatures and seeds, writes rows ids; blocks
        // of 256 (a power of two, as the kernel's reduction needs).
        unsafe { b.launch(grid((rows as u32, 1), 256, 0)) }.map_err(cuda_err)?;
        let out = gpu.stream.clone_dtoh(&ids.slice(0..rows)).map_err(cuda_err);
        bufs.temperatures.put(t);
        bufs.seeds.put(sd);
        bufs.ids.put(ids);
        out
    }
}
