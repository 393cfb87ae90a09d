//! NEON with dotprod: four byte products per i32 lane in one `sdot`.
//! Through inline assembly, because the `vdotq_s32` intrinsic is not
//! stable in Rust (issue 117224).

use super::{bit_bytes, four, hsum};
use crate::layout::{BLOCK, GROUP, GROUP_BLOCK, SIX_CENTRE};
use crate::tile::{GroupTile, Q8Tile};
use std::arch::aarch64::*;
use std::arch::asm;

/// `acc` plus, lane l, the sums of bytes 4l..4l + 4 of `a` times `b`.
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: registers only, no memory or flags; `sdot` exists because
    // this function's callers run only where dotprod was detected
    // (`crate::dispatch`).
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        )
    };
    acc
}

/// Sums of bytes 4l..4l + 4 of `w` times `a`, lane l.
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn dot(w: int8x16_t, a: int8x16_t) -> int32x4_t {
    sdot(vdupq_n_s32(0), w, a)
}

/// `acc` plus, lane l, the sums of bytes 4l..4l + 4 of `lo`·`xl` +
/// `hi`·`xh`.
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn dot2(acc: int32x4_t, lo: int8x16_t, xl: int8x16_t, hi: int8x16_t, xh: int8x16_t) -> int32x4_t {
    sdot(sdot(acc, lo, xl), hi, xh)
}

super::dot_tile!("neon,dotprod", dot);
super::group_tile!("neon,dotprod", dot2);
