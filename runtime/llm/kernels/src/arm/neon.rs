//! Plain NEON (every aarch64 CPU; the Raspberry Pi 4's Cortex-A72 has
//! nothing more): four byte products per i32 lane from widening multiplies
//! and pairwise adds.

use super::{bit_bytes, four, hsum};
use crate::layout::{BLOCK, GROUP, GROUP_BLOCK, SIX_CENTRE};
use crate::tile::{GroupTile, Q8Tile};
use std::arch::aarch64::*;

/// Sums of bytes 4l..4l + 4 of `w` times `a`, lane l. The i16 products
/// are exact (|w|, |a| ≤ 128).
#[inline]
#[target_feature(enable = "neon")]
fn dot(w: int8x16_t, a: int8x16_t) -> int32x4_t {
    let low = vmull_s8(vget_low_s8(w), vget_low_s8(a));
    let high = vmull_high_s8(w, a);
    vpaddq_s32(vpaddlq_s16(low), vpaddlq_s16(high))
}

/// `acc` plus, lane l, the sums of bytes 4l..4l + 4 of `lo`·`xl` +
/// `hi`·`xh`. Each i16 holds two products, within range because the
/// weights are below 64 and |x| ≤ 127 (2 · 63 · 127 < 2¹⁵).
#[inline]
#[target_feature(enable = "neon")]
fn dot2(acc: int32x4_t, lo: int8x16_t, xl: int8x16_t, hi: int8x16_t, xh: int8x16_t) -> int32x4_t {
    let low = vmlal_s8(
        vmull_s8(vget_low_s8(lo), vget_low_s8(xl)),
        vget_low_s8(hi),
        vget_low_s8(xh),
    );
    let high = vmlal_high_s8(vmull_high_s8(lo, xl), hi, xh);
    vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(low), vpaddlq_s16(high)))
}

super::dot_tile!("neon", dot);
super::group_tile!("neon", dot2);
