//! The x86-64 paths: what AVX2 and AVX-VNNI share (both on 256-bit
//! vectors, differing only in the instruction that sums four byte
//! products per lane, so one template each, instantiated twice), and
//! AVX-512 VNNI on 512-bit vectors. Each kernel's arithmetic is the
//! scalar path's (`crate::scalar`), tested bit for bit.
//!
//! Every kernel here is `unsafe`: the caller ([`crate::dispatch`]) has
//! checked that the CPU has the kernel's features and that every slice
//! holds the `kb` blocks read through raw pointers.

pub(crate) mod avx2;
pub(crate) mod avx512;
pub(crate) mod vnni;

use crate::layout::{GROUP, GROUP_BLOCK};
use crate::tile::GroupTile;
use std::arch::x86_64::*;

/// Asks for byte `at` of the Q8_0 weight row two tiles of `rows` on
/// (rows are contiguous). A tile reads its short rows side by side, a
/// pattern the hardware prefetcher follows badly (see [`fetch_ahead`] for
/// the 4- to 6-bit layout). A hint only: past the matrix's end it fetches
/// nothing useful and faults nothing.
#[inline(always)]
fn ahead(row: &[i8], at: usize, rows: usize) {
    let p = row.as_ptr().wrapping_add(at + 2 * rows * row.len());
    // SAFETY: prefetching never faults, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p) };
}

/// Eight f32 lanes summed as candle and GGML do: high half onto low, then
/// pairs, then the last two (`crate::scalar::hsum`).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(x: __m256) -> f32 {
    let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    let r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// Element t of the result is 16 where bit t of `h` is set, else 0 (each
/// byte picks its byte of `h`, sets every other bit, and compares with all
/// ones).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn fifth_bits(h: u32) -> __m256i {
    let spread = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(h as i32), spread);
    let others = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_and_si256(
        _mm256_cmpeq_epi8(others, _mm256_set1_epi64x(-1)),
        _mm256_set1_epi8(0x10),
    )
}

/// Asks for block `b` of group `i` two tiles of `R` groups on (groups are
/// contiguous in each table). A tile reads its groups side by side, a
/// pattern the hardware prefetcher follows badly: prefetching (first of
/// rows, in the earlier layout) took one thread's decode on SmolLM2 from
/// about 63 to 70–88 tok/s (Q4_1) and on the Qwen2.5-0.5B shape from 20 to
/// 27 (Q5_0). A hint only: past a table's end it fetches nothing useful
/// and faults nothing.
#[inline(always)]
fn fetch_ahead<const R: usize, const BITS: u32>(w: &GroupTile<R>, i: usize, b: usize, kb: usize) {
    let on = 2 * R;
    let fetch = |p: *const i8| {
        // SAFETY: prefetching never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p) }
    };
    let qs = w.qs[i]
        .as_ptr()
        .wrapping_add(b * GROUP_BLOCK + on * w.qs[i].len());
    for line in 0..GROUP_BLOCK / 64 {
        fetch(qs.wrapping_add(line * 64));
    }
    let scales = w.d[i].len() / kb;
    for line in (0..scales).step_by(16) {
        let at = b * scales + line + on * w.d[i].len();
        fetch(w.d[i].as_ptr().wrapping_add(at) as *const i8);
    }
    if !w.m[i].is_empty() && w.m[i].as_ptr() != w.d[i].as_ptr() {
        fetch(w.m[i].as_ptr().wrapping_add(b * GROUP + on * w.m[i].len()) as *const i8);
    }
    if BITS >= 5 {
        fetch(w.qh[i].as_ptr().wrapping_add(b * 8 + on * w.qh[i].len()) as *const i8);
    }
    if BITS == 6 {
        fetch(w.qh6[i].as_ptr().wrapping_add(b * 8 + on * w.qh6[i].len()) as *const i8);
    }
}

/// Four activation bytes as an i32, for broadcasting.
///
/// # Safety
/// `x` points at four readable bytes.
#[inline(always)]
unsafe fn four(x: *const i8) -> i32 {
    // SAFETY: the caller's; any alignment.
    unsafe { (x as *const i32).read_unaligned() }
}

