//! The aarch64 paths: NEON, and NEON with the dotprod extension (`sdot`,
//! Cortex-A55/A76 and later, so a Raspberry Pi 5 but not a 4). They share
//! one template per format family, differing only in the instructions
//! that sum four byte products per i32 lane. Each kernel's arithmetic is
//! the scalar path's (`crate::scalar`), Q8_0 included, tested bit for bit.
//! A 128-bit vector holds a quarter of a group line (four rows), so a
//! 4- to 6-bit block takes four passes of four lines each.
//!
//! No software prefetch, unlike x86: stable Rust has no prefetch intrinsic
//! for aarch64, and the cores' own stream prefetchers are left to it
//! (unmeasured on hardware; see docs/BENCHMARKS.md).
//!
//! Every kernel here is `unsafe`: the caller ([`crate::dispatch`]) has
//! checked that the CPU has the kernel's features and that every slice
//! holds the `kb` blocks read through raw pointers.

pub(crate) mod dotprod;
pub(crate) mod neon;

use std::arch::aarch64::*;

/// Eight f32 lanes, `lo` the first four, summed as
/// `crate::scalar::hsum` does: high half onto low, then the pairs (0 + 2)
/// and (1 + 3), then those two.
#[inline]
#[target_feature(enable = "neon")]
fn hsum(lo: float32x4_t, hi: float32x4_t) -> f32 {
    let r = vaddq_f32(hi, lo);
    let pairs = vadd_f32(vget_low_f32(r), vget_high_f32(r));
    vget_lane_f32::<0>(pairs) + vget_lane_f32::<1>(pairs)
}

/// Byte t of the result is `value` where bit t of `bits` is set, else 0.
#[inline]
#[target_feature(enable = "neon")]
fn bit_bytes(bits: u16, value: u8) -> uint8x16_t {
    let spread = vcombine_u8(vdup_n_u8(bits as u8), vdup_n_u8((bits >> 8) as u8));
    let select = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
    vandq_u8(vtstq_u8(spread, select), vdupq_n_u8(value))
}

/// Four activation bytes broadcast to every 32-bit lane.
///
/// # Safety
/// `x` points at four readable bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn four(x: *const i8) -> int8x16_t {
    // SAFETY: the caller's; any alignment.
    let v = unsafe { (x as *const i32).read_unaligned() };
    vreinterpretq_s8_s32(vdupq_n_s32(v))
}

/// The Q8_0 tile, `$dot` giving the sums of four byte products per i32
/// lane of two 16-byte vectors.
macro_rules! dot_tile {
    ($features:literal, $dot:ident) => {
        /// The dot products of `R` Q8_0 weight rows with `C` activation
        /// rows, `[column][row]`: lanes 0–3 and 4–7 of the scalar model in
        /// two vectors.
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
            let mut acc = [[[vdupq_n_f32(0.0); 2]; R]; C];
            for b in 0..kb {
                let a: [[int8x16_t; 2]; C] = std::array::from_fn(|j| {
                    let p = a_qs[j].as_ptr().wrapping_add(b * BLOCK);
                    // SAFETY: block b < kb is in a_qs[j] (the caller's check).
                    unsafe { [vld1q_s8(p), vld1q_s8(p.add(16))] }
                });
                for i in 0..R {
                    let p = w_qs[i].as_ptr().wrapping_add(b * BLOCK);
                    // SAFETY: block b < kb is in w_qs[i] (the caller's check).
                    let w = unsafe { [vld1q_s8(p), vld1q_s8(p.add(16))] };
                    let wd = w_d[i][b];
                    for j in 0..C {
                        let d = vdupq_n_f32(wd * a_d[j][b]);
                        for h in 0..2 {
                            let q = vcvtq_f32_s32($dot(w[h], a[j][h]));
                            acc[j][i][h] = vfmaq_f32(acc[j][i][h], d, q);
                        }
                    }
                }
            }
            acc.map(|row| row.map(|[lo, hi]| hsum(lo, hi)))
        }
    };
}

