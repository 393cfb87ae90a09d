//! The engine's own CPU matrix product for Q8_0 weights (and formats
//! widened to Q8_0 at load), used instead of candle's for every layer
//! matrix and the output head.
//!
//! Why not candle's: its product walks one activation row at a time, for
//! each row converting every block's f16 scales again; this one takes a
//! tile of weight rows against a tile of activation rows, loading each
//! weight block once per tile, with the scales converted once at load. A
//! batch of sequences therefore costs little more weight traffic than one.
//!
//! Batch invariance: each output element is computed by the same
//! instruction sequence whatever the tile, the number of rows or the
//! thread split (eight i32 lanes per block, each lane exact; one fused
//! multiply-add per block into eight f32 lanes; one fixed horizontal sum),
//! so a row's result does not depend on the other rows in the call.
//!
//! Limits: x86-64 with AVX2 and FMA (AVX-512 VNNI when present, with
//! identical results); elsewhere, and on GPUs, candle's product is used.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use std::sync::Arc;

/// Weights per quantisation block.
const BLOCK: usize = 32;
/// Weight rows per tile.
const TILE_ROWS: usize = 4;
/// Activation rows per tile.
const TILE_COLS: usize = 4;

/// A layer matrix: the engine's kernel where it applies, else candle's.
pub enum Linear {
    Q8(Arc<Q8Matrix>),
    Candle(QMatMul),
}

impl Linear {
    /// Takes a Q8_0 matrix on the CPU for the engine's kernel when this CPU
    /// has it; anything else stays with candle.
    pub fn new(t: QTensor) -> Result<Linear> {
        if t.dtype() == GgmlDType::Q8_0 && t.device().is_cpu() && Q8Matrix::supported() {
            let (n, k) = t.shape().dims2()?;
            Ok(Linear::Q8(Arc::new(Q8Matrix::from_blocks(
                n,
                k,
                &t.data()?,
            )?)))
        } else {
            QMatMul::from_qtensor(t).map(Linear::Candle)
        }
    }

    /// `x · Wᵀ` for several matrices that read the same input (q, k, v;
    /// gate and up): on the engine's kernel the input is quantised once.
    pub fn forward_each(each: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let ours: Option<Vec<&Q8Matrix>> = each
            .iter()
            .map(|l| match l {
                Linear::Q8(m) => Some(m.as_ref()),
                Linear::Candle(_) => None,
            })
            .collect();
        let Some(ours) = ours.filter(|o| o.iter().all(|m| m.k == o[0].k)) else {
            return each.iter().map(|l| l.forward(x)).collect();
        };
        let Some(k) = ours.first().map(|m| m.k) else {
            return Ok(Vec::new());
        };
        let dims = x.dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("activations {dims:?} do not end in {k}");
        }
        let data = x.flatten_all()?.to_vec1::<f32>()?;
        let m = data.len() / k;
        let a = quantize_rows(&data, m, k);
        ours.iter()
            .map(|w| {
                let mut shape = dims.clone();
                *shape.last_mut().expect("checked above") = w.n;
                Tensor::from_vec(w.matmul_quantized(&a, m), shape, x.device())
            })
            .collect()
    }

    /// `x · Wᵀ` for `x` of shape `[.., k]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Q8(m) => x.contiguous()?.apply_op1_no_bwd(m.as_ref()),
            Linear::Candle(m) => m.forward(x),
        }
    }
}

/// The token embedding table; with a tied output head, the same bytes
/// serve as the output projection.
pub enum Embedding {
    Q8(Arc<Q8Matrix>),
    Candle(Arc<QTensor>),
}

