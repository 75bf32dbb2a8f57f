//! The vector instructions the CPU kernels ([`super::pointwise`], [`super::depthwise`]) are
//! written with: AVX-512F, AVX2 with FMA, and plain Rust the compiler vectorises for the
//! build's baseline. A kernel is generic over [`Isa`] and compiled once per instruction set in a
//! function with that target feature, chosen at run time.

use burn::backend::Flex;
use burn::backend::tensor::FloatTensor;

/// The values of a contiguous f32 tensor on the CPU backend, as the kernels read them.
pub(in crate::compact) fn values(t: &FloatTensor<Flex>) -> &[f32] {
    let l = t.layout();
    &t.storage::<f32>()[l.start_offset()..][..l.num_elements()]
}

/// The instruction sets a kernel is built for, the widest last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(in crate::compact) enum Level {
    /// Plain Rust ([`Portable`]).
    Portable,
    /// AVX2 with FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512F.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Level {
    /// Every level this processor runs, the widest last (found once).
    pub(in crate::compact) fn available() -> &'static [Level] {
        static ALL: std::sync::OnceLock<Vec<Level>> = std::sync::OnceLock::new();
        ALL.get_or_init(|| {
            let mut all = vec![Level::Portable];
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx2") && has!("fma") {
                    all.push(Level::Avx2);
                    if has!("avx512f") {
                        all.push(Level::Avx512);
                    }
                }
            }
            all
        })
    }

    /// The level the kernels run at: the widest this processor has, or narrower where the
    /// environment variable `WBC_CPU_SIMD` says so (`avx2` or `portable`: what a processor
    /// without AVX-512, or without either, would run; for measuring, or to rule a kernel out).
    pub(in crate::compact) fn best() -> Level {
        static BEST: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let all = Level::available();
            let cap = match std::env::var("WBC_CPU_SIMD").as_deref() {
                Ok("portable") => Some(Level::Portable),
                #[cfg(target_arch = "x86_64")]
                Ok("avx2") => Some(Level::Avx2),
                _ => None,
            };
            let widest = *all.last().expect("the portable level");
            cap.map_or(widest, |c| c.min(widest))
        })
    }
}

