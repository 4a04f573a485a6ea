//! The GEMM libraries measured beside ours, loaded at run time from their Debian packages
//! (`libdnnl2`, `libopenblas0-pthread`) when installed; absent, their rows are left out, unless
//! `OPENLORA_REQUIRE_GEMM_LIBS` is set (the test command sets it where it installed them).

use std::ffi::{CStr, c_char, c_void};

/// A shared library opened with `dlopen`, kept open for the process.
fn open(names: &[&CStr]) -> Option<*mut c_void> {
    let found = names.iter().find_map(|name| {
        // SAFETY: `name` is a NUL-terminated string; dlopen has no other precondition.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        (!handle.is_null()).then_some(handle)
    });
    if found.is_none() && std::env::var_os("OPENLORA_REQUIRE_GEMM_LIBS").is_some() {
        panic!("OPENLORA_REQUIRE_GEMM_LIBS is set but none of {names:?} loads");
    }
    found
}

/// A symbol of `handle`, or `None` when the library lacks it.
fn symbol(handle: *mut c_void, name: &CStr) -> Option<*mut c_void> {
    // SAFETY: `handle` came from a successful dlopen and `name` is NUL-terminated.
    let sym = unsafe { libc::dlsym(handle, name.as_ptr()) };
    (!sym.is_null()).then_some(sym)
}

type DnnlGemmBf16 = unsafe extern "C" fn(
    c_char,
    c_char,
    i64,
    i64,
    i64,
    f32,
    *const u16,
    i64,
    *const u16,
    i64,
    f32,
    *mut f32,
    i64,
) -> i32;

/// oneDNN's `dnnl_gemm_bf16bf16f32` (row-major; it dispatches AVX-512-BF16 / AMX itself).
pub struct OneDnn(DnnlGemmBf16);

impl OneDnn {
    /// The library, when `libdnnl.so.2` (or `.3`) is installed.
    pub fn load() -> Option<Self> {
        let lib = open(&[c"libdnnl.so.3", c"libdnnl.so.2"])?;
        let f = symbol(lib, c"dnnl_gemm_bf16bf16f32")?;
        // SAFETY: the symbol is oneDNN's C API function of exactly this signature
        // (`dnnl_status_t dnnl_gemm_bf16bf16f32(char, char, dnnl_dim_t ×3, float, const bf16 *,
        // dnnl_dim_t, const bf16 *, dnnl_dim_t, float, float *, dnnl_dim_t)`).
        Some(Self(unsafe { std::mem::transmute::<*mut c_void, DnnlGemmBf16>(f) }))
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ` in bf16 with f32 accumulation.
    pub fn gemm_bf16_t(&self, x: &[u16], m: usize, w: &[u16], n: usize, k: usize, y: &mut [f32]) {
        assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * n);
        let (m, n, k) = (m as i64, n as i64, k as i64);
        // SAFETY: the buffers hold the m×k, n×k and m×n elements the call reads and writes.
        let status = unsafe {
            (self.0)(b'N' as c_char, b'T' as c_char, m, n, k, 1.0, x.as_ptr(), k, w.as_ptr(), k, 0.0, y.as_mut_ptr(), n)
        };
        assert_eq!(status, 0, "dnnl_gemm_bf16bf16f32 failed");
    }
}

type CblasSgemm =
    unsafe extern "C" fn(i32, i32, i32, i32, i32, i32, f32, *const f32, i32, *const f32, i32, f32, *mut f32, i32);

/// OpenBLAS's `cblas_sgemm` (its Debian build has no bf16 GEMM).
pub struct OpenBlas(CblasSgemm);

impl OpenBlas {
    /// The library, when `libopenblas.so.0` is installed.
    pub fn load() -> Option<Self> {
        let lib = open(&[c"libopenblas.so.0"])?;
        let f = symbol(lib, c"cblas_sgemm")?;
        // SAFETY: the symbol is the CBLAS function of exactly this signature.
        Some(Self(unsafe { std::mem::transmute::<*mut c_void, CblasSgemm>(f) }))
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ` in f32.
    pub fn sgemm_t(&self, x: &[f32], m: usize, w: &[f32], n: usize, k: usize, y: &mut [f32]) {
        assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * n);
        const ROW_MAJOR: i32 = 101;
        const NO_TRANS: i32 = 111;
        const TRANS: i32 = 112;
        let dim = |v: usize| i32::try_from(v).expect("a GEMM dimension over i32");
        let (m, n, k) = (dim(m), dim(n), dim(k));
        // SAFETY: the buffers hold the m×k, n×k and m×n elements the call reads and writes.
        unsafe {
            (self.0)(ROW_MAJOR, NO_TRANS, TRANS, m, n, k, 1.0, x.as_ptr(), k, w.as_ptr(), k, 0.0, y.as_mut_ptr(), n)
        };
    }
}
