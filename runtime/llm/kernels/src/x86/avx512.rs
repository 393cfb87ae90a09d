//! AVX-512 F, BW, VL and VNNI: a whole group of sixteen rows per vector
//! for the 4- to 6-bit formats (the fifth and sixth bits from one 64-bit
//! mask per half line), and two Q8_0 blocks per instruction.

use super::{ahead, fetch_ahead, four, hsum};
use crate::layout::{BLOCK, GROUP, GROUP_BLOCK, SIX_CENTRE};
use crate::tile::{GroupTile, Q8Tile};
use std::arch::x86_64::*;

/// The dot products of `R` groups of `BITS`-bit weight rows with `C`
/// activation rows, `[column][group][row in group]`.
///
/// # Safety
/// The CPU has the features below; every table holds `kb` blocks.
#[allow(
    clippy::needless_range_loop,
    reason = "i and j index the groups, activation rows and accumulators together"
)]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn dot_groups<const R: usize, const C: usize, const BITS: u32>(
    kb: usize,
    w: &GroupTile<R>,
    a: &Q8Tile<C>,
) -> [[[f32; GROUP]; R]; C] {
    let low = _mm512_set1_epi8(0x0F);
    let sixteen = _mm512_set1_epi8(0x10);
    let thirty_two = _mm512_set1_epi8(0x20);
    let mut acc = [[_mm512_setzero_ps(); R]; C];
    for b in 0..kb {
        let da: [__m512; C] = std::array::from_fn(|j| _mm512_set1_ps(a.d[j][b]));
        for i in 0..R {
            fetch_ahead::<R, BITS>(w, i, b, kb);
            let base = w.qs[i][b * GROUP_BLOCK..].as_ptr();
            // Low and high nibbles in chains of their own, added at the end
            // (exact), to halve the chain of dependent sums.
            let mut lows = [_mm512_setzero_si512(); C];
            let mut highs = [_mm512_setzero_si512(); C];
            // Q6: lines 0–1 and 2–3 are the block's two halves, each with a
            // scale of its own.
            let mut first = [_mm512_setzero_si512(); C];
            for l in 0..4 {
                if BITS == 6 && l == 2 {
                    for j in 0..C {
                        first[j] = _mm512_add_epi32(lows[j], highs[j]);
                    }
                    lows = [_mm512_setzero_si512(); C];
                    highs = [_mm512_setzero_si512(); C];
                }
                // SAFETY: the block's 256 bytes are in w.qs[i].
                let v = unsafe { _mm512_loadu_si512(base.add(l * 64) as *const __m512i) };
                let mut lo = _mm512_and_si512(v, low);
                let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                if BITS == 6 {
                    let masks = &w.qh6[i][b * 8 + 2 * l..];
                    lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi8(masks[0], thirty_two));
                    hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi8(masks[1], thirty_two));
                }
                if BITS >= 5 {
                    let masks = &w.qh[i][b * 8 + 2 * l..];
                    lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi8(masks[0], sixteen));
                    hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi8(masks[1], sixteen));
                }
                for j in 0..C {
                    let x = a.qs[j][b * BLOCK + 8 * l..].as_ptr();
                    // SAFETY: bytes 8l..8l + 8 of the block are in a.qs[j].
                    let (xl, xh) = unsafe { (four(x), four(x.add(4))) };
                    lows[j] = _mm512_dpbusd_epi32(lows[j], lo, _mm512_set1_epi32(xl));
                    highs[j] = _mm512_dpbusd_epi32(highs[j], hi, _mm512_set1_epi32(xh));
                }
            }
            if BITS == 6 {
                // SAFETY: the block's two scale rows are in w.d[i].
                let (d0, d1) = unsafe {
                    (
                        _mm512_loadu_ps(w.d[i][2 * b * GROUP..].as_ptr()),
                        _mm512_loadu_ps(w.d[i][(2 * b + 1) * GROUP..].as_ptr()),
                    )
                };
                for j in 0..C {
                    let sums = &a.h[j][2 * b..];
                    let centred = |dot: __m512i, sum: i32| {
                        _mm512_cvtepi32_ps(_mm512_sub_epi32(
                            dot,
                            _mm512_set1_epi32(SIX_CENTRE * sum),
                        ))
                    };
                    let second = _mm512_add_epi32(lows[j], highs[j]);
                    acc[j][i] = _mm512_fmadd_ps(
                        _mm512_mul_ps(d0, da[j]),
                        centred(first[j], sums[0]),
                        acc[j][i],
                    );
                    acc[j][i] = _mm512_fmadd_ps(
                        _mm512_mul_ps(d1, da[j]),
                        centred(second, sums[1]),
                        acc[j][i],
                    );
                }
            } else {
                // SAFETY: the block's scale row is in w.d[i].
                let dw = unsafe { _mm512_loadu_ps(w.d[i][b * GROUP..].as_ptr()) };
                for j in 0..C {
                    let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lows[j], highs[j]));
                    acc[j][i] = _mm512_fmadd_ps(_mm512_mul_ps(dw, da[j]), dot, acc[j][i]);
                }
            }
        }
    }
    let factor = _mm512_set1_ps(w.factor);
    let mut out = [[[0f32; GROUP]; R]; C];
    for j in 0..C {
        for i in 0..R {
            let to = out[j][i].as_mut_ptr();
            if BITS == 6 {
                // SAFETY: sixteen lanes into out[j][i].
                unsafe { _mm512_storeu_ps(to, acc[j][i]) };
                continue;
            }
            let mut off = _mm512_setzero_ps();
            for b in 0..kb {
                // SAFETY: the block's offset row is in w.m[i].
                let m = unsafe { _mm512_loadu_ps(w.m[i][b * GROUP..].as_ptr()) };
                off = _mm512_fmadd_ps(m, _mm512_set1_ps(a.s[j][b]), off);
            }
            let sum = _mm512_fmadd_ps(factor, off, acc[j][i]);
            // SAFETY: sixteen lanes into out[j][i].
            unsafe { _mm512_storeu_ps(to, sum) };
        }
    }
    out
}

