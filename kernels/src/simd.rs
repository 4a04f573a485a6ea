//! The CPU's vector instruction sets, detected once at run time, and the register tiles of
//! [`crate::gemm`] written for each (AVX-512 with and without BF16 dot products, AVX2 with FMA
//! and F16C, and portable scalar code).
//!
//! A tile computes `y[i, j] = Σₜ x[i, t] · w[j, t]` for `MR` rows of `x` and `NR` weight rows,
//! both with row stride `k`; `y` has row stride `ldy`.

use std::sync::OnceLock;

/// A vector instruction set the GEMM tiles are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable code, no vector intrinsics.
    Scalar,
    /// AVX2 with FMA and F16C (256-bit).
    Avx2,
    /// AVX-512 F/BW/VL (512-bit).
    Avx512,
    /// AVX-512 with BF16 dot products (`vdpbf16ps`).
    Avx512Bf16,
}

impl Isa {
    /// Every instruction set, most portable first.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16];

    /// The name used in logs, benchmarks and `OPENLORA_CPU_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
        }
    }
}

/// Whether this CPU runs `isa`'s tiles.
pub fn available(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = || {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
        };
        match isa {
            Isa::Scalar => true,
            Isa::Avx2 => {
                std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("f16c")
            }
            Isa::Avx512 => avx512(),
            Isa::Avx512Bf16 => avx512() && std::is_x86_feature_detected!("avx512bf16"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        isa == Isa::Scalar
    }
}

/// The best instruction set this CPU has, capped by `OPENLORA_CPU_ISA` (one of the
/// [`Isa::name`]s) when set — to test or measure a lesser machine's path.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("OPENLORA_CPU_ISA").ok().and_then(|v| Isa::ALL.iter().copied().find(|i| i.name() == v));
        // The best this CPU has, at or below the cap.
        Isa::ALL.iter().rev().copied().find(|&i| available(i) && cap.is_none_or(|c| i <= c)).unwrap_or(Isa::Scalar)
    })
}

/// Calls the `$f::<MR, NR>` instantiation for the run-time tile size.
macro_rules! by_size {
    ($($f:ident)::+, $mr:expr, $nr:expr, $($arg:expr),*) => {
        match ($mr, $nr) {
            (4, 4) => $($f)::+::<4, 4>($($arg),*),
            (3, 4) => $($f)::+::<3, 4>($($arg),*),
            (2, 4) => $($f)::+::<2, 4>($($arg),*),
            (1, 4) => $($f)::+::<1, 4>($($arg),*),
            (4, 1) => $($f)::+::<4, 1>($($arg),*),
            (3, 1) => $($f)::+::<3, 1>($($arg),*),
            (2, 1) => $($f)::+::<2, 1>($($arg),*),
            (1, 1) => $($f)::+::<1, 1>($($arg),*),
            other => unreachable!("no {other:?} tile"),
        }
    };
}

/// Generates the run-time dispatch of one weight type's tile: the AVX-512 or AVX2 tile named,
/// else the scalar loop widening each weight element with `$widen`.
macro_rules! tile_dispatch {
    ($(#[$doc:meta])* $name:ident, $wty:ty, $avx512:ident, $avx2:ident, $widen:expr) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn $name(
            isa: Isa,
            mr: usize,
            nr: usize,
            x: *const f32,
            w: *const $wty,
            k: usize,
            y: *mut f32,
            ldy: usize,
        ) {
            // SAFETY: the caller's contract is the tiles' contract.
            unsafe {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 | Isa::Avx512Bf16 => by_size!(x86::$avx512, mr, nr, x, w, k, y, ldy),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => by_size!(x86::$avx2, mr, nr, x, w, k, y, ldy),
                    _ => scalar(mr, nr, x, w, k, y, ldy, $widen),
                }
            }
        }
    };
}

