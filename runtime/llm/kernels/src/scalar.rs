//! The portable path, in plain Rust: what every CPU without an x86 or NEON
//! path runs (RISC-V, 32-bit ARM, x86-64 without AVX2), in place of
//! candle's slower product. Its arithmetic is the order every SIMD path
//! follows, so it gives the same bits as they do:
//!
//! Q8_0: per block, lane l (of eight) takes the exact integer sum over
//! elements 4l to 4l + 3, times the product of the two scales, fused into
//! the lane's f32 accumulator; at the end the lanes are summed as candle
//! and GGML sum an 8-lane vector (high half onto low, then pairs). AVX-512
//! alone differs: it keeps odd blocks in eight lanes of their own, added
//! to the even ones before the final sum, so its Q8_0 results differ from
//! the others' in the last bits (both deterministic).
//!
//! 4- and 5-bit: per block, the exact integer dot product times the scale
//! product, fused into one f32 accumulator, and the offset times the
//! activations' block sum fused into another; at the end the second times
//! the factor fused onto the first. 6-bit: per half block, the integer dot
//! product less 32 × the activations' integer half sum, times the scale
//! product, fused into the accumulator.
//!
//! `f32::mul_add` is one fused instruction on every 64-bit target with a
//! SIMD path and a correctly rounded library call elsewhere, so the bits
//! are the same, only slower.

use crate::layout::{BLOCK, GROUP, GROUP_BLOCK, SIX_CENTRE};
use crate::tile::{GroupTile, Q8Tile};

/// Eight f32 lanes summed as an x86 `hsum` does: high half onto low, then
/// the pairs (0 + 2) and (1 + 3), then those two.
#[inline(always)]
pub(crate) fn hsum(l: [f32; 8]) -> f32 {
    let r: [f32; 4] = std::array::from_fn(|x| l[x + 4] + l[x]);
    (r[0] + r[2]) + (r[1] + r[3])
}

/// The dot products of `R` Q8_0 weight rows with `C` activation rows,
/// `[column][row]`. Slices hold at least `kb` blocks.
pub(crate) fn dot_tile<const R: usize, const C: usize>(
    kb: usize,
    w_qs: &[&[i8]; R],
    w_d: &[&[f32]; R],
    a_qs: &[&[i8]; C],
    a_d: &[&[f32]; C],
) -> [[f32; R]; C] {
    let mut lanes = [[[0f32; 8]; R]; C];
    for b in 0..kb {
        for (i, (w, wd)) in w_qs.iter().zip(w_d).enumerate() {
            let w = &w[b * BLOCK..][..BLOCK];
            for (j, (a, ad)) in a_qs.iter().zip(a_d).enumerate() {
                let a = &a[b * BLOCK..][..BLOCK];
                let d = wd[b] * ad[b];
                for (l, lane) in lanes[j][i].iter_mut().enumerate() {
                    let s: i32 = (0..4)
                        .map(|e| w[4 * l + e] as i32 * a[4 * l + e] as i32)
                        .sum();
                    *lane = d.mul_add(s as f32, *lane);
                }
            }
        }
    }
    lanes.map(|row| row.map(hsum))
}

/// The dot products of `R` groups of `BITS`-bit (4, 5 or 6) weight rows
/// with `C` activation rows, `[column][group][row in group]`. Tables hold
/// at least `kb` blocks (see [`crate::layout::NibbleMatrix`]).
#[allow(
    clippy::needless_range_loop,
    reason = "i indexes the groups of `w` and of the output together"
)]
pub(crate) fn dot_groups<const R: usize, const C: usize, const BITS: u32>(
    kb: usize,
    w: &GroupTile<R>,
    a: &Q8Tile<C>,
) -> [[[f32; GROUP]; R]; C] {
    let mut out = [[[0f32; GROUP]; R]; C];
    for i in 0..R {
        let mut acc = [[0f32; GROUP]; C];
        for b in 0..kb {
            let q = values::<R, BITS>(w, i, b);
            for (j, acc) in acc.iter_mut().enumerate() {
                let x = &a.qs[j][b * BLOCK..][..BLOCK];
                for (r, acc) in acc.iter_mut().enumerate() {
                    let dot = |ts: std::ops::Range<usize>| -> i32 {
                        ts.map(|t| i32::from(q[r][t]) * i32::from(x[t])).sum()
                    };
                    if BITS == 6 {
                        for half in 0..2 {
                            let centred =
                                dot(half * 16..half * 16 + 16) - SIX_CENTRE * a.h[j][2 * b + half];
                            let d = w.d[i][(2 * b + half) * GROUP + r] * a.d[j][b];
                            *acc = d.mul_add(centred as f32, *acc);
                        }
                    } else {
                        let d = w.d[i][b * GROUP + r] * a.d[j][b];
                        *acc = d.mul_add(dot(0..BLOCK) as f32, *acc);
                    }
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (r, &acc) in acc.iter().enumerate() {
                out[j][i][r] = if BITS == 6 {
                    acc
                } else {
                    let mut off = 0f32;
                    for b in 0..kb {
                        off = w.m[i][b * GROUP + r].mul_add(a.s[j][b], off);
                    }
                    w.factor.mul_add(off, acc)
                };
            }
        }
    }
    out
}

/// Block `b` of group `i` unpacked: `q[r][t]` is element t of row r, with
/// its fifth and sixth bits.
#[inline(always)]
fn values<const R: usize, const BITS: u32>(
    w: &GroupTile<R>,
    i: usize,
    b: usize,
) -> [[u8; BLOCK]; GROUP] {
    let qs = &w.qs[i][b * GROUP_BLOCK..][..GROUP_BLOCK];
    let mut q = [[0u8; BLOCK]; GROUP];
    for (l, line) in qs.chunks_exact(64).enumerate() {
        let masks = |plane: &[u64]| -> [u64; 2] {
            if plane.is_empty() {
                [0; 2]
            } else {
                [plane[b * 8 + 2 * l], plane[b * 8 + 2 * l + 1]]
            }
        };
        let (fifth, sixth) = (masks(w.qh[i]), masks(w.qh6[i]));
        for (r, q) in q.iter_mut().enumerate() {
            for e in 0..4 {
                let (byte, bit) = (line[4 * r + e] as u8, 4 * r + e);
                for half in 0..2 {
                    let mut v = byte >> (4 * half) & 0x0F;
                    if BITS >= 5 {
                        v |= ((fifth[half] >> bit & 1) as u8) << 4;
                    }
                    if BITS == 6 {
                        v |= ((sixth[half] >> bit & 1) as u8) << 5;
                    }
                    q[8 * l + 4 * half + e] = v;
                }
            }
        }
    }
    q
}
