//! AVX2 and FMA: four byte products per i32 lane in two instructions
//! (`vpmaddubsw`, then `vpmaddwd` against ones).

use super::{ahead, fetch_ahead, fifth_bits, four, hsum};
use crate::layout::{BLOCK, GROUP, GROUP_BLOCK, SIX_CENTRE};
use crate::tile::{GroupTile, Q8Tile};
use std::arch::x86_64::*;

/// Sums of four byte products per i32 lane: the pair sums stay within i16
/// because |w| ≤ 128 and |a| ≤ 127.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn dot(aw: __m256i, sa: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sa), _mm256_set1_epi16(1))
}

/// `acc` plus the sums of four byte products per i32 lane: the pair sums
/// stay within i16 because the weights are below 64 and |a| ≤ 127.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn add_dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_add_epi32(acc, dot(u, s))
}

super::dot_tile!("avx2,fma", dot);
super::group_tile!("avx2,fma", add_dot);