tile_dispatch!(
    /// One tile with an f32 weight.
    ///
    /// # Safety
    /// `x` holds `mr` rows and `w` `nr` rows of `k` elements; `y` is writable at `mr` rows of
    /// `nr` elements (stride `ldy`); `isa` is available; `mr ≤ 4`, `nr ∈ {1, 4}`.
    tile_f32, f32, avx512_f32, avx2_f32, |v: f32| v
);

tile_dispatch!(
    /// One tile with a bf16 weight widened to f32 (see [`tile_f32`] for the contract).
    ///
    /// # Safety
    /// As [`tile_f32`].
    tile_bf16, u16, avx512_bf16w, avx2_bf16w, crate::floats::bf16_to_f32
);

tile_dispatch!(
    /// One tile with an f16 weight widened to f32 (see [`tile_f32`] for the contract).
    ///
    /// # Safety
    /// As [`tile_f32`].
    tile_f16, u16, avx512_f16w, avx2_f16w, crate::floats::f16_to_f32
);

tile_dispatch!(
    /// One tile with an int8 weight widened to f32, unscaled (see [`tile_f32`] for the
    /// contract; the caller applies the row scales).
    ///
    /// # Safety
    /// As [`tile_f32`].
    tile_int8, i8, avx512_i8w, avx2_i8w, f32::from
);

/// One tile of bf16 `x` and bf16 weight with `vdpbf16ps` (f32 sums), prefetching the
/// `next_rows` weight rows at `next` (`k` apart; only a hint, any address will do) as it goes,
/// so that streaming a weight from memory overlaps the multiplies instead of following them.
///
/// # Safety
/// As [`tile_f32`], with `x` in bf16 and AVX-512-BF16 available.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile_dpbf16(
    mr: usize,
    nr: usize,
    x: *const u16,
    w: *const u16,
    next: *const u16,
    next_rows: usize,
    k: usize,
    y: *mut f32,
    ldy: usize,
) {
    // SAFETY: the caller's contract is the tile's contract.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match (mr, nr) {
            (1, 8) => x86::avx512_dpbf16::<1, 8>(x, w, next, next_rows, k, y, ldy),
            _ => by_size!(x86::avx512_dpbf16, mr, nr, x, w, next, next_rows, k, y, ldy),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX-512-BF16 on a CPU that is not x86-64: {mr} {nr} {x:?} {w:?} {next:?} {next_rows} {k} {y:?} {ldy}")
}

/// `dst[i] = f32_to_bf16(src[i])` (round to nearest even, NaN kept NaN), bit for bit as
/// [`crate::floats::f32_to_bf16`], sixteen at a time with AVX-512.
///
/// # Safety
/// `isa` is available on this CPU (see [`available`]; [`isa`] always is).
pub(crate) unsafe fn round_bf16(isa: Isa, src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "rounding between slices of different lengths");
    match isa {
        // SAFETY: `isa` is available (the caller's contract); the lengths are equal.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::round_bf16_512(src, dst) },
        _ => dst.iter_mut().zip(src).for_each(|(h, &f)| *h = crate::floats::f32_to_bf16(f)),
    }
}

/// Generates the run-time dispatch of a dot product and an axpy of f32 activations against
/// one weight type: the AVX-512 or AVX2 functions named, else portable code widening each
/// weight element with `$widen`.
macro_rules! vec_dispatch {
    ($dot:ident, $axpy:ident, $wty:ty, $dot512:ident, $axpy512:ident, $dot256:ident, $axpy256:ident, $widen:expr) => {
        /// `Σ a[i] · b[i]` on `isa` (f32 sums; the order differs between instruction sets).
        ///
        /// # Safety
        /// `isa` is available on this CPU (see [`available`]; [`isa`] always is).
        pub(crate) unsafe fn $dot(isa: Isa, a: &[f32], b: &[$wty]) -> f32 {
            assert_eq!(a.len(), b.len(), "dot of slices of different lengths");
            match isa {
                // SAFETY: `isa` is available (the caller's contract); the lengths are equal.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::$dot512(a, b) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { x86::$dot256(a, b) },
                _ => a.iter().zip(b).fold(0f32, |s, (x, &y)| x.mul_add($widen(y), s)),
            }
        }

        /// `y[i] += alpha · x[i]` on `isa`.
        ///
        /// # Safety
        /// As the dot product's.
        pub(crate) unsafe fn $axpy(isa: Isa, y: &mut [f32], alpha: f32, x: &[$wty]) {
            assert_eq!(y.len(), x.len(), "axpy of slices of different lengths");
            match isa {
                // SAFETY: `isa` is available (the caller's contract); the lengths are equal.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::$axpy512(y, alpha, x) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { x86::$axpy256(y, alpha, x) },
                _ => y.iter_mut().zip(x).for_each(|(yi, &xi)| *yi = alpha.mul_add($widen(xi), *yi)),
            }
        }
    };
}

