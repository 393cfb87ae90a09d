//! The engine's own CPU matrix product for Q8_0, Q4_0 and Q4_1 weights
//! (and Q5_0/Q5_1, widened to Q8_0 at load), used instead of candle's for
//! every layer matrix and the output head.
//!
//! Why not candle's: its product walks one activation row at a time, for
//! each row converting every block's f16 scales again, and has no SIMD path
//! for Q4_1; this one takes a tile of weight rows against a tile of
//! activation rows, loading each weight block once per tile, with the
//! scales converted once at load. A batch of sequences therefore costs
//! little more weight traffic than one.
//!
//! Q4 weights stay 4-bit: a decode step reads 24 bytes per 32 weights
//! (16 of values, f32 scale and offset) where the widened Q8_0 read 36.
//! The activations are quantised to 8 bits once per call, with each block's
//! sum kept for the Q4 offset term.
//!
//! Batch invariance: each output element is computed by the same
//! instruction sequence whatever the tile, the number of rows or the
//! thread split (eight i32 lanes per block, each lane exact; one fused
//! multiply-add per block into eight f32 lanes; one fixed horizontal sum),
//! so a row's result does not depend on the other rows in the call.
//!
//! Limits: x86-64 with AVX2 and FMA (AVX-512 VNNI or AVX-VNNI when
//! present; each path deterministic, results differ between paths in the
//! last bits); elsewhere, and on GPUs, candle's product is used.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use std::sync::Arc;

/// Weights per quantisation block.
const BLOCK: usize = 32;
/// Weight rows per tile.
const TILE_ROWS: usize = 4;
/// Activation rows per tile.
const TILE_COLS: usize = 4;
/// Block sums and Q4 offsets are padded to this many blocks, the lanes of
/// the offset term's vectors.
const SUM_LANES: usize = 8;

/// A layer matrix: the engine's kernel where it applies, else candle's.
pub enum Linear {
    Own(Arc<Matrix>),
    Candle(QMatMul),
}

impl Linear {
    /// Takes a Q8_0, Q4_0 or Q4_1 matrix on the CPU for the engine's kernel
    /// when this CPU has it; anything else stays with candle.
    pub fn new(t: QTensor) -> Result<Linear> {
        if Matrix::takes(&t) {
            let (n, k) = t.shape().dims2()?;
            Ok(Linear::Own(Arc::new(Matrix::from_blocks(
                t.dtype(),
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
        let ours: Option<Vec<&Matrix>> = each
            .iter()
            .map(|l| match l {
                Linear::Own(m) => Some(m.as_ref()),
                Linear::Candle(_) => None,
            })
            .collect();
        let Some(ours) = ours.filter(|o| o.iter().all(|m| m.k() == o[0].k())) else {
            return each.iter().map(|l| l.forward(x)).collect();
        };
        let Some(k) = ours.first().map(|m| m.k()) else {
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
                *shape.last_mut().expect("checked above") = w.n();
                Tensor::from_vec(w.matmul_quantized(&a, m), shape, x.device())
            })
            .collect()
    }

    /// Bytes of weights held, which a forward pass reads.
    pub fn bytes(&self) -> usize {
        match self {
            Linear::Own(m) => m.bytes(),
            Linear::Candle(QMatMul::QTensor(t)) => t.storage_size_in_bytes(),
            Linear::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }

    /// `x · Wᵀ` for `x` of shape `[.., k]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Own(m) => x.contiguous()?.apply_op1_no_bwd(m.as_ref()),
            Linear::Candle(m) => m.forward(x),
        }
    }
}

/// The token embedding table, kept quantised (rows are dequantised on
/// lookup); with a tied output head, the same bytes serve as the output
/// projection.
pub enum Embedding {
    Own(Arc<Matrix>),
    Candle(Arc<QTensor>),
}

impl Embedding {
    pub fn new(t: QTensor) -> Result<Embedding> {
        Ok(match Linear::new(t)? {
            Linear::Own(m) => Embedding::Own(m),
            Linear::Candle(QMatMul::QTensor(t)) => Embedding::Candle(t),
            Linear::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                Embedding::Candle(Arc::new(QTensor::quantize(&t, GgmlDType::F32)?))
            }
        })
    }

    /// Rows of the table for `ids`, `[ids, width]` f32.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Embedding::Own(m) => {
                let ids = ids.to_vec1::<u32>()?;
                let mut out = Vec::with_capacity(ids.len() * m.k());
                for &id in &ids {
                    if id as usize >= m.n() {
                        candle_core::bail!("token id {id} is outside the table of {}", m.n());
                    }
                    m.push_row(id as usize, &mut out);
                }
                Tensor::from_vec(out, (ids.len(), m.k()), &candle_core::Device::Cpu)
            }
            Embedding::Candle(t) => t.embedding(ids),
        }
    }

    /// The table as the output projection (tied weights).
    pub fn as_output(&self) -> Result<Linear> {
        match self {
            Embedding::Own(m) => Ok(Linear::Own(m.clone())),
            Embedding::Candle(t) => QMatMul::from_arc(t.clone()).map(Linear::Candle),
        }
    }
}

/// A weight matrix in one of the kernel's layouts.
pub enum Matrix {
    Q8(Q8Matrix),
    Nibbles(NibbleMatrix),
}

impl Matrix {
    /// Whether the engine's kernel takes this tensor on this CPU.
    pub fn takes(t: &QTensor) -> bool {
        matches!(
            t.dtype(),
            GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
        ) && t.device().is_cpu()
            && supported()
            && t.shape().dims().len() == 2
            && t.shape().dims()[1].is_multiple_of(BLOCK)
    }

