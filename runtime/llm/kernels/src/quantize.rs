//! Activations quantised to 8 bits per block of 32, once per product call,
//! as GGML quantises them for its Q8_0 dot products: per block, scale =
//! max |x| / 127 rounded to f16, values rounded half away from zero.

use crate::ggml::{f16_to_f32, f32_to_f16};
use crate::layout::BLOCK;

/// Activations quantised like Q8_0 weights, row by row, with each block's
/// sum (scale × Σ values, exact before the one rounding) for the offset
/// term of the 4- and 5-bit formats, and the integer sums of each block's
/// halves for Q6_K's centre.
pub struct Q8Rows {
    pub(crate) k: usize,
    pub(crate) qs: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) s: Vec<f32>,
    pub(crate) h: Vec<i32>,
}

impl Q8Rows {
    /// Rows held.
    pub fn rows(&self) -> usize {
        self.qs.len().checked_div(self.k).unwrap_or(0)
    }

    /// Row width.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The quantised values, row-major.
    pub fn values(&self) -> &[i8] {
        &self.qs
    }

    /// Each block's scale (f16-rounded, as f32), row-major.
    pub fn scales(&self) -> &[f32] {
        &self.d
    }
}

/// `m` rows of `k` activations (`k` a multiple of 32) quantised.
///
/// # Panics
/// If `x` is not `m × k` values or `k` is not a multiple of 32.
pub fn quantize_rows(x: &[f32], m: usize, k: usize) -> Q8Rows {
    assert!(
        k.is_multiple_of(BLOCK) && m.checked_mul(k) == Some(x.len()),
        "{} activations are not {m} rows of {k} (a multiple of {BLOCK})",
        x.len()
    );
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA were detected just above; with them `round`
        // is inlined rather than a libm call.
        return unsafe { quantize_rows_avx2(x, m, k) };
    }
    quantize_rows_plain(x, m, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_rows_avx2(x: &[f32], m: usize, k: usize) -> Q8Rows {
    quantize_rows_plain(x, m, k)
}

#[inline(always)]
fn quantize_rows_plain(x: &[f32], m: usize, k: usize) -> Q8Rows {
    let kb = k / BLOCK;
    let mut qs = vec![0i8; m * k];
    let mut d = vec![0f32; m * kb];
    let mut sums = vec![0f32; m * kb];
    let mut halves = vec![0i32; m * kb * 2];
    for (b, ((src, dst), scale)) in x
        .chunks_exact(BLOCK)
        .zip(qs.chunks_exact_mut(BLOCK))
        .zip(d.iter_mut())
        .enumerate()
    {
        let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
        let s = amax / 127.0;
        let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
        *scale = f16_to_f32(f32_to_f16(s));
        let mut sum = 0i32;
        for (t, (q, v)) in dst.iter_mut().zip(src).enumerate() {
            *q = (v * inv).round() as i8;
            sum += *q as i32;
            if t == BLOCK / 2 - 1 {
                halves[2 * b] = sum;
            }
        }
        halves[2 * b + 1] = sum - halves[2 * b];
        sums[b] = *scale * sum as f32;
    }
    Q8Rows {
        k,
        qs,
        d,
        s: sums,
        h: halves,
    }
}
