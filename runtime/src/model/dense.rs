//! The CPU decoder's dense weights as the GEMM keeps them: the dtype a model is served in
//! (vLLM's `--dtype`), loading a weight in that dtype, and projecting a candle tensor's rows
//! through one without copying them out.

use candle_core::{DType, Device, Storage, Tensor};
use openlora_kernels::gemm::{Weight, WeightData, matmul_t};

use super::weights::WeightFiles;
use crate::error::{Error, Result};

/// The dtype a model's dense weights are kept and multiplied in on the CPU.
///
/// `Auto` keeps each weight as stored, widening half-precision weights to f32 in registers
/// against f32 activations: the results are those of the f32 model (transformers' f32
/// reference) with half the weight memory. `Bf16` keeps the weights in bf16 and, on CPUs with
/// AVX-512-BF16, rounds each projection's input to bf16 too (as transformers computing in bf16
/// does) for twice the multiply throughput; `F16` keeps them in IEEE half; `F32` widens all;
/// `Int8` quantises them (weight-only, one symmetric scale per output channel) to a quarter of
/// f32's bytes, multiplied against f32 activations.
/// Norms, biases, attention and the LoRA op always compute in f32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ServeDType {
    /// As stored in the model's files.
    #[default]
    Auto,
    /// 32-bit floats.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
    /// Weight-only int8 with per-output-channel scales.
    Int8,
}

impl ServeDType {
    /// Every accepted spelling, as listed in errors.
    pub const NAMES: &'static str = "auto, bf16 (bfloat16), f16 (float16, half), f32 (float32, float), int8";

    /// Parses a config value or `--dtype` argument (vLLM's spellings accepted).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(ServeDType::Auto),
            "f32" | "float32" | "float" => Some(ServeDType::F32),
            "bf16" | "bfloat16" => Some(ServeDType::Bf16),
            "f16" | "float16" | "half" => Some(ServeDType::F16),
            "int8" => Some(ServeDType::Int8),
            _ => None,
        }
    }

    /// The canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            ServeDType::Auto => "auto",
            ServeDType::F32 => "f32",
            ServeDType::Bf16 => "bf16",
            ServeDType::F16 => "f16",
            ServeDType::Int8 => "int8",
        }
    }

    /// The dtype a weight stored as `stored` is kept in.
    fn kept(self, stored: DType) -> DType {
        match (self, stored) {
            (ServeDType::Auto, DType::BF16 | DType::F16) => stored,
            (ServeDType::Auto | ServeDType::F32 | ServeDType::Int8, _) => DType::F32,
            (ServeDType::Bf16, _) => DType::BF16,
            (ServeDType::F16, _) => DType::F16,
        }
    }
}

impl std::str::FromStr for ServeDType {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        ServeDType::parse(s).ok_or_else(|| format!("unknown dtype `{s}`; expected one of {}", ServeDType::NAMES))
    }
}

impl<'de> serde::Deserialize<'de> for ServeDType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for ServeDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Refuses a dtype the CUDA backend does not compute in (it keeps every weight in bf16).
pub fn check_gpu_dtype(dtype: ServeDType) -> Result<()> {
    match dtype {
        ServeDType::Auto | ServeDType::Bf16 => Ok(()),
        other => Err(Error::device(format!("dtype `{other}`: the CUDA backend computes in bf16 (use auto or bf16)"))),
    }
}

/// Loads the `[rows, cols]` weight `name` (shape checked) in the dtype `dtype` keeps it in.
pub fn load_weight(weights: &WeightFiles, name: &str, rows: usize, cols: usize, dtype: ServeDType) -> Result<Weight> {
    let stored = match weights.dtype(name)? {
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F16 => DType::F16,
        _ => DType::F32,
    };
    let t = weights.load(name, &[rows, cols], dtype.kept(stored), &Device::Cpu)?;
    weight_from_tensor(&t, dtype)
}