    /// From GGML blocks of `dtype` (Q8_0, Q4_0 or Q4_1), `n` rows of `k`.
    pub fn from_blocks(dtype: GgmlDType, n: usize, k: usize, bytes: &[u8]) -> Result<Matrix> {
        match dtype {
            GgmlDType::Q8_0 => Q8Matrix::from_blocks(n, k, bytes).map(Matrix::Q8),
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
                NibbleMatrix::from_blocks(dtype, n, k, bytes).map(Matrix::Nibbles)
            }
            other => candle_core::bail!("the engine's kernel does not take {other:?}"),
        }
    }

    pub fn n(&self) -> usize {
        match self {
            Matrix::Q8(m) => m.n,
            Matrix::Nibbles(m) => m.n,
        }
    }

    pub fn k(&self) -> usize {
        match self {
            Matrix::Q8(m) => m.k,
            Matrix::Nibbles(m) => m.k,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Matrix::Q8(m) => m.qs.bytes() + m.d.len() * 4,
            Matrix::Nibbles(m) => m.qs.bytes() + (m.qh.len() + m.d.len() + m.m.len()) * 4,
        }
    }

    /// `out[i][j] = Σ x[i] · w[j]` for `m` rows of `x`, row-major `[m, n]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_quantized(&quantize_rows(x, m, self.k()), m)
    }

    fn matmul_quantized(&self, a: &Q8Rows, m: usize) -> Vec<f32> {
        match self {
            Matrix::Q8(w) => matmul_tiled(w, a, m),
            Matrix::Nibbles(w) => matmul_tiled(w, a, m),
        }
    }

    /// Appends row `row`, dequantised.
    fn push_row(&self, row: usize, out: &mut Vec<f32>) {
        match self {
            Matrix::Q8(w) => {
                let kb = w.k / BLOCK;
                for (q, d) in w.qs[row * w.k..(row + 1) * w.k]
                    .chunks_exact(BLOCK)
                    .zip(&w.d[row * kb..(row + 1) * kb])
                {
                    out.extend(q.iter().map(|&v| v as f32 * d));
                }
            }
            Matrix::Nibbles(w) => {
                let kb = w.k / BLOCK;
                for b in 0..kb {
                    let at = row * w.kb_padded() + b;
                    let (table, factor) = w.offsets();
                    let (d, m) = (w.d[at], factor * table[at]);
                    out.extend((0..BLOCK).map(|t| d.mul_add(w.value(row, b, t) as f32, m)));
                }
            }
        }
    }
}

impl CustomOp1 for Matrix {
    fn name(&self) -> &'static str {
        "ganglion-quantized-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("the quantized product takes f32 activations");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the quantized product takes contiguous activations");
        };
        let dims = layout.shape().dims();
        if dims.last() != Some(&self.k()) {
            candle_core::bail!("activations {dims:?} do not end in {}", self.k());
        }
        let m = layout.shape().elem_count() / self.k();
        let out = self.matmul(&data[start..end], m);
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = self.n();
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// Whether this CPU has the kernel (AVX2 and FMA).
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

/// A Q8_0 matrix of `n` rows by `k` columns: the quantised weights row by
/// row, and each block's scale as f32.
pub struct Q8Matrix {
    n: usize,
    k: usize,
    qs: Aligned,
    d: Vec<f32>,
}

/// A Q4_0, Q4_1, Q5_0 or Q5_1 matrix of `n` rows by `k` columns: weight =
/// d·q + m with q in 0..16 (Q4) or 0..32 (Q5); Q4_0 and Q5_0 are the cases
/// m = −8·d and m = −16·d.
///
/// Layout: each row is pairs of blocks in 32 bytes, byte t holding the low
/// four bits of element t of the even block in its low nibble and of the
/// odd block in its high one, so one 32-byte load and a mask or a shift
/// give a whole block in element order (an odd last block pairs with
/// zeros). For Q5, `qh` holds each block's fifth bits, bit t for element t
/// (`n × kb`); for Q4 it is empty. `d` and (Q4_1, Q5_1) `m` are `n × kb`
/// padded with zeros to a multiple of [`SUM_LANES`]. Q4_0 and Q5_0 keep no
/// `m`: their offset is −`centre`·d, so the kernel sums d·s and scales the
/// sum by −`centre` (exact, a power of two), reading 20 and 24 bytes per
/// 32 weights instead of 24 and 28.
pub struct NibbleMatrix {
    n: usize,
    k: usize,
    qs: Aligned,
    qh: Vec<u32>,
    d: Vec<f32>,
    m: Vec<f32>,
    centre: f32,
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

    fn bytes(&self) -> usize {
        self.lines.len() * 64
    }
}

impl std::ops::Index<std::ops::Range<usize>> for Aligned {
    type Output = [i8];
    fn index(&self, r: std::ops::Range<usize>) -> &[i8] {
        &self.as_slice()[r]
    }
}