/// Groups of 4- to 6-bit rows, a quarter (four rows) per vector, `$dot2`
/// adding to an accumulator the sums of four byte products per i32 lane
/// of two pairs of vectors (low nibbles, high nibbles).
macro_rules! group_tile {
    ($features:literal, $dot2:ident) => {
        /// The dot products of `R` groups of `BITS`-bit weight rows with
        /// `C` activation rows, `[column][group][row in group]`.
        ///
        /// # Safety
        /// The CPU has the features above; every table holds `kb` blocks.
        #[allow(
            clippy::needless_range_loop,
            reason = "i, j and q index the groups, activation rows and accumulators together"
        )]
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn dot_groups<const R: usize, const C: usize, const BITS: u32>(
            kb: usize,
            w: &GroupTile<R>,
            a: &Q8Tile<C>,
        ) -> [[[f32; GROUP]; R]; C] {
            let low = vdupq_n_u8(0x0F);
            let mut acc = [[[vdupq_n_f32(0.0); 4]; R]; C];
            for b in 0..kb {
                for i in 0..R {
                    let base = w.qs[i][b * GROUP_BLOCK..].as_ptr() as *const u8;
                    for q in 0..4 {
                        let mut dots = [vdupq_n_s32(0); C];
                        let mut first = [vdupq_n_s32(0); C];
                        for l in 0..4 {
                            if BITS == 6 && l == 2 {
                                first = dots;
                                dots = [vdupq_n_s32(0); C];
                            }
                            // SAFETY: the block's 256 bytes are in w.qs[i].
                            let v = unsafe { vld1q_u8(base.add(l * 64 + q * 16)) };
                            let mut lo = vandq_u8(v, low);
                            let mut hi = vshrq_n_u8::<4>(v);
                            if BITS == 6 {
                                let masks = &w.qh6[i][b * 8 + 2 * l..];
                                lo = vorrq_u8(lo, bit_bytes((masks[0] >> (16 * q)) as u16, 0x20));
                                hi = vorrq_u8(hi, bit_bytes((masks[1] >> (16 * q)) as u16, 0x20));
                            }
                            if BITS >= 5 {
                                let masks = &w.qh[i][b * 8 + 2 * l..];
                                lo = vorrq_u8(lo, bit_bytes((masks[0] >> (16 * q)) as u16, 0x10));
                                hi = vorrq_u8(hi, bit_bytes((masks[1] >> (16 * q)) as u16, 0x10));
                            }
                            let (lo, hi) = (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi));
                            for j in 0..C {
                                let x = a.qs[j][b * BLOCK + 8 * l..].as_ptr();
                                // SAFETY: bytes 8l..8l + 8 of the block are
                                // in a.qs[j].
                                let (xl, xh) = unsafe { (four(x), four(x.add(4))) };
                                dots[j] = $dot2(dots[j], lo, xl, hi, xh);
                            }
                        }
                        let rows = 4 * q;
                        if BITS == 6 {
                            // SAFETY: the block's two scale rows are in w.d[i].
                            let (d0, d1) = unsafe {
                                (
                                    vld1q_f32(w.d[i][2 * b * GROUP + rows..].as_ptr()),
                                    vld1q_f32(w.d[i][(2 * b + 1) * GROUP + rows..].as_ptr()),
                                )
                            };
                            for j in 0..C {
                                let da = vdupq_n_f32(a.d[j][b]);
                                let sums = &a.h[j][2 * b..];
                                let centred = |dot: int32x4_t, sum: i32| {
                                    vcvtq_f32_s32(vsubq_s32(dot, vdupq_n_s32(SIX_CENTRE * sum)))
                                };
                                acc[j][i][q] = vfmaq_f32(
                                    acc[j][i][q],
                                    vmulq_f32(d0, da),
                                    centred(first[j], sums[0]),
                                );
                                acc[j][i][q] = vfmaq_f32(
                                    acc[j][i][q],
                                    vmulq_f32(d1, da),
                                    centred(dots[j], sums[1]),
                                );
                            }
                        } else {
                            // SAFETY: the block's scale row is in w.d[i].
                            let dw = unsafe { vld1q_f32(w.d[i][b * GROUP + rows..].as_ptr()) };
                            for j in 0..C {
                                let da = vdupq_n_f32(a.d[j][b]);
                                acc[j][i][q] = vfmaq_f32(
                                    acc[j][i][q],
                                    vmulq_f32(dw, da),
                                    vcvtq_f32_s32(dots[j]),
                                );
                            }
                        }
                    }
                }
            }
            let factor = vdupq_n_f32(w.factor);
            let mut out = [[[0f32; GROUP]; R]; C];
            for j in 0..C {
                for i in 0..R {
                    for q in 0..4 {
                        let to = out[j][i][4 * q..].as_mut_ptr();
                        if BITS == 6 {
                            // SAFETY: four lanes into out[j][i][4q..4q + 4].
                            unsafe { vst1q_f32(to, acc[j][i][q]) };
                            continue;
                        }
                        let mut off = vdupq_n_f32(0.0);
                        for b in 0..kb {
                            // SAFETY: the block's offset row is in w.m[i].
                            let m = unsafe { vld1q_f32(w.m[i][b * GROUP + 4 * q..].as_ptr()) };
                            off = vfmaq_f32(off, m, vdupq_n_f32(a.s[j][b]));
                        }
                        // SAFETY: four lanes into out[j][i][4q..4q + 4].
                        unsafe { vst1q_f32(to, vfmaq_f32(acc[j][i][q], factor, off)) };
                    }
                }
            }
            out
        }
    };
}

use {dot_tile, group_tile};