/// A `[rows, cols]` float tensor as a GEMM weight kept in `dtype`'s choice for its dtype.
pub fn weight_from_tensor(t: &Tensor, dtype: ServeDType) -> Result<Weight> {
    let (rows, cols) = t.dims2()?;
    let t = t.to_dtype(dtype.kept(t.dtype()))?.flatten_all()?;
    let shape_error = |e: openlora_kernels::gemm::ShapeMismatch| {
        Error::device(format!("a weight of {} elements is not [{rows}, {cols}]", e.got))
    };
    if dtype == ServeDType::Int8 {
        return Weight::quantize_int8(rows, cols, &t.to_vec1::<f32>()?).map_err(shape_error);
    }
    let data = match t.dtype() {
        DType::BF16 => WeightData::Bf16(t.to_vec1::<half::bf16>()?.into_iter().map(half::bf16::to_bits).collect()),
        DType::F16 => WeightData::F16(t.to_vec1::<half::f16>()?.into_iter().map(half::f16::to_bits).collect()),
        _ => WeightData::F32(t.to_dtype(DType::F32)?.to_vec1::<f32>()?.into()),
    };
    let weight = Weight::new(rows, cols, data).map_err(shape_error)?;
    Ok(weight.with_bf16_inputs(dtype == ServeDType::Bf16))
}

/// Runs `f` on the elements of an f32 CPU tensor, row-major, as one slice (no copy when it is
/// contiguous).
pub fn with_rows<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::device("the CPU decoder got a tensor that is not on the CPU"));
    };
    let all = cpu.as_slice::<f32>()?;
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| Error::device("a tensor is not contiguous"))?;
    Ok(f(&all[start..end]))
}

/// `x · Wᵀ` for `x: [rows, in]`, as a new `[rows, out]` tensor, with `finish` run on the output
/// (given `x` and `y`, both row-major) before it becomes a tensor (biases, LoRA deltas).
pub fn project(x: &Tensor, w: &Weight, finish: impl FnOnce(&[f32], &mut [f32]) -> Result<()>) -> Result<Tensor> {
    let (rows, in_dim) = x.dims2()?;
    if in_dim != w.cols() {
        return Err(Error::device(format!("a projection of {} inputs got {in_dim}", w.cols())));
    }
    let mut y = vec![0f32; rows * w.rows()];
    with_rows(x, |xs| {
        matmul_t(xs, rows, w, &mut y);
        finish(xs, &mut y)
    })??;
    Ok(Tensor::from_vec(y, (rows, w.rows()), x.device())?)
}

/// Rows `ids` of an embedding table, widened to f32: `[ids, cols]`.
pub fn gather_rows(table: &Weight, ids: &[u32], device: &Device) -> Result<Tensor> {
    let cols = table.cols();
    let mut out = vec![0f32; ids.len() * cols];
    for (row, &id) in out.chunks_exact_mut(cols).zip(ids) {
        table.row_into(id as usize, row);
    }
    Ok(Tensor::from_vec(out, (ids.len(), cols), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_parse_as_vllm_spells_them() {
        for (s, d) in [("auto", ServeDType::Auto), ("bfloat16", ServeDType::Bf16), ("half", ServeDType::F16)] {
            assert_eq!(s.parse::<ServeDType>(), Ok(d));
        }
        assert_eq!(ServeDType::parse(ServeDType::Bf16.as_str()), Some(ServeDType::Bf16));
        let err = "int4".parse::<ServeDType>().unwrap_err();
        assert!(err.contains("auto, bf16"), "{err}");
        assert_eq!(ServeDType::Auto.kept(DType::BF16), DType::BF16);
        assert_eq!(ServeDType::Auto.kept(DType::F32), DType::F32);
        assert_eq!(ServeDType::F32.kept(DType::BF16), DType::F32);
        assert_eq!(ServeDType::Bf16.kept(DType::F32), DType::BF16);
    }

    #[test]
    fn projection_reads_strided_and_offset_tensors() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec((0..6).map(|v| v as f32).collect::<Vec<_>>(), (3, 2), &dev).expect("w");
        let weight = weight_from_tensor(&w, ServeDType::Auto).expect("weight");
        // A transposed view and a row slice: neither starts at the storage's first element.
        let x = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], (3, 2), &dev).expect("x");
        for x in [x.narrow(0, 1, 2).expect("narrow"), x.t().expect("t").narrow(1, 0, 2).expect("narrow")] {
            let want: Vec<f32> =
                x.matmul(&w.t().expect("t")).expect("mm").flatten_all().expect("f").to_vec1().expect("v");
            let got: Vec<f32> =
                project(&x, &weight, |_, _| Ok(())).expect("project").flatten_all().expect("f").to_vec1().expect("v");
            assert_eq!(got, want);
        }
        let bad = Tensor::zeros((1, 3), DType::F32, &dev).expect("x");
        assert!(project(&bad, &weight, |_, _| Ok(())).is_err());
    }
}