impl Embedding {
    pub fn new(t: QTensor) -> Result<Embedding> {
        Ok(match Linear::new(t)? {
            Linear::Q8(m) => Embedding::Q8(m),
            Linear::Candle(QMatMul::QTensor(t)) => Embedding::Candle(t),
            Linear::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                Embedding::Candle(Arc::new(QTensor::quantize(&t, GgmlDType::F32)?))
            }
        })
    }

    /// Rows of the table for `ids`, `[ids, width]` f32.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Embedding::Q8(m) => {
                let ids = ids.to_vec1::<u32>()?;
                let mut out = Vec::with_capacity(ids.len() * m.k);
                for &id in &ids {
                    let row = id as usize;
                    if row >= m.n {
                        candle_core::bail!("token id {id} is outside the table of {}", m.n);
                    }
                    let kb = m.k / BLOCK;
                    for (q, d) in m.qs[row * m.k..(row + 1) * m.k]
                        .chunks_exact(BLOCK)
                        .zip(&m.d[row * kb..(row + 1) * kb])
                    {
                        out.extend(q.iter().map(|&v| v as f32 * d));
                    }
                }
                Tensor::from_vec(out, (ids.len(), m.k), &candle_core::Device::Cpu)
            }
            Embedding::Candle(t) => t.embedding(ids),
        }
    }

    /// The table as the output projection (tied weights).
    pub fn as_output(&self) -> Result<Linear> {
        match self {
            Embedding::Q8(m) => Ok(Linear::Q8(m.clone())),
            Embedding::Candle(t) => QMatMul::from_arc(t.clone()).map(Linear::Candle),
        }
    }
}

/// A Q8_0 matrix of `n` rows by `k` columns: the quantised weights row by
/// row, and each block's scale as f32.
pub struct Q8Matrix {
    n: usize,
    k: usize,
    qs: Aligned,
    d: Vec<f32>,
}

/// Bytes on 64-byte boundaries, so that a row whose length is a multiple of
/// 64 never has a two-block load straddle cache lines.
struct Aligned {
    lines: Vec<Line>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(align(64))]
struct Line(#[allow(dead_code, reason = "read through `as_slice`")] [i8; 64]);

impl Aligned {
    fn new(bytes: impl ExactSizeIterator<Item = i8>) -> Aligned {
        let len = bytes.len();
        let mut lines = vec![Line([0; 64]); len.div_ceil(64)];
        // SAFETY: `lines` holds at least `len` bytes, contiguous.
        let flat = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut i8, len) };
        for (d, s) in flat.iter_mut().zip(bytes) {
            *d = s;
        }
        Aligned { lines, len }
    }

    fn as_slice(&self) -> &[i8] {
        // SAFETY: `lines` holds at least `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const i8, self.len) }
    }
}

impl std::ops::Index<std::ops::Range<usize>> for Aligned {
    type Output = [i8];
    fn index(&self, r: std::ops::Range<usize>) -> &[i8] {
        &self.as_slice()[r]
    }
}

/// Activations quantised like the weights, row by row.
struct Q8Rows {
    qs: Vec<i8>,
    d: Vec<f32>,
}

impl Q8Matrix {
    pub fn supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// From GGML Q8_0 blocks (2-byte f16 scale, 32 signed bytes).
    pub fn from_blocks(n: usize, k: usize, bytes: &[u8]) -> Result<Q8Matrix> {
        if !k.is_multiple_of(BLOCK) || bytes.len() != n * k / BLOCK * 34 {
            candle_core::bail!("Q8_0 matrix of {n}×{k} cannot be {} bytes", bytes.len());
        }
        let d = bytes
            .chunks_exact(34)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        let qs = Aligned::new(
            bytes
                .chunks_exact(34)
                .flat_map(|b| b[2..].iter().map(|&q| q as i8))
                .collect::<Vec<_>>()
                .into_iter(),
        );
        Ok(Q8Matrix { n, k, qs, d })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lines_bytes() + self.d.len() * 4
    }

    fn lines_bytes(&self) -> usize {
        self.qs.lines.len() * 64
    }