vec_dispatch!(dot, axpy, f32, dot512, axpy512, dot256, axpy256, std::convert::identity);
vec_dispatch!(
    dot_bf16,
    axpy_bf16,
    u16,
    dot512_bf16,
    axpy512_bf16,
    dot256_bf16,
    axpy256_bf16,
    crate::floats::bf16_to_f32
);

/// The portable tile: f64-free f32 sums in `k` order, the weight widened by `widen`.
///
/// # Safety
/// As [`tile_f32`].
#[allow(clippy::too_many_arguments)]
unsafe fn scalar<W: Copy>(
    mr: usize,
    nr: usize,
    x: *const f32,
    w: *const W,
    k: usize,
    y: *mut f32,
    ldy: usize,
    widen: impl Fn(W) -> f32,
) {
    for i in 0..mr {
        for j in 0..nr {
            // SAFETY: in bounds by the caller's contract.
            let (xr, wr) =
                unsafe { (std::slice::from_raw_parts(x.add(i * k), k), std::slice::from_raw_parts(w.add(j * k), k)) };
            let sum = xr.iter().zip(wr).fold(0f32, |acc, (&a, &b)| a.mul_add(widen(b), acc));
            // SAFETY: in bounds by the caller's contract.
            unsafe { *y.add(i * ldy + j) = sum };
        }
    }
}

