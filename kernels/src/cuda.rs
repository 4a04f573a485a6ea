//! The CUDA C sources of openlora's device kernels, as the runtime's CUDA backend compiles them
//! with NVRTC for the GPU it finds (`compute_XY` of the device), and that compilation itself
//! (feature `nvrtc`, which loads NVRTC dynamically: nothing links against CUDA at build time).

/// The bf16 helpers and reductions every source starts with.
pub const PRELUDE: &str = include_str!("../cuda/prelude.cuh");

/// One `.cu` file and the kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// The file's name, without `.cu`.
    pub name: &'static str,
    /// Its text (without the prelude).
    pub text: &'static str,
    /// The `extern "C" __global__` functions it defines.
    pub kernels: &'static [&'static str],
}

impl KernelSource {
    /// The complete source NVRTC compiles: the prelude, then the file.
    pub fn source(&self) -> String {
        format!("{PRELUDE}\n#line 1 \"{}.cu\"\n{}", self.name, self.text)
    }
}

/// Every kernel source.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "elementwise",
        text: include_str!("../cuda/elementwise.cu"),
        kernels: &[
            "embedding_bf16",
            "rms_norm_bf16",
            "rms_norm_inplace_bf16",
            "add_bias_bf16",
            "rope_bf16",
            "silu_mul_bf16",
            "gelu_tanh_mul_bf16",
            "scale_bf16",
            "softcap_f32",
            "add_bf16",
            "bf16_to_f32_kernel",
            "fill_random_bf16",
        ],
    },
    KernelSource { name: "sampling", text: include_str!("../cuda/sampling.cu"), kernels: &["sample_rows"] },
    KernelSource {
        name: "attention",
        text: include_str!("../cuda/attention.cu"),
        kernels: &["write_kv_bf16", "paged_attention_decode_bf16", "paged_attention_prefill_bf16"],
    },
    KernelSource {
        name: "lora",
        text: include_str!("../cuda/lora.cu"),
        kernels: &[
            "lora_shrink_sgmv_bf16",
            "lora_expand_sgmv_bf16",
            "lora_shrink_bgmv_bf16",
            "lora_expand_bgmv_bf16",
            "scatter_pages_bf16",
        ],
    },
];

/// Compiling the sources to PTX with NVRTC.
#[cfg(feature = "nvrtc")]
pub mod nvrtc {
    use super::{KernelSource, SOURCES};

    /// Why a source did not compile, or NVRTC could not be used.
    #[derive(Debug, thiserror::Error)]
    pub enum CompileError {
        /// The NVRTC library is not installed (or not on the library path).
        #[error(
            "NVRTC (libnvrtc.so) was not found: install the CUDA toolkit or the `nvidia-cuda-nvrtc-cu12` \
             Python wheel and put its lib folder on LD_LIBRARY_PATH"
        )]
        Missing,
        /// NVRTC refused a source; the message holds its log.
        #[error("{source_name}.cu does not compile for {arch}: {log}")]
        Source {
            /// The file.
            source_name: &'static str,
            /// The target architecture.
            arch: String,
            /// NVRTC's log.
            log: String,
        },
    }

    /// Whether NVRTC can be loaded.
    pub fn available() -> bool {
        // SAFETY: only tries to dlopen the library by its known names; no symbol is called.
        unsafe { cudarc::nvrtc::sys::is_culib_present() }
    }

    /// Compiles one source for `arch` (e.g. `compute_90`); returns the PTX text.
    pub fn compile(source: &KernelSource, arch: &'static str) -> Result<String, CompileError> {
        if !available() {
            return Err(CompileError::Missing);
        }
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            use_fast_math: Some(false),
            name: Some(format!("{}.cu", source.name)),
            options: vec!["--std=c++17".into()],
            ..Default::default()
        };
        cudarc::nvrtc::compile_ptx_with_opts(source.source(), opts).map(|ptx| ptx.to_src()).map_err(|e| {
            let log = match e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
                other => format!("{other:?}"),
            };
            CompileError::Source { source_name: source.name, arch: arch.to_string(), log }
        })
    }

    /// Compiles every source for `arch`.
    pub fn compile_all(arch: &'static str) -> Result<Vec<(&'static KernelSource, String)>, CompileError> {
        SOURCES.iter().map(|s| compile(s, arch).map(|ptx| (s, ptx))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_kernel_is_defined_in_its_source() {
        for s in SOURCES {
            for k in s.kernels {
                assert!(s.text.contains(&format!("__global__ void {k}(")), "{}.cu does not define {k}", s.name);
            }
            assert_eq!(s.text.matches("__global__").count(), s.kernels.len(), "{}.cu lists every kernel", s.name);
        }
    }

    /// Each source compiles to PTX for Ampere and Hopper, and the PTX holds every kernel. The
    /// test command provides NVRTC from PyPI; elsewhere this is skipped unless
    /// `OPENLORA_REQUIRE_NVRTC` is set.
    #[cfg(feature = "nvrtc")]
    #[test]
    fn every_source_compiles_to_ptx_with_nvrtc() {
        if !nvrtc::available() {
            assert!(
                std::env::var_os("OPENLORA_REQUIRE_NVRTC").is_none(),
                "OPENLORA_REQUIRE_NVRTC is set: {}",
                nvrtc::CompileError::Missing
            );
            eprintln!("skipped: {}", nvrtc::CompileError::Missing);
            return;
        }
        for arch in ["compute_80", "compute_90"] {
            for (s, ptx) in nvrtc::compile_all(arch).unwrap_or_else(|e| panic!("{e}")) {
                for k in s.kernels {
                    assert!(ptx.contains(&format!(".entry {k}(")), "{arch}: {k} missing from {}.cu's PTX", s.name);
                }
            }
        }
    }

    #[cfg(feature = "nvrtc")]
    #[test]
    fn a_syntax_error_is_reported_with_its_file() {
        if !nvrtc::available() {
            return;
        }
        let broken =
            KernelSource { name: "broken", text: "extern \"C\" __global__ void k() { int x = ; }", kernels: &["k"] };
        let e = nvrtc::compile(&broken, "compute_90").unwrap_err().to_string();
        assert!(e.contains("broken.cu") && e.contains("compute_90"), "{e}");
    }
}