    /// `out[i][j] = Σ x[i] · w[j]` for `m` rows of `x`, row-major `[m, n]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_quantized(&quantize_rows(x, m, self.k), m)
    }

    fn matmul_quantized(&self, a: &Q8Rows, m: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * self.n];
        let groups = self.n.div_ceil(TILE_ROWS);
        let out_ptr = SendPtr(out.as_mut_ptr());
        // candle's pool, which runs candle's own operations too: one set of
        // compute threads, the caller among them.
        candle_core::utils::barrier_pool().execute_chunked(groups, |range| {
            let first = range.start * TILE_ROWS;
            let last = (range.end * TILE_ROWS).min(self.n);
            let out_ptr = &out_ptr;
            // SAFETY: ranges write disjoint weight rows (output columns).
            unsafe { self.rows_into(a, m, first, last, out_ptr.0) };
        });
        out
    }

    /// Output columns `first..last` for all `m` activation rows.
    ///
    /// # Safety
    /// `out` points at an `m × n` buffer of which no other thread writes
    /// columns `first..last`.
    unsafe fn rows_into(&self, a: &Q8Rows, m: usize, first: usize, last: usize, out: *mut f32) {
        let mut r = first;
        while r < last {
            let rows = (last - r).min(TILE_ROWS);
            let mut c = 0;
            while c < m {
                let cols = (m - c).min(TILE_COLS);
                unsafe {
                    match (rows, cols) {
                        (4, 4) => self.tile::<4, 4>(a, r, c, out),
                        (4, 3) => self.tile::<4, 3>(a, r, c, out),
                        (4, 2) => self.tile::<4, 2>(a, r, c, out),
                        (4, 1) => self.tile::<4, 1>(a, r, c, out),
                        (3, 4) => self.tile::<3, 4>(a, r, c, out),
                        (3, 3) => self.tile::<3, 3>(a, r, c, out),
                        (3, 2) => self.tile::<3, 2>(a, r, c, out),
                        (3, 1) => self.tile::<3, 1>(a, r, c, out),
                        (2, 4) => self.tile::<2, 4>(a, r, c, out),
                        (2, 3) => self.tile::<2, 3>(a, r, c, out),
                        (2, 2) => self.tile::<2, 2>(a, r, c, out),
                        (2, 1) => self.tile::<2, 1>(a, r, c, out),
                        (1, 4) => self.tile::<1, 4>(a, r, c, out),
                        (1, 3) => self.tile::<1, 3>(a, r, c, out),
                        (1, 2) => self.tile::<1, 2>(a, r, c, out),
                        _ => self.tile::<1, 1>(a, r, c, out),
                    }
                }
                c += cols;
            }
            r += rows;
        }
    }

    #[inline(always)]
    unsafe fn tile<const R: usize, const C: usize>(
        &self,
        a: &Q8Rows,
        r: usize,
        c: usize,
        out: *mut f32,
    ) {
        let kb = self.k / BLOCK;
        let w_qs: [&[i8]; R] =
            std::array::from_fn(|i| &self.qs[(r + i) * self.k..(r + i + 1) * self.k]);
        let w_d: [&[f32]; R] = std::array::from_fn(|i| &self.d[(r + i) * kb..][..kb]);
        let a_qs: [&[i8]; C] = std::array::from_fn(|j| &a.qs[(c + j) * self.k..][..self.k]);
        let a_d: [&[f32]; C] = std::array::from_fn(|j| &a.d[(c + j) * kb..][..kb]);
        let sums: [[f32; R]; C] = unsafe { dot_tile::<R, C>(kb, &w_qs, &w_d, &a_qs, &a_d) };
        for (j, row) in sums.iter().enumerate() {
            for (i, &v) in row.iter().enumerate() {
                // SAFETY: (c + j, r + i) is inside the caller's buffer and
                // columns, and written once.
                unsafe { *out.add((c + j) * self.n + r + i) = v };
            }
        }
    }
}

struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint parts of one buffer to rayon tasks.
unsafe impl Sync for SendPtr {}