/// Vector instructions, as the kernels use them.
pub(in crate::compact) trait Isa {
    /// f32 values per vector.
    const LANES: usize;
    /// Output channels per tile.
    const ROWS: usize;
    /// Vectors of pixels per tile at most.
    const VECTORS: usize;
    type V: Copy;
    unsafe fn splat(v: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn relu6(a: Self::V) -> Self::V;
    /// Stores the first `n` (≤ `LANES`) values of `v` at `p`.
    unsafe fn store_n(p: *mut f32, v: Self::V, n: usize);
    /// Lanes `lo..hi` (`hi` ≤ `LANES`) from `p[lane]`, zeros in the others, which are never
    /// read (so `p` may point before its slice where `lo` > 0).
    unsafe fn load_range(p: *const f32, lo: usize, hi: usize) -> Self::V;
    /// The `2 · LANES` values at `p` split into those at even places and those at odd ones.
    unsafe fn deinterleave(p: *const f32) -> (Self::V, Self::V);
}

/// Plain Rust, vectorised by the compiler for the build's baseline.
pub(in crate::compact) struct Portable;

impl Isa for Portable {
    const LANES: usize = 8;
    const ROWS: usize = 4;
    const VECTORS: usize = 2;
    type V = [f32; 8];
    #[inline(always)]
    unsafe fn splat(v: f32) -> [f32; 8] {
        [v; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; 8] {
        // SAFETY: the caller passes 8 readable values.
        unsafe { std::ptr::read_unaligned(p.cast()) }
    }
    #[inline(always)]
    unsafe fn fma(a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn add(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn relu6(a: [f32; 8]) -> [f32; 8] {
        a.map(|v| v.clamp(0.0, 6.0))
    }
    #[inline(always)]
    unsafe fn store_n(p: *mut f32, v: [f32; 8], n: usize) {
        // SAFETY: the caller passes room for `n` values.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), p, n.min(8)) }
    }
    #[inline(always)]
    unsafe fn load_range(p: *const f32, lo: usize, hi: usize) -> [f32; 8] {
        // SAFETY: the caller passes lanes `lo..hi` readable.
        std::array::from_fn(|i| {
            if i >= lo && i < hi {
                unsafe { *p.wrapping_add(i) }
            } else {
                0.0
            }
        })
    }
    #[inline(always)]
    unsafe fn deinterleave(p: *const f32) -> ([f32; 8], [f32; 8]) {
        // SAFETY: the caller passes 16 readable values.
        unsafe {
            (
                std::array::from_fn(|i| *p.add(2 * i)),
                std::array::from_fn(|i| *p.add(2 * i + 1)),
            )
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(in crate::compact) mod x86 {
    use super::Isa;
    use std::arch::x86_64::*;

    /// AVX-512F: 8 output channels × 3 vectors of 16 pixels, 24 accumulators of 32 registers.
    pub(in crate::compact) struct Avx512;

    #[inline(always)]
    fn mask16(n: usize) -> __mmask16 {
        if n >= 16 { 0xffff } else { ((1u32 << n) - 1) as u16 }
    }

    // SAFETY (every function below): called only from functions compiled for AVX-512F, chosen
    // where the processor has it; pointers as `Isa` documents.
    impl Isa for Avx512 {
        const LANES: usize = 16;
        const ROWS: usize = 8;
        const VECTORS: usize = 3;
        type V = __m512;
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m512 {
            unsafe { _mm512_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn relu6(a: __m512) -> __m512 {
            unsafe { _mm512_min_ps(_mm512_max_ps(a, _mm512_setzero_ps()), _mm512_set1_ps(6.0)) }
        }
        #[inline(always)]
        unsafe fn store_n(p: *mut f32, v: __m512, n: usize) {
            unsafe { _mm512_mask_storeu_ps(p, mask16(n), v) }
        }
        #[inline(always)]
        unsafe fn load_range(p: *const f32, lo: usize, hi: usize) -> __m512 {
            // Masked-off lanes are not read (and cannot fault).
            unsafe { _mm512_maskz_loadu_ps(mask16(hi) & !mask16(lo), p) }
        }
        #[inline(always)]
        unsafe fn deinterleave(p: *const f32) -> (__m512, __m512) {
            unsafe {
                let (a, b) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
                let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
                (_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b))
            }
        }
    }

    /// AVX2 and FMA: 4 output channels × 3 vectors of 8 pixels, 12 accumulators of 16 registers.
    pub(in crate::compact) struct Avx2;

    #[inline(always)]
    unsafe fn mask8(n: usize) -> __m256i {
        unsafe { _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)) }
    }

    // SAFETY (every function below): called only from functions compiled for AVX2 and FMA,
    // chosen where the processor has them; pointers as `Isa` documents.
    impl Isa for Avx2 {
        const LANES: usize = 8;
        const ROWS: usize = 4;
        const VECTORS: usize = 3;
        type V = __m256;
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m256 {
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn relu6(a: __m256) -> __m256 {
            unsafe { _mm256_min_ps(_mm256_max_ps(a, _mm256_setzero_ps()), _mm256_set1_ps(6.0)) }
        }
        #[inline(always)]
        unsafe fn store_n(p: *mut f32, v: __m256, n: usize) {
            unsafe {
                if n >= 8 {
                    _mm256_storeu_ps(p, v)
                } else {
                    _mm256_maskstore_ps(p, mask8(n), v)
                }
            }
        }
        #[inline(always)]
        unsafe fn load_range(p: *const f32, lo: usize, hi: usize) -> __m256 {
            // Masked-off lanes are not read (and cannot fault).
            unsafe {
                let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let above = _mm256_cmpgt_epi32(lanes, _mm256_set1_epi32(lo as i32 - 1));
                let below = _mm256_cmpgt_epi32(_mm256_set1_epi32(hi as i32), lanes);
                _mm256_maskload_ps(p, _mm256_and_si256(above, below))
            }
        }
        #[inline(always)]
        unsafe fn deinterleave(p: *const f32) -> (__m256, __m256) {
            unsafe {
                let (a, b) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
                // Within each 128-bit half: a0 a2 b0 b2 | a4 a6 b4 b6; then the halves' middle
                // quarters swapped.
                let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
                let odd = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
                let order = |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)));
                (order(even), order(odd))
            }
        }
    }
}