/// The x86-64 tiles and vector ops, each compiled for the instruction set it names.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// Runs `step(kk, mask)` along a row of `k` elements, `width` (16 or 32) at a time, the
    /// last partial step masked to the elements left.
    #[inline(always)]
    fn each_step(k: usize, width: usize, mut step: impl FnMut(usize, u32)) {
        let full = k / width * width;
        let mut kk = 0;
        while kk < full {
            step(kk, u32::MAX >> (32 - width));
            kk += width;
        }
        if kk < k {
            step(kk, (1u32 << (k - kk)) - 1);
        }
    }

    /// Stores each accumulator's sum at its place in the `MR × NR` tile of `y` (stride `ldy`).
    ///
    /// # Safety
    /// `y` is writable at the tile; AVX-512F is available.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_sums<const MR: usize, const NR: usize>(acc: &[[__m512; NR]; MR], y: *mut f32, ldy: usize) {
        for (i, row) in acc.iter().enumerate() {
            // Whole groups of four columns reduced together, the rest one by one: a column's sum
            // depends on whether it lies in a group of four, never on the tile's rows.
            let groups = row.chunks_exact(4);
            let rest = groups.remainder();
            for (g, four) in groups.enumerate() {
                // SAFETY: within the caller's tile (four columns of row i).
                unsafe { _mm_storeu_ps(y.add(i * ldy + 4 * g), sum4(four[0], four[1], four[2], four[3])) };
            }
            for (j, a) in rest.iter().enumerate() {
                // SAFETY: within the caller's tile.
                unsafe { *y.add(i * ldy + NR / 4 * 4 + j) = _mm512_reduce_add_ps(*a) };
            }
        }
    }

    /// The sums of four vectors' elements, `[Σa, Σb, Σc, Σd]`, reduced together (a quarter
    /// of the shuffles and adds of four separate reductions).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn sum4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
        // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], and the same for c and d.
        let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
        // Per lane: [Σa, Σb, Σc, Σd] of that lane's four elements.
        let (ab, cd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
        let lanes =
            _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)), _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)));
        // The four lanes added.
        let halves = _mm256_add_ps(
            _mm512_castps512_ps256(lanes),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(lanes))),
        );
        _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps::<1>(halves))
    }

    /// Generates an AVX-512 tile over a weight type, given the function that loads 16 of its
    /// elements (under a mask) as f32.
    macro_rules! avx512_tile {
        ($name:ident, $wty:ty, $load:ident) => {
            /// An AVX-512 tile (see the module's contract).
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            pub(super) unsafe fn $name<const MR: usize, const NR: usize>(
                x: *const f32,
                w: *const $wty,
                k: usize,
                y: *mut f32,
                ldy: usize,
            ) {
                // SAFETY: every load stays within the k elements of a row the caller vouches
                // for (the last, partial step is masked); the stores are the caller's tile.
                unsafe {
                    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
                    let mut step = |kk: usize, mask: __mmask16| {
                        let mut xv = [_mm512_setzero_ps(); MR];
                        for (i, v) in xv.iter_mut().enumerate() {
                            *v = _mm512_maskz_loadu_ps(mask, x.add(i * k + kk));
                        }
                        for j in 0..NR {
                            let wv = $load(mask, w.add(j * k + kk));
                            for i in 0..MR {
                                acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
                            }
                        }
                    };
                    each_step(k, 16, |kk, mask| step(kk, mask as __mmask16));
                    store_sums(&acc, y, ldy);
                }
            }
        };
    }

    /// 16 f32 weights.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_f32_512(mask: __mmask16, p: *const f32) -> __m512 {
        // SAFETY: the masked-in elements are in bounds (caller).
        unsafe { _mm512_maskz_loadu_ps(mask, p) }
    }

    /// 16 bf16 weights widened to f32 (a bf16 is the top half of an f32).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_bf16_512(mask: __mmask16, p: *const u16) -> __m512 {
        // SAFETY: the masked-in elements are in bounds (caller).
        let h = unsafe { _mm256_maskz_loadu_epi16(mask, p.cast::<i16>()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    /// 16 f16 weights widened to f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_f16_512(mask: __mmask16, p: *const u16) -> __m512 {
        // SAFETY: the masked-in elements are in bounds (caller).
        let h = unsafe { _mm256_maskz_loadu_epi16(mask, p.cast::<i16>()) };
        _mm512_cvtph_ps(h)
    }

    /// 16 int8 weights widened to f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_i8_512(mask: __mmask16, p: *const i8) -> __m512 {
        // SAFETY: the masked-in elements are in bounds (caller).
        let b = unsafe { _mm_maskz_loadu_epi8(mask, p) };
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))
    }

    avx512_tile!(avx512_i8w, i8, load_i8_512);
    avx512_tile!(avx512_f32, f32, load_f32_512);
    avx512_tile!(avx512_bf16w, u16, load_bf16_512);
    avx512_tile!(avx512_f16w, u16, load_f16_512);

    /// An AVX-512-BF16 tile: bf16 `x` and weights, 32 products per `vdpbf16ps`, f32 sums.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn avx512_dpbf16<const MR: usize, const NR: usize>(
        x: *const u16,
        w: *const u16,
        next: *const u16,
        next_rows: usize,
        k: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        // SAFETY: as in the f32 tiles: masked loads within the rows, stores in the tile.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NR]; MR];
            let step = |kk: usize, mask: __mmask32| {
                let mut xv = [_mm512_setzero_si512(); MR];
                for (i, v) in xv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_epi16(mask, x.add(i * k + kk).cast::<i16>());
                }
                // One cache line of each row to prefetch: the part at this step's offset, into
                // L2 rather than L1 (where it would evict the x rows the passes share): measured
                // 20-40% faster streaming at 1 to 16 rows.
                for r in 0..next_rows {
                    _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(r * k + kk).cast::<i8>());
                }
                // `j` also offsets the weight pointers, not only the accumulators.
                #[allow(clippy::needless_range_loop)]
                for j in 0..NR {
                    let wv: __m512bh =
                        std::mem::transmute(_mm512_maskz_loadu_epi16(mask, w.add(j * k + kk).cast::<i16>()));
                    for i in 0..MR {
                        let xb: __m512bh = std::mem::transmute(xv[i]);
                        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xb, wv);
                    }
                }
            };
            each_step(k, 32, step);
            store_sums(&acc, y, ldy);
        }
    }

    /// Generates an AVX2 tile over a weight type, given the function that loads 8 of its
    /// elements as f32 and the scalar widening for the tail past the last multiple of 8.
    /// Four weight rows are taken two at a time (16 ymm registers hold no more).
    macro_rules! avx2_tile {
        ($name:ident, $pair:ident, $wty:ty, $load:ident, $widen:path) => {
            /// An AVX2 tile (see the module's contract).
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn $name<const MR: usize, const NR: usize>(
                x: *const f32,
                w: *const $wty,
                k: usize,
                y: *mut f32,
                ldy: usize,
            ) {
                // SAFETY: each half of the tile is a tile of the caller's.
                unsafe {
                    if NR == 4 {
                        $pair::<MR, 2>(x, w, k, y, ldy);
                        $pair::<MR, 2>(x, w.add(2 * k), k, y.add(2), ldy);
                    } else {
                        $pair::<MR, NR>(x, w, k, y, ldy);
                    }
                }
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $pair<const MR: usize, const NR: usize>(
                x: *const f32,
                w: *const $wty,
                k: usize,
                y: *mut f32,
                ldy: usize,
            ) {
                // SAFETY: full 8-wide loads below `full`, scalar reads after; stores in the tile.
                unsafe {
                    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
                    let full = k / 8 * 8;
                    let mut kk = 0;
                    while kk < full {
                        let mut xv = [_mm256_setzero_ps(); MR];
                        for (i, v) in xv.iter_mut().enumerate() {
                            *v = _mm256_loadu_ps(x.add(i * k + kk));
                        }
                        for j in 0..NR {
                            let wv = $load(w.add(j * k + kk));
                            for i in 0..MR {
                                acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
                            }
                        }
                        kk += 8;
                    }
                    for (i, row) in acc.iter().enumerate() {
                        for (j, a) in row.iter().enumerate() {
                            let mut sum = hsum256(*a);
                            for t in full..k {
                                sum = (*x.add(i * k + t)).mul_add($widen(*w.add(j * k + t)), sum);
                            }
                            *y.add(i * ldy + j) = sum;
                        }
                    }
                }
            }
        };
    }

    /// The sum of a vector's eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    /// 8 f32 weights.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f32_256(p: *const f32) -> __m256 {
        // SAFETY: 8 elements in bounds (caller).
        unsafe { _mm256_loadu_ps(p) }
    }

    /// 8 bf16 weights widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_bf16_256(p: *const u16) -> __m256 {
        // SAFETY: 8 elements in bounds (caller).
        let h = unsafe { _mm_loadu_si128(p.cast::<__m128i>()) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }

    /// 8 f16 weights widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16_256(p: *const u16) -> __m256 {
        // SAFETY: 8 elements in bounds (caller).
        let h = unsafe { _mm_loadu_si128(p.cast::<__m128i>()) };
        _mm256_cvtph_ps(h)
    }

    /// 8 int8 weights widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_i8_256(p: *const i8) -> __m256 {
        // SAFETY: 8 elements in bounds (caller).
        let b = unsafe { _mm_loadl_epi64(p.cast::<__m128i>()) };
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))
    }

    /// An int8 weight as f32 (the scalar tail of the int8 tile).
    fn widen_i8(v: i8) -> f32 {
        f32::from(v)
    }

    /// f32 unchanged (the scalar tail of the f32 tile).
    fn same(v: f32) -> f32 {
        v
    }

    avx2_tile!(avx2_f32, avx2_f32_pair, f32, load_f32_256, same);
    avx2_tile!(avx2_i8w, avx2_i8w_pair, i8, load_i8_256, widen_i8);
    avx2_tile!(avx2_bf16w, avx2_bf16w_pair, u16, load_bf16_256, crate::floats::bf16_to_f32);
    avx2_tile!(avx2_f16w, avx2_f16w_pair, u16, load_f16_256, crate::floats::f16_to_f32);

    /// Generates the AVX-512 `Σ a[i] · b[i]` (`a` f32, `b` of `$wty` widened by `$load`) and
    /// `y += alpha · b`: four accumulators, then two, a masked tail.
    macro_rules! avx512_vec {
        ($dot:ident, $axpy:ident, $wty:ty, $load:ident) => {
            /// AVX-512 dot product of f32 `a` and `b` (see the macro).
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            pub(super) unsafe fn $dot(a: &[f32], b: &[$wty]) -> f32 {
                let n = a.len();
                let (pa, pb) = (a.as_ptr(), b.as_ptr());
                const ALL: __mmask16 = 0xFFFF;
                // SAFETY: every load lies within the first n elements of both slices (masked tail).
                unsafe {
                    let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                    let (mut s2, mut s3) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                    let mut i = 0;
                    // Four chains, so the FMA latency is hidden on long rows (LoRA's 1024+).
                    while i + 64 <= n {
                        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), $load(ALL, pb.add(i)), s0);
                        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16)), $load(ALL, pb.add(i + 16)), s1);
                        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 32)), $load(ALL, pb.add(i + 32)), s2);
                        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 48)), $load(ALL, pb.add(i + 48)), s3);
                        i += 64;
                    }
                    s0 = _mm512_add_ps(s0, s2);
                    s1 = _mm512_add_ps(s1, s3);
                    while i + 32 <= n {
                        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), $load(ALL, pb.add(i)), s0);
                        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16)), $load(ALL, pb.add(i + 16)), s1);
                        i += 32;
                    }
                    while i < n {
                        let m = if n - i >= 16 { ALL } else { ((1u32 << (n - i)) - 1) as __mmask16 };
                        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, pa.add(i)), $load(m, pb.add(i)), s0);
                        i += 16;
                    }
                    _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
                }
            }

            /// AVX-512 `y += alpha · x` (see the macro).
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            pub(super) unsafe fn $axpy(y: &mut [f32], alpha: f32, x: &[$wty]) {
                let n = y.len();
                let (py, px) = (y.as_mut_ptr(), x.as_ptr());
                // SAFETY: every access lies within the first n elements of both slices (masked tail).
                unsafe {
                    let a = _mm512_set1_ps(alpha);
                    let mut i = 0;
                    while i < n {
                        let m = if n - i >= 16 { 0xFFFF } else { ((1u32 << (n - i)) - 1) as __mmask16 };
                        let v = _mm512_fmadd_ps(a, $load(m, px.add(i)), _mm512_maskz_loadu_ps(m, py.add(i)));
                        _mm512_mask_storeu_ps(py.add(i), m, v);
                        i += 16;
                    }
                }
            }
        };
    }

    avx512_vec!(dot512, axpy512, f32, load_f32_512);
    avx512_vec!(dot512_bf16, axpy512_bf16, u16, load_bf16_512);

    /// Generates the AVX2 dot product and axpy of f32 `a` and `$wty` `b` (`$load` widens 8,
    /// `$widen` one): two accumulators, a scalar tail.
    macro_rules! avx2_vec {
        ($dot:ident, $axpy:ident, $wty:ty, $load:ident, $widen:expr) => {
            /// AVX2 dot product of f32 `a` and `b` (see the macro).
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn $dot(a: &[f32], b: &[$wty]) -> f32 {
                let n = a.len();
                let (pa, pb) = (a.as_ptr(), b.as_ptr());
                // SAFETY: full 8-wide loads below n, scalar reads after.
                unsafe {
                    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    let mut i = 0;
                    while i + 16 <= n {
                        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), $load(pb.add(i)), s0);
                        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), $load(pb.add(i + 8)), s1);
                        i += 16;
                    }
                    if i + 8 <= n {
                        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), $load(pb.add(i)), s0);
                        i += 8;
                    }
                    let mut s = hsum256(_mm256_add_ps(s0, s1));
                    while i < n {
                        s = (*pa.add(i)).mul_add($widen(*pb.add(i)), s);
                        i += 1;
                    }
                    s
                }
            }

            /// AVX2 `y += alpha · x` (see the macro).
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn $axpy(y: &mut [f32], alpha: f32, x: &[$wty]) {
                let n = y.len();
                let (py, px) = (y.as_mut_ptr(), x.as_ptr());
                // SAFETY: full 8-wide accesses below n, scalar ones after.
                unsafe {
                    let a = _mm256_set1_ps(alpha);
                    let mut i = 0;
                    while i + 8 <= n {
                        _mm256_storeu_ps(py.add(i), _mm256_fmadd_ps(a, $load(px.add(i)), _mm256_loadu_ps(py.add(i))));
                        i += 8;
                    }
                    while i < n {
                        *py.add(i) = alpha.mul_add($widen(*px.add(i)), *py.add(i));
                        i += 1;
                    }
                }
            }
        };
    }

    /// AVX-512 [`super::round_bf16`]: the rounding of `floats::f32_to_bf16` on 16 lanes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn round_bf16_512(src: &[f32], dst: &mut [u16]) {
        let n = src.len();
        let full = n / 16 * 16;
        // SAFETY: full 16-wide accesses below `full` (the lengths are equal), scalar after.
        unsafe {
            let (one, bias, quiet) = (_mm512_set1_epi32(1), _mm512_set1_epi32(0x7FFF), _mm512_set1_epi32(0x40));
            let mut i = 0;
            while i < full {
                let f = _mm512_loadu_ps(src.as_ptr().add(i));
                let b = _mm512_castps_si512(f);
                let high = _mm512_srli_epi32::<16>(b);
                let round = _mm512_add_epi32(_mm512_and_si512(high, one), bias);
                let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, round));
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(f, f);
                let h = _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(high, quiet));
                _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), _mm512_cvtepi32_epi16(h));
                i += 16;
            }
        }
        dst[full..].iter_mut().zip(&src[full..]).for_each(|(h, &f)| *h = crate::floats::f32_to_bf16(f));
    }

    avx2_vec!(dot256, axpy256, f32, load_f32_256, same);
    avx2_vec!(dot256_bf16, axpy256_bf16, u16, load_bf16_256, crate::floats::bf16_to_f32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::floats::f32_to_bf16;

    #[test]
    fn rounding_to_bf16_matches_the_scalar_rounding_bit_for_bit_on_every_isa() {
        let mut lcg = crate::test_values::Lcg(7);
        // Random bit patterns (NaNs, infinities, subnormals, ties among them) and the edges.
        let mut src: Vec<f32> = (0..1000).map(|_| f32::from_bits(lcg.next_u32())).collect();
        src.extend([f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1.0 + 1.0 / 256.0, f32::MAX]);
        src.extend((0..37).map(|i| f32::from_bits(0x3F80_8000 + (i << 16))));
        let want: Vec<u16> = src.iter().map(|&f| f32_to_bf16(f)).collect();
        for &isa in Isa::ALL.iter().filter(|&&i| available(i)) {
            let mut got = vec![0u16; src.len()];
            // SAFETY: only the available instruction sets are tried.
            unsafe { round_bf16(isa, &src, &mut got) };
            assert_eq!(got, want, "{isa:?}");
        }
    }
}