/// The Q8_0 tile on 256-bit vectors, `$dot` summing four byte products per
/// i32 lane.
macro_rules! dot_tile {
    ($features:literal, $dot:ident) => {
        /// The dot products of `R` Q8_0 weight rows with `C` activation
        /// rows, `[column][row]`.
        ///
        /// # Safety
        /// The CPU has the features above; every slice holds `kb` blocks.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn dot_tile<const R: usize, const C: usize>(
            kb: usize,
            w_qs: &[&[i8]; R],
            w_d: &[&[f32]; R],
            a_qs: &[&[i8]; C],
            a_d: &[&[f32]; C],
        ) -> [[f32; R]; C] {
            let mut acc = [[_mm256_setzero_ps(); R]; C];
            for b in 0..kb {
                let a: [__m256i; C] = std::array::from_fn(|j| {
                    // SAFETY: a_qs[j] holds kb blocks (the caller's check).
                    unsafe { _mm256_loadu_si256(a_qs[j].as_ptr().add(b * 32) as *const __m256i) }
                });
                for i in 0..R {
                    ahead(w_qs[i], b * 32, R);
                    // SAFETY: w_qs[i] holds kb blocks (the caller's check).
                    let w = unsafe {
                        _mm256_loadu_si256(w_qs[i].as_ptr().add(b * 32) as *const __m256i)
                    };
                    // |w| as unsigned bytes, the sign moved onto the
                    // activations: the products are exact in i32.
                    let aw = _mm256_sign_epi8(w, w);
                    let wd = w_d[i][b];
                    for j in 0..C {
                        let sa = _mm256_sign_epi8(a[j], w);
                        let q = _mm256_cvtepi32_ps($dot(aw, sa));
                        let d = _mm256_set1_ps(wd * a_d[j][b]);
                        acc[j][i] = _mm256_fmadd_ps(d, q, acc[j][i]);
                    }
                }
            }
            let mut out = [[0f32; R]; C];
            for j in 0..C {
                for i in 0..R {
                    out[j][i] = hsum(acc[j][i]);
                }
            }
            out
        }
    };
}