/// Scales of blocks `b` and `b + 1` (or of `b` alone, zero above) in the
/// low and high eight lanes.
///
/// # Safety
/// `p` points at two readable f32 (`both`) or one.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn scale_pair(p: *const f32, both: bool) -> __m512 {
    let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let two = if both {
        // SAFETY: the caller's: two f32 at `p`.
        unsafe { _mm_castpd_ps(_mm_load_sd(p as *const f64)) }
    } else {
        // SAFETY: the caller's: one f32 at `p`.
        unsafe { _mm_load_ss(p) }
    };
    _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(two))
}

/// The low eight lanes plus the high eight.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f")]
fn halves_added(x: __m512) -> __m256 {
    let lo = _mm512_castps512_ps256(x);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
    _mm256_add_ps(lo, hi)
}

/// The dot products of `R` Q8_0 weight rows with `C` activation rows,
/// `[column][row]`, two blocks per instruction: lanes 0–7 take the even
/// blocks, lanes 8–15 the odd ones (an odd last block with zeros above
/// it); the two halves are added at the end, then summed as in [`hsum`].
/// So its results differ from the other paths' in the last bits.
///
/// # Safety
/// The CPU has the features below; every slice holds `kb` blocks.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn dot_tile<const R: usize, const C: usize>(
    kb: usize,
    w_qs: &[&[i8]; R],
    w_d: &[&[f32]; R],
    a_qs: &[&[i8]; C],
    a_d: &[&[f32]; C],
) -> [[f32; R]; C] {
    let w_q: [*const i8; R] = std::array::from_fn(|i| w_qs[i].as_ptr());
    let a_q: [*const i8; C] = std::array::from_fn(|j| a_qs[j].as_ptr());
    let w_s: [*const f32; R] = std::array::from_fn(|i| w_d[i].as_ptr());
    let a_s: [*const f32; C] = std::array::from_fn(|j| a_d[j].as_ptr());
    let zero = _mm512_setzero_si512();
    let mut acc = [[_mm512_setzero_ps(); R]; C];
    // One step: blocks b and b + 1 (64 bytes), or the odd last block alone
    // (low 32 bytes; its scale's high half is 0). `$load` and `$scales`
    // read only within the slices, which hold kb blocks.
    macro_rules! step {
        ($b:expr, $load:expr, $scales:expr) => {{
            let b = $b;
            let a: [__m512i; C] = std::array::from_fn(|j| $load(a_q[j].wrapping_add(b * 32)));
            let neg: [__m512i; C] = std::array::from_fn(|j| _mm512_sub_epi8(zero, a[j]));
            let ad: [__m512; C] = std::array::from_fn(|j| $scales(a_s[j].wrapping_add(b)));
            for i in 0..R {
                ahead(w_qs[i], b * 32, R);
                let w = $load(w_q[i].wrapping_add(b * 32));
                let aw = _mm512_abs_epi8(w);
                let negative = _mm512_movepi8_mask(w);
                let wd = $scales(w_s[i].wrapping_add(b));
                for j in 0..C {
                    let sa = _mm512_mask_blend_epi8(negative, a[j], neg[j]);
                    let dot = _mm512_dpbusd_epi32(zero, aw, sa);
                    let q = _mm512_cvtepi32_ps(dot);
                    acc[j][i] = _mm512_fmadd_ps(_mm512_mul_ps(wd, ad[j]), q, acc[j][i]);
                }
            }
        }};
    }
    let mut b = 0;
    while b + 1 < kb {
        // The closures are given only pointers to blocks b and b + 1 < kb
        // of the slices.
        let both = |p: *const i8| {
            // SAFETY: 64 bytes at `p`, in the slice (above).
            unsafe { _mm512_loadu_si512(p as *const __m512i) }
        };
        // SAFETY: two scales at `p`, in the slice (above).
        let pair = |p: *const f32| unsafe { scale_pair(p, true) };
        step!(b, both, pair);
        b += 2;
    }
    if b < kb {
        // SAFETY: block b < kb, its 32 bytes only (masked load).
        let low = |p: *const i8| unsafe { _mm512_maskz_loadu_epi8(0xFFFF_FFFF, p) };
        // SAFETY: as above, scale b only.
        let single = |p: *const f32| unsafe { scale_pair(p, false) };
        step!(b, low, single);
    }
    let mut out = [[0f32; R]; C];
    for j in 0..C {
        for i in 0..R {
            out[j][i] = hsum(halves_added(acc[j][i]));
        }
    }
    out
}