/// Activations quantised like Q8_0 weights, row by row, with each block's
/// sum (scale × Σ values, exact before the one rounding) for the Q4 offset
/// term; `s` is padded per row to a multiple of [`SUM_LANES`].
struct Q8Rows {
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Q8Matrix {
    /// From GGML Q8_0 blocks (2-byte f16 scale, 32 signed bytes).
    fn from_blocks(n: usize, k: usize, bytes: &[u8]) -> Result<Q8Matrix> {
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
}

impl NibbleMatrix {
    /// From GGML blocks, each an f16 scale, then (Q4_1, Q5_1) an f16
    /// offset, then (Q5) 4 bytes of fifth bits, then 16 bytes of nibbles:
    /// byte j holds element j in its low nibble and element j + 16 in its
    /// high one.
    fn from_blocks(dtype: GgmlDType, n: usize, k: usize, bytes: &[u8]) -> Result<NibbleMatrix> {
        // (block bytes, offset at, fifth bits at, centre when no offset)
        let (size, offset_at, high_at, centre) = match dtype {
            GgmlDType::Q4_0 => (18, None, None, 8.0),
            GgmlDType::Q4_1 => (20, Some(2), None, 0.0),
            GgmlDType::Q5_0 => (22, None, Some(2), 16.0),
            GgmlDType::Q5_1 => (24, Some(2), Some(4), 0.0),
            other => candle_core::bail!("{other:?} is not a 4- or 5-bit format"),
        };
        if !k.is_multiple_of(BLOCK) || bytes.len() != n * k / BLOCK * size {
            candle_core::bail!(
                "{dtype:?} matrix of {n}×{k} cannot be {} bytes",
                bytes.len()
            );
        }
        let kb = k / BLOCK;
        let padded = kb.next_multiple_of(SUM_LANES);
        let f16 = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        let blocks: Vec<&[u8]> = bytes.chunks_exact(size).collect();
        let mut d = vec![0f32; n * padded];
        let mut m = vec![0f32; if offset_at.is_some() { n * padded } else { 0 }];
        let mut qh = Vec::new();
        for (row, blocks) in blocks.chunks_exact(kb).enumerate() {
            for (b, block) in blocks.iter().enumerate() {
                d[row * padded + b] = f16(block, 0);
                if let Some(at) = offset_at {
                    m[row * padded + b] = f16(block, at);
                }
                if let Some(at) = high_at {
                    qh.push(u32::from_le_bytes([
                        block[at],
                        block[at + 1],
                        block[at + 2],
                        block[at + 3],
                    ]));
                }
            }
        }
        let nibble = |block: &[u8], t: usize| {
            let qs = &block[size - 16..];
            if t < 16 {
                qs[t] & 0x0F
            } else {
                qs[t - 16] >> 4
            }
        };
        let pairs = kb.div_ceil(2);
        let qs = Aligned::new(
            blocks
                .chunks_exact(kb)
                .flat_map(|row| {
                    (0..pairs).flat_map(move |p| {
                        (0..BLOCK).map(move |t| {
                            let even = nibble(row[2 * p], t);
                            let odd = row.get(2 * p + 1).map_or(0, |b| nibble(b, t));
                            (even | odd << 4) as i8
                        })
                    })
                })
                .collect::<Vec<_>>()
                .into_iter(),
        );
        Ok(NibbleMatrix {
            n,
            k,
            qs,
            qh,
            d,
            m,
            centre,
        })
    }

    /// The table the offset term sums against the activations' block
    /// sums (`m`, or `d` for a centred format, `n × kb` padded), and the
    /// factor that makes offsets of it (1, or −centre).
    #[inline]
    fn offsets(&self) -> (&[f32], f32) {
        if self.m.is_empty() {
            (&self.d, -self.centre)
        } else {
            (&self.m, 1.0)
        }
    }

    #[inline]
    fn kb_padded(&self) -> usize {
        (self.k / BLOCK).next_multiple_of(SUM_LANES)
    }

    /// Bytes per row: block pairs of 32.
    #[inline]
    fn row_bytes(&self) -> usize {
        (self.k / BLOCK).div_ceil(2) * BLOCK
    }

    /// q of element `t` of block `b` in row `row`.
    fn value(&self, row: usize, b: usize, t: usize) -> u8 {
        let byte = self.qs.as_slice()[row * self.row_bytes() + b / 2 * BLOCK + t] as u8;
        let low = if b.is_multiple_of(2) {
            byte & 0x0F
        } else {
            byte >> 4
        };
        let high = self
            .qh
            .get(row * (self.k / BLOCK) + b)
            .map_or(0, |h| (h >> t & 1) as u8);
        low | high << 4
    }
}

/// A matrix the tiled product can run over.
trait Tiled: Sync {
    fn n(&self) -> usize;

    /// Output columns `r..r + R` for activation rows `c..c + C`.
    ///
    /// # Safety
    /// The CPU has the kernel; `out` is the `m × n` buffer and nothing else
    /// writes those elements.
    unsafe fn tile<const R: usize, const C: usize>(
        &self,
        a: &Q8Rows,
        r: usize,
        c: usize,
        out: *mut f32,
    );
}

fn matmul_tiled<W: Tiled>(w: &W, a: &Q8Rows, m: usize) -> Vec<f32> {
    let n = w.n();
    let mut out = vec![0f32; m * n];
    let groups = n.div_ceil(TILE_ROWS);
    let out_ptr = SendPtr(out.as_mut_ptr());
    // candle's pool, which runs candle's own operations too: one set of
    // compute threads, the caller among them.
    candle_core::utils::barrier_pool().execute_chunked(groups, |range| {
        let first = range.start * TILE_ROWS;
        let last = (range.end * TILE_ROWS).min(n);
        let out_ptr = &out_ptr;
        // SAFETY: ranges write disjoint weight rows (output columns).
        unsafe { rows_into(w, m, a, first, last, out_ptr.0) };
    });
    out
}

/// Output columns `first..last` for all `m` activation rows.
///
/// # Safety
/// As [`Tiled::tile`], for columns `first..last`.
unsafe fn rows_into<W: Tiled>(
    w: &W,
    m: usize,
    a: &Q8Rows,
    first: usize,
    last: usize,
    out: *mut f32,
) {
    let mut r = first;
    // One activation row (a decode step): eight weight rows per tile, so
    // the per-tile set-up is spread over twice the work.
    if m == 1 {
        while r + 2 * TILE_ROWS <= last {
            unsafe { w.tile::<{ 2 * TILE_ROWS }, 1>(a, r, 0, out) };
            r += 2 * TILE_ROWS;
        }
    }
    while r < last {
        let rows = (last - r).min(TILE_ROWS);
        let mut c = 0;
        while c < m {
            let cols = (m - c).min(TILE_COLS);
            unsafe {
                match (rows, cols) {
                    (4, 4) => w.tile::<4, 4>(a, r, c, out),
                    (4, 3) => w.tile::<4, 3>(a, r, c, out),
                    (4, 2) => w.tile::<4, 2>(a, r, c, out),
                    (4, 1) => w.tile::<4, 1>(a, r, c, out),
                    (3, 4) => w.tile::<3, 4>(a, r, c, out),
                    (3, 3) => w.tile::<3, 3>(a, r, c, out),
                    (3, 2) => w.tile::<3, 2>(a, r, c, out),
                    (3, 1) => w.tile::<3, 1>(a, r, c, out),
                    (2, 4) => w.tile::<2, 4>(a, r, c, out),
                    (2, 3) => w.tile::<2, 3>(a, r, c, out),
                    (2, 2) => w.tile::<2, 2>(a, r, c, out),
                    (2, 1) => w.tile::<2, 1>(a, r, c, out),
                    (1, 4) => w.tile::<1, 4>(a, r, c, out),
                    (1, 3) => w.tile::<1, 3>(a, r, c, out),
                    (1, 2) => w.tile::<1, 2>(a, r, c, out),
                    _ => w.tile::<1, 1>(a, r, c, out),
                }
            }
            c += cols;
        }
        r += rows;
    }
}

/// Writes a tile's sums, `sums[j][i]` at (c + j, r + i).
///
/// # Safety
/// As [`Tiled::tile`].
#[inline(always)]
unsafe fn store<const R: usize, const C: usize>(
    sums: [[f32; R]; C],
    n: usize,
    r: usize,
    c: usize,
    out: *mut f32,
) {
    for (j, row) in sums.iter().enumerate() {
        for (i, &v) in row.iter().enumerate() {
            // SAFETY: (c + j, r + i) is inside the caller's buffer and
            // columns, and written once.
            unsafe { *out.add((c + j) * n + r + i) = v };
        }
    }
}

impl Tiled for Q8Matrix {
    fn n(&self) -> usize {
        self.n
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
        unsafe {
            let sums = dot_tile::<R, C>(kb, &w_qs, &w_d, &a_qs, &a_d);
            store(sums, self.n, r, c, out);
        }
    }
}

impl Tiled for NibbleMatrix {
    fn n(&self) -> usize {
        self.n
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
        let padded = self.kb_padded();
        let rb = self.row_bytes();
        let five = !self.qh.is_empty();
        let (offsets, factor) = self.offsets();
        let w = NibbleTile {
            qs: std::array::from_fn(|i| &self.qs[(r + i) * rb..(r + i + 1) * rb]),
            qh: std::array::from_fn(|i| {
                if five {
                    &self.qh[(r + i) * kb..][..kb]
                } else {
                    &[]
                }
            }),
            d: std::array::from_fn(|i| &self.d[(r + i) * padded..][..kb]),
            m: std::array::from_fn(|i| &offsets[(r + i) * padded..][..padded]),
            factor,
        };
        let a = Q8Tile {
            qs: std::array::from_fn(|j| &a.qs[(c + j) * self.k..][..self.k]),
            d: std::array::from_fn(|j| &a.d[(c + j) * kb..][..kb]),
            s: std::array::from_fn(|j| &a.s[(c + j) * padded..][..padded]),
        };
        unsafe {
            let sums = if five {
                dot_tile_nibbles::<R, C, true>(kb, &w, &a)
            } else {
                dot_tile_nibbles::<R, C, false>(kb, &w, &a)
            };
            store(sums, self.n, r, c, out);
        }
    }
}

/// `R` rows of a [`NibbleMatrix`]: values, fifth bits (empty for Q4),
/// scales, offsets (or scales) and their factor ([`NibbleMatrix::offsets`]).
struct NibbleTile<'a, const R: usize> {
    qs: [&'a [i8]; R],
    qh: [&'a [u32]; R],
    d: [&'a [f32]; R],
    m: [&'a [f32]; R],
    factor: f32,
}

/// `C` rows of [`Q8Rows`]: values, scales, block sums.
struct Q8Tile<'a, const C: usize> {
    qs: [&'a [i8]; C],
    d: [&'a [f32]; C],
    s: [&'a [f32]; C],
}

struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint parts of one buffer to rayon tasks.
unsafe impl Sync for SendPtr {}

/// Q8_0 quantisation of activation rows, as GGML does it: per block,
/// scale = max |x| / 127 rounded to f16, values rounded half away from
/// zero.
fn quantize_rows(x: &[f32], m: usize, k: usize) -> Q8Rows {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the kernel runs only where AVX2 and FMA are present;
        // with them `round` is inlined rather than a libm call.
        if supported() {
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
    let kb = k / BLOCK;
    let padded = kb.next_multiple_of(SUM_LANES);
    let mut qs = vec![0i8; m * k];
    let mut d = vec![0f32; m * kb];
    let mut sums = vec![0f32; m * padded];
    for (b, ((src, dst), scale)) in x
        .chunks_exact(BLOCK)
        .zip(qs.chunks_exact_mut(BLOCK))
        .zip(d.iter_mut())
        .enumerate()
    {
        let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
        let s = amax / 127.0;
        let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
        *scale = half::f16::from_f32(s).to_f32();
        let mut sum = 0i32;
        for (q, v) in dst.iter_mut().zip(src) {
            *q = (v * inv).round() as i8;
            sum += *q as i32;
        }
        sums[b / kb * padded + b % kb] = *scale * sum as f32;
    }
    Q8Rows { qs, d, s: sums }
}

/// The dot products of `R` weight rows with `C` activation rows.
///
/// # Safety
/// The CPU has AVX2 and FMA ([`supported`]); slices hold `kb`
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

/// The dot products of `R` 4-bit (or, with `FIVE`, 5-bit) weight rows with
/// `C` activation rows.
///
/// # Safety
/// As [`dot_tile`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_tile_nibbles<const R: usize, const C: usize, const FIVE: bool>(
    kb: usize,
    w: &NibbleTile<R>,
    a: &Q8Tile<C>,
) -> [[f32; R]; C] {
    match path() {
        Path::Avx512 => unsafe { x86::dot_tile_nibbles_avx512::<R, C, FIVE>(kb, w, a) },
        Path::Vnni256 => unsafe { x86::dot_tile_nibbles_vnni::<R, C, FIVE>(kb, w, a) },
        Path::Avx2 => unsafe { x86::dot_tile_nibbles_avx2::<R, C, FIVE>(kb, w, a) },
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_tile_nibbles<const R: usize, const C: usize, const FIVE: bool>(
    _: usize,
    _: &NibbleTile<R>,
    _: &Q8Tile<C>,
) -> [[f32; R]; C] {
    unreachable!("supported() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_tile<const R: usize, const C: usize>(
    _: usize,
    _: &[&[i8]; R],
    _: &[&[f32]; R],
    _: &[&[i8]; C],
    _: &[&[f32]; C],
) -> [[f32; R]; C] {
    unreachable!("supported() is false off x86-64")
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
    use super::{NibbleTile, Q8Tile, SUM_LANES};

    /// Asks for byte `at` of the weight row two tiles of `rows` on (rows
    /// are contiguous). A tile reads its short rows side by side, a pattern
    /// the hardware prefetcher follows badly: with this, one thread's
    /// decode on SmolLM2 went from about 63 to 70–88 tok/s (Q4_1) and on
    /// the Qwen2.5-0.5B shape from 20 to 27 (Q5_0). A hint only: past the
    /// matrix's end it fetches nothing useful and faults nothing.
    #[inline(always)]
    fn ahead(row: &[i8], at: usize, rows: usize) {
        let p = row.as_ptr().wrapping_add(at + 2 * rows * row.len());
        // SAFETY: prefetching never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p) };
    }
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
                        ahead(w_qs[i], b * 32, R);
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

    /// The Q4 offset term Σ m·s over a row's padded blocks: eight lanes,
    /// one fused multiply-add per eight blocks, summed as in [`hsum`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn offset(m: &[f32], s: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (m, s) in m.chunks_exact(SUM_LANES).zip(s.chunks_exact(SUM_LANES)) {
            // SAFETY: each chunk holds eight f32.
            let (m, s) = unsafe { (_mm256_loadu_ps(m.as_ptr()), _mm256_loadu_ps(s.as_ptr())) };
            acc = _mm256_fmadd_ps(m, s, acc);
        }
        hsum(acc)
    }

    /// Element t of the result is 16 where bit t of `h` is set, else 0
    /// (each byte picks its byte of `h`, sets every other bit, and compares
    /// with all ones).
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

    /// 4- and 5-bit blocks against Q8 activations with 256-bit vectors: the
    /// values are unsigned (0..32), so no sign is moved; the pair sums stay
    /// within i16 (2 · 31 · 127).
    macro_rules! nibble_tile {
        ($name:ident, $features:literal, $dot:ident) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const R: usize, const C: usize, const FIVE: bool>(
                kb: usize,
                w: &NibbleTile<R>,
                a: &Q8Tile<C>,
            ) -> [[f32; R]; C] {
                let low = _mm256_set1_epi8(0x0F);
                let mut acc = [[_mm256_setzero_ps(); R]; C];
                for b in 0..kb {
                    let x: [__m256i; C] = std::array::from_fn(|j| unsafe {
                        _mm256_loadu_si256(a.qs[j].as_ptr().add(b * 32) as *const __m256i)
                    });
                    for i in 0..R {
                        ahead(w.qs[i], b / 2 * 32, R);
                        let pair = unsafe {
                            _mm256_loadu_si256(w.qs[i].as_ptr().add(b / 2 * 32) as *const __m256i)
                        };
                        let mut q = if b % 2 == 0 {
                            _mm256_and_si256(pair, low)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16::<4>(pair), low)
                        };
                        if FIVE {
                            q = _mm256_or_si256(q, fifth_bits(w.qh[i][b]));
                        }
                        let wd = w.d[i][b];
                        for j in 0..C {
                            let p = _mm256_cvtepi32_ps($dot(q, x[j]));
                            let d = _mm256_set1_ps(wd * a.d[j][b]);
                            acc[j][i] = _mm256_fmadd_ps(d, p, acc[j][i]);
                        }
                    }
                }
                let mut out = [[0f32; R]; C];
                for j in 0..C {
                    for i in 0..R {
                        out[j][i] = hsum(acc[j][i]) + w.factor * offset(w.m[i], a.s[j]);
                    }
                }
                out
            }
        };
    }

    nibble_tile!(dot_tile_nibbles_avx2, "avx2,fma", dot_avx2);
    nibble_tile!(dot_tile_nibbles_vnni, "avx2,fma,avxvnni", dot_vnni);

    /// Scales of blocks `b` and `b + 1` (or of `b` alone, zero above) in
    /// the low and high eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    unsafe fn scale_pair(p: *const f32, both: bool) -> __m512 {
        let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let two = if both {
            unsafe { _mm_castpd_ps(_mm_load_sd(p as *const f64)) }
        } else {
            unsafe { _mm_load_ss(p) }
        };
        _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(two))
    }

    /// Two 4- or 5-bit blocks per instruction: one 32-byte pair, its low
    /// nibbles in the low half and its high ones in the high half (the
    /// fifth bits from a 64-bit mask), against 64 activation bytes; halves
    /// added and summed as in the Q8 path.
    #[allow(
        clippy::needless_range_loop,
        reason = "i and j index the weight rows, activation rows and accumulators together"
    )]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dot_tile_nibbles_avx512<
        const R: usize,
        const C: usize,
        const FIVE: bool,
    >(
        kb: usize,
        w: &NibbleTile<R>,
        a: &Q8Tile<C>,
    ) -> [[f32; R]; C] {
        let low = _mm512_set1_epi8(0x0F);
        let sixteen = _mm512_set1_epi8(0x10);
        let zero = _mm512_setzero_si512();
        let mut acc = [[_mm512_setzero_ps(); R]; C];
        for p in 0..kb.div_ceil(2) {
            let b = 2 * p;
            let both = b + 1 < kb;
            let x: [__m512i; C] = std::array::from_fn(|j| unsafe {
                let at = a.qs[j].as_ptr().add(b * 32);
                if both {
                    _mm512_loadu_si512(at as *const __m512i)
                } else {
                    _mm512_maskz_loadu_epi8(0xFFFF_FFFF, at)
                }
            });
            let ad: [__m512; C] =
                std::array::from_fn(|j| unsafe { scale_pair(a.d[j].as_ptr().add(b), both) });
            for i in 0..R {
                ahead(w.qs[i], p * 32, R);
                let pair =
                    unsafe { _mm256_loadu_si256(w.qs[i].as_ptr().add(p * 32) as *const __m256i) };
                let mut q = _mm512_and_si512(
                    _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(pair),
                        _mm256_srli_epi16::<4>(pair),
                    ),
                    low,
                );
                if FIVE {
                    let odd = if both { w.qh[i][b + 1] } else { 0 };
                    let bits = w.qh[i][b] as u64 | (odd as u64) << 32;
                    q = _mm512_or_si512(q, _mm512_maskz_mov_epi8(bits, sixteen));
                }
                let wd = unsafe { scale_pair(w.d[i].as_ptr().add(b), both) };
                for j in 0..C {
                    let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, q, x[j]));
                    acc[j][i] = _mm512_fmadd_ps(_mm512_mul_ps(wd, ad[j]), dot, acc[j][i]);
                }
            }
        }
        let mut out = [[0f32; R]; C];
        for j in 0..C {
            for i in 0..R {
                out[j][i] = hsum(halves_added(acc[j][i])) + w.factor * offset(w.m[i], a.s[j]);
            }
        }
        out
    }

    /// The low eight lanes plus the high eight.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    fn halves_added(x: __m512) -> __m256 {
        let lo = _mm512_castps512_ps256(x);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
        _mm256_add_ps(lo, hi)
    }

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
                    ahead(w_qs[i], b * 32, R);
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
        let pair = |p: *const f32| unsafe { scale_pair(p, true) };
        let mut b = 0;
        while b + 1 < kb {
            step!(b, both, pair);
            b += 2;
        }
        if b < kb {
            let low = |p: *const i8| unsafe { _mm512_maskz_loadu_epi8(0xFFFF_FFFF, p) };
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
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMATS: [GgmlDType; 5] = [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
    ];

    /// Eight f32 lanes summed as [`x86::hsum`] does.
    fn hsum(l: [f32; 8]) -> f32 {
        let r: [f32; 4] = std::array::from_fn(|x| l[x + 4] + l[x]);
        (r[0] + r[2]) + (r[1] + r[3])
    }

    /// The kernels' arithmetic written out lane by lane in scalar code:
    /// per block, lane l holds the exact integer sum over elements 4l to
    /// 4l + 3, times the scale product, fused into the lane's f32
    /// accumulator (the AVX-512 paths keep odd blocks in eight lanes of
    /// their own, added at the end); then the horizontal sum, plus for Q4
    /// the offset term in eight lanes of its own.
    fn model(w: &Matrix, a: &Q8Rows, i: usize, j: usize, wide: bool) -> f32 {
        let (k, kb) = (w.k(), w.k() / BLOCK);
        let value = |b: usize, t: usize| match w {
            Matrix::Q8(w) => w.qs.as_slice()[j * k + b * BLOCK + t] as i32,
            Matrix::Nibbles(w) => w.value(j, b, t) as i32,
        };
        let scale = |b: usize| match w {
            Matrix::Q8(w) => w.d[j * kb + b],
            Matrix::Nibbles(w) => w.d[j * w.kb_padded() + b],
        };
        let mut lanes = [[0f32; 8]; 2];
        for b in 0..kb {
            let d = scale(b) * a.d[i * kb + b];
            let half = &mut lanes[if wide { b % 2 } else { 0 }];
            for (l, lane) in half.iter_mut().enumerate() {
                let s: i32 = (0..4)
                    .map(|e| value(b, l * 4 + e) * a.qs[i * k + b * BLOCK + l * 4 + e] as i32)
                    .sum();
                *lane = d.mul_add(s as f32, *lane);
            }
        }
        let sum = hsum(std::array::from_fn(|l| {
            if wide {
                lanes[0][l] + lanes[1][l]
            } else {
                lanes[0][l]
            }
        }));
        let Matrix::Nibbles(w) = w else {
            return sum;
        };
        let padded = w.kb_padded();
        let (table, factor) = w.offsets();
        let m = &table[j * padded..][..padded];
        let mut offset = [0f32; 8];
        for g in (0..padded).step_by(SUM_LANES) {
            for (l, lane) in offset.iter_mut().enumerate() {
                let at = g + l;
                *lane = m[at].mul_add(a.s[i * padded + at], *lane);
            }
        }
        sum + factor * hsum(offset)
    }

    fn numbers(seed: u32, len: usize, scale: f32) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                ((state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// A random `n × k` matrix in `dtype`, its dequantised f32 values, and
    /// seven rows of activations.
    fn matrix(dtype: GgmlDType, n: usize, k: usize, seed: u32) -> (Matrix, Vec<f32>, Vec<f32>) {
        let w = numbers(seed, n * k, 1.0);
        let x = numbers(seed + 1, 7 * k, 3.0);
        let t = Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let exact = q
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        (
            Matrix::from_blocks(dtype, n, k, &q.data().unwrap()).unwrap(),
            exact,
            x,
        )
    }

    #[test]
    fn each_element_is_the_same_whatever_the_tile_and_rows() {
        if !supported() {
            return;
        }
        // 3 and 9 blocks: the odd last block of the two-block paths, and
        // block sums padded past one group of eight.
        for dtype in FORMATS {
            for k in [96, 128, 288] {
                let (w, _, x) = matrix(dtype, 11, k, 3);
                let all = w.matmul(&x, 7);
                let a = quantize_rows(&x, 7, k);
                for i in 0..7 {
                    let alone = w.matmul(&x[i * k..(i + 1) * k], 1);
                    assert_eq!(alone, all[i * 11..(i + 1) * 11], "{dtype:?} k {k} row {i}");
                    for j in 0..11 {
                        assert_eq!(
                            all[i * 11 + j],
                            model(&w, &a, i, j, avx512()),
                            "{dtype:?} k {k} ({i}, {j})"
                        );
                    }
                }
            }
        }
    }

    /// Every path this CPU has, called directly, against the scalar model.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn each_path_this_cpu_has_matches_its_scalar_model() {
        if !supported() {
            return;
        }
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni");
        let vnni = is_x86_feature_detected!("avxvnni");
        for dtype in FORMATS {
            for k in [96, 128] {
                let (w, _, x) = matrix(dtype, 4, k, 5);
                let a = quantize_rows(&x, 2, k);
                let mut paths: Vec<([[f32; 4]; 2], bool, &str)> = Vec::new();
                // SAFETY: each path runs only where the CPU has its features.
                unsafe {
                    match &w {
                        Matrix::Q8(m) => {
                            let kb = k / BLOCK;
                            let w_qs: [&[i8]; 4] =
                                std::array::from_fn(|i| &m.qs[i * k..(i + 1) * k]);
                            let w_d: [&[f32]; 4] =
                                std::array::from_fn(|i| &m.d[i * kb..(i + 1) * kb]);
                            let a_qs: [&[i8]; 2] =
                                std::array::from_fn(|j| &a.qs[j * k..(j + 1) * k]);
                            let a_d: [&[f32]; 2] =
                                std::array::from_fn(|j| &a.d[j * kb..(j + 1) * kb]);
                            let args = (kb, &w_qs, &w_d, &a_qs, &a_d);
                            paths.push((
                                x86::dot_tile_avx2(args.0, args.1, args.2, args.3, args.4),
                                false,
                                "avx2",
                            ));
                            if vnni {
                                paths.push((
                                    x86::dot_tile_vnni(args.0, args.1, args.2, args.3, args.4),
                                    false,
                                    "vnni",
                                ));
                            }
                            if avx512 {
                                paths.push((
                                    x86::dot_tile_avx512(args.0, args.1, args.2, args.3, args.4),
                                    true,
                                    "avx512",
                                ));
                            }
                        }
                        Matrix::Nibbles(m) => {
                            let kb = k / BLOCK;
                            let (rb, padded) = (m.row_bytes(), m.kb_padded());
                            let five = !m.qh.is_empty();
                            let wt = NibbleTile::<4> {
                                qs: std::array::from_fn(|i| &m.qs[i * rb..(i + 1) * rb]),
                                qh: std::array::from_fn(|i| {
                                    if five { &m.qh[i * kb..][..kb] } else { &[] }
                                }),
                                d: std::array::from_fn(|i| &m.d[i * padded..][..kb]),
                                m: std::array::from_fn(|i| &m.offsets().0[i * padded..][..padded]),
                                factor: m.offsets().1,
                            };
                            let at = Q8Tile::<2> {
                                qs: std::array::from_fn(|j| &a.qs[j * k..][..k]),
                                d: std::array::from_fn(|j| &a.d[j * kb..][..kb]),
                                s: std::array::from_fn(|j| &a.s[j * padded..][..padded]),
                            };
                            macro_rules! call {
                                ($path:ident) => {
                                    if five {
                                        x86::$path::<4, 2, true>(kb, &wt, &at)
                                    } else {
                                        x86::$path::<4, 2, false>(kb, &wt, &at)
                                    }
                                };
                            }
                            paths.push((call!(dot_tile_nibbles_avx2), false, "avx2"));
                            if vnni {
                                paths.push((call!(dot_tile_nibbles_vnni), false, "vnni"));
                            }
                            if avx512 {
                                paths.push((call!(dot_tile_nibbles_avx512), true, "avx512"));
                            }
                        }
                    }
                }
                assert!(!paths.is_empty());
                for (out, wide, name) in paths {
                    for (j, row) in out.iter().enumerate() {
                        for (i, &v) in row.iter().enumerate() {
                            assert_eq!(
                                v,
                                model(&w, &a, j, i, wide),
                                "{dtype:?} {name} k {k} ({j}, {i})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Against the dequantised weights times the f32 activations, in f64.
    /// Stated bound per element: the activations' quantisation error, at
    /// most 0.6 of a block's scale per value (half a step, plus the scale's
    /// rounding to f16: 127 · 2⁻¹¹ of a step), times Σ|w| over the block;
    /// plus 10⁻⁵ of Σ|w·x| for f32 accumulation.
    #[test]
    fn the_product_is_within_its_stated_bound_of_the_f32_product() {
        if !supported() {
            return;
        }
        for dtype in FORMATS {
            let (n, k) = (37, 288);
            let (w, exact, x) = matrix(dtype, n, k, 9);
            let ours = w.matmul(&x, 7);
            let a = quantize_rows(&x, 7, k);
            for i in 0..7 {
                for j in 0..n {
                    let (wr, xr) = (&exact[j * k..][..k], &x[i * k..][..k]);
                    let truth: f64 = wr.iter().zip(xr).map(|(&w, &x)| w as f64 * x as f64).sum();
                    let magnitude: f64 = wr.iter().zip(xr).map(|(w, x)| (w * x).abs() as f64).sum();
                    let bound: f64 = (0..k / BLOCK)
                        .map(|b| {
                            let abs: f64 = wr[b * BLOCK..][..BLOCK]
                                .iter()
                                .map(|w| w.abs() as f64)
                                .sum();
                            0.6 * a.d[i * (k / BLOCK) + b] as f64 * abs
                        })
                        .sum::<f64>()
                        + 1e-5 * magnitude;
                    let err = (ours[i * n + j] as f64 - truth).abs();
                    assert!(
                        err <= bound,
                        "{dtype:?} ({i}, {j}): error {err} over {bound}"
                    );
                }
            }
        }
        let t = Tensor::from_vec(
            numbers(1, 64 * 64, 1.0),
            (64, 64),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for dtype in FORMATS {
            let q = QTensor::quantize(&t, dtype).unwrap();
            assert!(
                matches!(Linear::new(q).unwrap(), Linear::Own(_)),
                "{dtype:?}"
            );
        }
    }

    #[test]
    fn embedding_rows_equal_candles_dequantised_rows() {
        if !supported() {
            return;
        }
        for dtype in FORMATS {
            let (n, k) = (9, 96);
            let (w, exact, _) = matrix(dtype, n, k, 11);
            let table = Embedding::Own(Arc::new(w));
            let ids = Tensor::new(&[3u32, 0, 8, 3], &candle_core::Device::Cpu).unwrap();
            let rows: Vec<f32> = table
                .forward(&ids)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (r, id) in [3usize, 0, 8, 3].into_iter().enumerate() {
                assert_eq!(
                    rows[r * k..][..k],
                    exact[id * k..][..k],
                    "{dtype:?} row {id}"
                );
            }
            let outside = Tensor::new(&[9u32], &candle_core::Device::Cpu).unwrap();
            assert!(table.forward(&outside).is_err());
        }
    }

    /// Q4_1 holds 24 bytes per 32 weights (16 of values, f32 scale and
    /// offset), against 36 for Q8_0 and 20 in the file; Q5 adds 4 bytes of
    /// fifth bits; Q4_0 and Q5_0 keep no offsets.
    #[test]
    fn four_and_five_bit_weights_stay_small() {
        if !supported() {
            return;
        }
        let blocks = 64 * 576 / BLOCK;
        // f32 scales and offsets are padded from 18 to 24 per row.
        let (w, _, _) = matrix(GgmlDType::Q4_1, 64, 576, 2);
        assert_eq!(w.bytes(), blocks * 16 + 2 * 64 * 24 * 4);
        let (w, _, _) = matrix(GgmlDType::Q4_0, 64, 576, 2);
        assert_eq!(w.bytes(), blocks * 16 + 64 * 24 * 4);
        let (w, _, _) = matrix(GgmlDType::Q5_0, 64, 576, 2);
        assert_eq!(w.bytes(), blocks * (16 + 4) + 64 * 24 * 4);
        let (w8, _, _) = matrix(GgmlDType::Q8_0, 64, 576, 2);
        assert_eq!(w8.bytes(), blocks * (32 + 4));
    }

    /// The paths side by side, in GMAC/s. It switches the process-wide
    /// path, so it runs alone: `cargo test --release -p ganglion-llm --lib
    /// kernel_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn kernel_speed() {
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q5_0] {
            for (n, k) in [(1536usize, 576usize), (576, 1536), (49152, 576)] {
                let (w, _, _) = matrix(dtype, n, k, 1);
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
                        "{dtype:?} n {n} k {k} m {m}: GMAC/s avx2 {:.1} vnni256 {:.1} avx512 {:.1}",
                        best[0], best[1], best[2]
                    );
                }
            }
        }
    }
}