/// Groups of 4- to 6-bit rows on 256-bit vectors: each group as two halves
/// of eight rows (the first and last 32 bytes of each line), `$dot`
/// adding four byte products per i32 lane to an accumulator.
macro_rules! group_tile {
    ($features:literal, $dot:ident) => {
        /// The dot products of `R` groups of `BITS`-bit weight rows with
        /// `C` activation rows, `[column][group][row in group]`.
        ///
        /// # Safety
        /// The CPU has the features above; every table holds `kb` blocks.
        #[allow(
            clippy::needless_range_loop,
            reason = "i, j and h index the groups, activation rows and accumulators together"
        )]
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn dot_groups<const R: usize, const C: usize, const BITS: u32>(
            kb: usize,
            w: &GroupTile<R>,
            a: &Q8Tile<C>,
        ) -> [[[f32; GROUP]; R]; C] {
            let low = _mm256_set1_epi8(0x0F);
            let mut acc = [[[_mm256_setzero_ps(); 2]; R]; C];
            for b in 0..kb {
                let da: [__m256; C] = std::array::from_fn(|j| _mm256_set1_ps(a.d[j][b]));
                for i in 0..R {
                    fetch_ahead::<R, BITS>(w, i, b, kb);
                    let base = w.qs[i][b * GROUP_BLOCK..].as_ptr();
                    for h in 0..2 {
                        let mut dots = [_mm256_setzero_si256(); C];
                        let mut first = [_mm256_setzero_si256(); C];
                        for l in 0..4 {
                            if BITS == 6 && l == 2 {
                                first = dots;
                                dots = [_mm256_setzero_si256(); C];
                            }
                            // SAFETY: the block's 256 bytes are in w.qs[i].
                            let v = unsafe {
                                _mm256_loadu_si256(base.add(l * 64 + h * 32) as *const __m256i)
                            };
                            let mut lo = _mm256_and_si256(v, low);
                            let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                            if BITS == 6 {
                                let masks = &w.qh6[i][b * 8 + 2 * l..];
                                let six = |m: u64| {
                                    _mm256_add_epi8(
                                        fifth_bits((m >> (32 * h)) as u32),
                                        fifth_bits((m >> (32 * h)) as u32),
                                    )
                                };
                                lo = _mm256_or_si256(lo, six(masks[0]));
                                hi = _mm256_or_si256(hi, six(masks[1]));
                            }
                            if BITS >= 5 {
                                let masks = &w.qh[i][b * 8 + 2 * l..];
                                lo = _mm256_or_si256(lo, fifth_bits((masks[0] >> (32 * h)) as u32));
                                hi = _mm256_or_si256(hi, fifth_bits((masks[1] >> (32 * h)) as u32));
                            }
                            for j in 0..C {
                                let x = a.qs[j][b * BLOCK + 8 * l..].as_ptr();
                                // SAFETY: bytes 8l..8l + 8 of the block are
                                // in a.qs[j].
                                let (xl, xh) = unsafe { (four(x), four(x.add(4))) };
                                dots[j] = $dot(dots[j], lo, _mm256_set1_epi32(xl));
                                dots[j] = $dot(dots[j], hi, _mm256_set1_epi32(xh));
                            }
                        }
                        if BITS == 6 {
                            // SAFETY: the block's two scale rows are in w.d[i].
                            let (d0, d1) = unsafe {
                                (
                                    _mm256_loadu_ps(w.d[i][2 * b * GROUP + h * 8..].as_ptr()),
                                    _mm256_loadu_ps(w.d[i][(2 * b + 1) * GROUP + h * 8..].as_ptr()),
                                )
                            };
                            for j in 0..C {
                                let sums = &a.h[j][2 * b..];
                                let centred = |dot: __m256i, sum: i32| {
                                    _mm256_cvtepi32_ps(_mm256_sub_epi32(
                                        dot,
                                        _mm256_set1_epi32(SIX_CENTRE * sum),
                                    ))
                                };
                                acc[j][i][h] = _mm256_fmadd_ps(
                                    _mm256_mul_ps(d0, da[j]),
                                    centred(first[j], sums[0]),
                                    acc[j][i][h],
                                );
                                acc[j][i][h] = _mm256_fmadd_ps(
                                    _mm256_mul_ps(d1, da[j]),
                                    centred(dots[j], sums[1]),
                                    acc[j][i][h],
                                );
                            }
                        } else {
                            let dw =
                                // SAFETY: the block's scale row is in w.d[i].
                                unsafe { _mm256_loadu_ps(w.d[i][b * GROUP + h * 8..].as_ptr()) };
                            for j in 0..C {
                                acc[j][i][h] = _mm256_fmadd_ps(
                                    _mm256_mul_ps(dw, da[j]),
                                    _mm256_cvtepi32_ps(dots[j]),
                                    acc[j][i][h],
                                );
                            }
                        }
                    }
                }
            }
            let factor = _mm256_set1_ps(w.factor);
            let mut out = [[[0f32; GROUP]; R]; C];
            for j in 0..C {
                for i in 0..R {
                    for h in 0..2 {
                        let to = out[j][i][h * 8..].as_mut_ptr();
                        if BITS == 6 {
                            // SAFETY: eight lanes into out[j][i][8h..8h + 8].
                            unsafe { _mm256_storeu_ps(to, acc[j][i][h]) };
                            continue;
                        }
                        let mut off = _mm256_setzero_ps();
                        for b in 0..kb {
                            let m =
                                // SAFETY: the block's offset row is in w.m[i].
                                unsafe { _mm256_loadu_ps(w.m[i][b * GROUP + h * 8..].as_ptr()) };
                            off = _mm256_fmadd_ps(m, _mm256_set1_ps(a.s[j][b]), off);
                        }
                        let sum = _mm256_fmadd_ps(factor, off, acc[j][i][h]);
                        // SAFETY: eight lanes into out[j][i][8h..8h + 8].
                        unsafe { _mm256_storeu_ps(to, sum) };
                    }
                }
            }
            out
        }
    };
}

use {dot_tile, group_tile};
