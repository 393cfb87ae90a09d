//! AVX-VNNI (CPUs with VNNI on 256-bit vectors but no AVX-512): four byte
//! products per i32 lane in one instruction (`vpdpbusd`, VEX-encoded).

use super::{ahead, fetch_ahead, fifth_bits, four, hsum};
use crate::layout::{BLOCK, GROUP, GROUP_BLOCK, SIX_CENTRE};
use crate::tile::{GroupTile, Q8Tile};
use std::arch::x86_64::*;

/// Sums of four byte products per i32 lane.
#[inline]
#[target_feature(enable = "avx2,fma,avxvnni")]
fn dot(aw: __m256i, sa: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), aw, sa)
}

/// `acc` plus the sums of four byte products per i32 lane.
#[inline]
#[target_feature(enable = "avx2,fma,avxvnni")]
fn add_dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(acc, u, s)
}

super::dot_tile!("avx2,fma,avxvnni", dot);
super::group_tile!("avx2,fma,avxvnni", add_dot);