impl CustomOp1 for Q8Matrix {
    fn name(&self) -> &'static str {
        "ganglion-q8-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("the Q8_0 product takes f32 activations");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the Q8_0 product takes contiguous activations");
        };
        let dims = layout.shape().dims();
        if dims.last() != Some(&self.k) {
            candle_core::bail!("activations {dims:?} do not end in {}", self.k);
        }
        let m = layout.shape().elem_count() / self.k;
        let out = self.matmul(&data[start..end], m);
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = self.n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// Q8_0 quantisation of activation rows, as GGML does it: per block,
/// scale = max |x| / 127 rounded to f16, values rounded half away from
/// zero.
fn quantize_rows(x: &[f32], m: usize, k: usize) -> Q8Rows {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the kernel runs only where AVX2 and FMA are present;
        // with them `round` is inlined rather than a libm call.
        if Q8Matrix::supported() {
            return unsafe { quantize_rows_avx2(x, m, k) };
        }
    }
    quantize_rows_plain(x, m, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_rows_avx2(x: &[f32], m: usize, k: usize) -> Q8Rows {
    quantize_rows_plain(x, m, k)
}

#[inline(always)]
fn quantize_rows_plain(x: &[f32], m: usize, k: usize) -> Q8Rows {
    let mut qs = vec![0i8; m * k];
    let mut d = vec![0f32; m * k / BLOCK];
    for ((src, dst), scale) in x
        .chunks_exact(BLOCK)
        .zip(qs.chunks_exact_mut(BLOCK))
        .zip(d.iter_mut())
    {
        let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
        let s = amax / 127.0;
        let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
        *scale = half::f16::from_f32(s).to_f32();
        for (q, v) in dst.iter_mut().zip(src) {
            *q = (v * inv).round() as i8;
        }
    }
    Q8Rows { qs, d }
}

/// The dot products of `R` weight rows with `C` activation rows.
///
/// # Safety
/// The CPU has AVX2 and FMA ([`Q8Matrix::supported`]); slices hold `kb`
/// blocks.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_tile<const R: usize, const C: usize>(
    kb: usize,
    w_qs: &[&[i8]; R],
    w_d: &[&[f32]; R],
    a_qs: &[&[i8]; C],
    a_d: &[&[f32]; C],
) -> [[f32; R]; C] {
    match path() {
        Path::Avx512 => unsafe { x86::dot_tile_avx512::<R, C>(kb, w_qs, w_d, a_qs, a_d) },
        Path::Vnni256 => unsafe { x86::dot_tile_vnni::<R, C>(kb, w_qs, w_d, a_qs, a_d) },
        Path::Avx2 => unsafe { x86::dot_tile_avx2::<R, C>(kb, w_qs, w_d, a_qs, a_d) },
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_tile<const R: usize, const C: usize>(
    _: usize,
    _: &[&[i8]; R],
    _: &[&[f32]; R],
    _: &[&[i8]; C],
    _: &[&[f32]; C],
) -> [[f32; R]; C] {
    unreachable!("Q8Matrix::supported is false off x86-64")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Avx2,
    Vnni256,
    Avx512,
}

/// Set by the side-by-side speed test only.
#[cfg(test)]
static FORCED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

#[cfg(target_arch = "x86_64")]
fn path() -> Path {
    use std::sync::OnceLock;
    static PATH: OnceLock<Path> = OnceLock::new();
    #[cfg(test)]
    match FORCED.load(std::sync::atomic::Ordering::Relaxed) {
        1 => return Path::Avx2,
        2 => return Path::Vnni256,
        3 => return Path::Avx512,
        _ => {}
    }
    *PATH.get_or_init(|| {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
        {
            Path::Avx512
        } else if is_x86_feature_detected!("avxvnni") {
            Path::Vnni256
        } else {
            Path::Avx2
        }
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn path() -> Path {
    Path::Avx2
}

#[cfg(test)]
fn avx512() -> bool {
    path() == Path::Avx512
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Eight f32 lanes summed as candle and GGML do: high half onto low,
    /// then pairs, then the last two.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    macro_rules! dot_tile {
        ($name:ident, $features:literal, $dot:ident) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const R: usize, const C: usize>(
                kb: usize,
                w_qs: &[&[i8]; R],
                w_d: &[&[f32]; R],
                a_qs: &[&[i8]; C],
                a_d: &[&[f32]; C],
            ) -> [[f32; R]; C] {
                let mut acc = [[_mm256_setzero_ps(); R]; C];
                for b in 0..kb {
                    let a: [__m256i; C] = std::array::from_fn(|j| unsafe {
                        _mm256_loadu_si256(a_qs[j].as_ptr().add(b * 32) as *const __m256i)
                    });
                    for i in 0..R {
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

    /// Sums of four byte products per i32 lane, with AVX2: the pair sums
    /// stay within i16 because |w| ≤ 127 and |a| ≤ 127.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dot_avx2(aw: __m256i, sa: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sa), _mm256_set1_epi16(1))
    }

    /// The same sums in one AVX-VNNI instruction (CPUs with VNNI but no
    /// AVX-512).
    #[inline]
    #[target_feature(enable = "avx2,fma,avxvnni")]
    fn dot_vnni(aw: __m256i, sa: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), aw, sa)
    }

    dot_tile!(dot_tile_avx2, "avx2,fma", dot_avx2);
    dot_tile!(dot_tile_vnni, "avx2,fma,avxvnni", dot_vnni);

    /// Two blocks per instruction: lanes 0–7 take the even blocks, lanes
    /// 8–15 the odd ones (an odd last block with zeros above it); the two
    /// halves are added at the end, then summed as in [`hsum`].
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dot_tile_avx512<const R: usize, const C: usize>(
        kb: usize,
        w_qs: &[&[i8]; R],
        w_d: &[&[f32]; R],
        a_qs: &[&[i8]; C],
        a_d: &[&[f32]; C],
    ) -> [[f32; R]; C] {
        let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let w_q: [*const i8; R] = std::array::from_fn(|i| w_qs[i].as_ptr());
        let a_q: [*const i8; C] = std::array::from_fn(|j| a_qs[j].as_ptr());
        let w_s: [*const f32; R] = std::array::from_fn(|i| w_d[i].as_ptr());
        let a_s: [*const f32; C] = std::array::from_fn(|j| a_d[j].as_ptr());
        let zero = _mm512_setzero_si512();
        let mut acc = [[_mm512_setzero_ps(); R]; C];
        // One step: blocks b and b + 1 (`mask` all ones), or the odd last
        // block alone (low 32 bytes; its scale's high half is 0).
        macro_rules! step {
            ($b:expr, $load:expr, $scales:expr) => {{
                let b = $b;
                let a: [__m512i; C] = std::array::from_fn(|j| unsafe { $load(a_q[j].add(b * 32)) });
                let neg: [__m512i; C] = std::array::from_fn(|j| _mm512_sub_epi8(zero, a[j]));
                let ad: [__m512; C] = std::array::from_fn(|j| unsafe { $scales(a_s[j].add(b)) });
                for i in 0..R {
                    let w = unsafe { $load(w_q[i].add(b * 32)) };
                    let aw = _mm512_abs_epi8(w);
                    let negative = _mm512_movepi8_mask(w);
                    let wd = unsafe { $scales(w_s[i].add(b)) };
                    for j in 0..C {
                        let sa = _mm512_mask_blend_epi8(negative, a[j], neg[j]);
                        let dot = _mm512_dpbusd_epi32(zero, aw, sa);
                        let q = _mm512_cvtepi32_ps(dot);
                        acc[j][i] = _mm512_fmadd_ps(_mm512_mul_ps(wd, ad[j]), q, acc[j][i]);
                    }
                }
            }};
        }
        let both = |p: *const i8| unsafe { _mm512_loadu_si512(p as *const __m512i) };
        let pair = |p: *const f32| unsafe {
            _mm512_permutexvar_ps(
                halves,
                _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(p as *const f64))),
            )
        };
        let mut b = 0;
        while b + 1 < kb {
            step!(b, both, pair);
            b += 2;
        }
        if b < kb {
            let low = |p: *const i8| unsafe { _mm512_maskz_loadu_epi8(0xFFFF_FFFF, p) };
            let single = |p: *const f32| unsafe {
                _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_load_ss(p)))
            };
            step!(b, low, single);
        }
        let mut out = [[0f32; R]; C];
        for j in 0..C {
            for i in 0..R {
                let lo = _mm512_castps512_ps256(acc[j][i]);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc[j][i])));
                out[j][i] = hsum(_mm256_add_ps(lo, hi));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's arithmetic written out lane by lane in scalar code.
    fn reference(w: &Q8Matrix, a: &Q8Rows, i: usize, j: usize, wide: bool) -> f32 {
        let k = w.k;
        // The AVX-512 path keeps odd blocks in eight lanes of their own.
        let mut lanes = [[0f32; 8]; 2];
        for b in 0..k / BLOCK {
            let d = w.d[j * k / BLOCK + b] * a.d[i * k / BLOCK + b];
            let half = &mut lanes[if wide { b % 2 } else { 0 }];
            for (l, lane) in half.iter_mut().enumerate() {
                let s: i32 = (0..4)
                    .map(|e| {
                        let at = b * BLOCK + l * 4 + e;
                        w.qs.as_slice()[j * k + at] as i32 * a.qs[i * k + at] as i32
                    })
                    .sum();
                *lane = d.mul_add(s as f32, *lane);
            }
        }
        let lanes: [f32; 8] = if wide {
            std::array::from_fn(|l| lanes[0][l] + lanes[1][l])
        } else {
            lanes[0]
        };
        let r: [f32; 4] = std::array::from_fn(|x| lanes[x + 4] + lanes[x]);
        let (r0, r1) = (r[0] + r[2], r[1] + r[3]);
        r0 + r1
    }

    fn matrix(n: usize, k: usize, seed: u32) -> (Q8Matrix, Vec<f32>) {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        };
        let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
        let x: Vec<f32> = (0..7 * k).map(|_| next() * 3.0).collect();
        let t = candle_core::Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        (Q8Matrix::from_blocks(n, k, &q.data().unwrap()).unwrap(), x)
    }

    #[test]
    fn each_element_is_the_same_whatever_the_tile_and_rows() {
        if !Q8Matrix::supported() {
            return;
        }
        // 3 blocks: the AVX-512 path's odd last block is covered.
        for k in [96, 128] {
            let (w, x) = matrix(11, k, 3);
            let all = w.matmul(&x, 7);
            let a = quantize_rows(&x, 7, k);
            for i in 0..7 {
                let alone = w.matmul(&x[i * k..(i + 1) * k], 1);
                assert_eq!(alone, all[i * 11..(i + 1) * 11], "row {i}");
                for j in 0..11 {
                    assert_eq!(
                        all[i * 11 + j],
                        reference(&w, &a, i, j, avx512()),
                        "({i}, {j})"
                    );
                }
            }
        }
    }

    /// Every path this CPU has, called directly, against the scalar model.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn each_path_this_cpu_has_matches_its_scalar_model() {
        if !Q8Matrix::supported() {
            return;
        }
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni");
        let vnni = is_x86_feature_detected!("avxvnni");
        for k in [96, 128] {
            let (w, x) = matrix(4, k, 5);
            let a = quantize_rows(&x, 2, k);
            let kb = k / BLOCK;
            let w_qs: [&[i8]; 4] = std::array::from_fn(|i| &w.qs[i * k..(i + 1) * k]);
            let w_d: [&[f32]; 4] = std::array::from_fn(|i| &w.d[i * kb..(i + 1) * kb]);
            let a_qs: [&[i8]; 2] = std::array::from_fn(|j| &a.qs[j * k..(j + 1) * k]);
            let a_d: [&[f32]; 2] = std::array::from_fn(|j| &a.d[j * kb..(j + 1) * kb]);
            let mut paths: Vec<([[f32; 4]; 2], bool, &str)> = Vec::new();
            // SAFETY: each path runs only where the CPU has its features.
            unsafe {
                paths.push((
                    x86::dot_tile_avx2(kb, &w_qs, &w_d, &a_qs, &a_d),
                    false,
                    "avx2",
                ));
                if vnni {
                    paths.push((
                        x86::dot_tile_vnni(kb, &w_qs, &w_d, &a_qs, &a_d),
                        false,
                        "vnni",
                    ));
                }
                if avx512 {
                    paths.push((
                        x86::dot_tile_avx512(kb, &w_qs, &w_d, &a_qs, &a_d),
                        true,
                        "avx512",
                    ));
                }
            }
            for (out, wide, name) in paths {
                for (j, row) in out.iter().enumerate() {
                    for (i, &v) in row.iter().enumerate() {
                        assert_eq!(v, reference(&w, &a, j, i, wide), "{name} k {k} ({j}, {i})");
                    }
                }
            }
        }
    }

    #[test]
    fn the_product_is_close_to_candles() {
        if !Q8Matrix::supported() {
            return;
        }
        let (n, k) = (37, 256);
        let mut state = 9u32;
        let mut next = || {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
        let x: Vec<f32> = (0..5 * k).map(|_| next()).collect();
        let dev = candle_core::Device::Cpu;
        let wt = Tensor::from_vec(w, (n, k), &dev).unwrap();
        let xt = Tensor::from_vec(x, (5, k), &dev).unwrap();
        let ours = Linear::new(QTensor::quantize(&wt, GgmlDType::Q8_0).unwrap()).unwrap();
        assert!(matches!(ours, Linear::Q8(_)));
        let theirs =
            QMatMul::from_qtensor(QTensor::quantize(&wt, GgmlDType::Q8_0).unwrap()).unwrap();
        let exact = xt.matmul(&wt.t().unwrap()).unwrap();
        let a = ours.forward(&xt).unwrap();
        let b = theirs.forward(&xt).unwrap();
        let err = |t: &Tensor| {
            (t - &exact)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(a.dims(), [5, n]);
        assert!(err(&a) < 0.05, "ours {}", err(&a));
        assert!(
            (err(&a) - err(&b)).abs() < 0.01,
            "ours {} candle {}",
            err(&a),
            err(&b)
        );
    }
    /// The three paths side by side, in GMAC/s. It switches the
    /// process-wide path, so it runs alone: `cargo test --release -p
    /// ganglion-llm --lib kernel_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn kernel_speed() {
        for (n, k) in [(1536usize, 576usize), (576, 1536), (49152, 576)] {
            let (w, _) = matrix(n, k, 1);
            for m in [1usize, 8, 64] {
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
                let reps = 100_000_000 / (n * k * m).max(1) + 1;
                let mut best = [0f64; 3];
                for _ in 0..5 {
                    for p in 1..=3u8 {
                        FORCED.store(p, std::sync::atomic::Ordering::Relaxed);
                        let t = std::time::Instant::now();
                        for _ in 0..reps {
                            std::hint::black_box(w.matmul(&x, m));
                        }
                        let g = (n * k * m * reps) as f64 / t.elapsed().as_secs_f64() / 1e9;
                        best[p as usize - 1] = best[p as usize - 1].max(g);
                    }
                }
                FORCED.store(0, std::sync::atomic::Ordering::Relaxed);
                eprintln!(
                    "n {n} k {k} m {m}: GMAC/s avx2 {:.1} vnni256 {:.1} avx512 {:.1}",
                    best[0], best[1], best[2]
                );
            }
        }
    }
}
