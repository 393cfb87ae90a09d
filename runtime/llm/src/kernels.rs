//! The engine's own CPU matrix product for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
//! Q4_K, Q5_K and Q6_K weights, used instead of candle's for every layer
//! matrix and the output head; other formats stay with candle's product,
//! cut into row pieces that run on the engine's pool ([`Pieces`]).
//!
//! Why not candle's: its product walks one activation row at a time, for
//! each row converting every block's f16 scales again, has no SIMD path
//! for Q4_1, Q5_0 and Q5_1, and its fast K-quant paths need rows that are
//! multiples of 256. This one takes a tile of weight rows against a tile of
//! activation rows, loading each weight block once per tile, with the
//! scales converted once at load, so a batch of sequences costs little
//! more weight traffic than one.
//!
//! 4-, 5- and 6-bit weights keep their width ([`NibbleMatrix`]: sixteen
//! rows interleaved, one vector lane per row, each lane ending a block with
//! that row's whole integer dot product). Q8_0 runs row by row in tiles of
//! 4 × 4 ([`Q8Matrix`]). The activations are quantised to 8 bits once per
//! call, with each block's sum kept for the offset terms.
//!
//! Batch invariance: each output element is computed by the same
//! instruction sequence whatever the tile, the number of rows or the
//! thread split, so a row's result does not depend on the other rows in
//! the call.
//!
//! Limits: x86-64 with AVX2 and FMA (AVX-512 VNNI or AVX-VNNI when
//! present; the 4- to 6-bit paths give the same bits on all three, Q8_0's
//! differ in the last bits between AVX-512 and the others); elsewhere, and
//! on GPUs, candle's product is used.

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use std::sync::Arc;

/// Weights per quantisation block.
const BLOCK: usize = 32;
/// Weight rows per tile.
const TILE_ROWS: usize = 4;
/// Activation rows per tile.
const TILE_COLS: usize = 4;
/// Weight rows interleaved together in a 4- or 5-bit matrix: one lane of
/// a 512-bit vector per row.
const GROUP: usize = 16;
/// Bytes of values per group and block: 16 rows of 32 nibbles.
const GROUP_BLOCK: usize = GROUP * BLOCK / 2;
/// Q6_K's centre: weight = d·(q − 32).
const SIX_CENTRE: i32 = 32;

/// A layer matrix: the engine's kernel where it applies, else candle's.
pub enum Linear {
    Own(Arc<Matrix>),
    Candle(Arc<Pieces>),
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
            Ok(Linear::Candle(Arc::new(Pieces::new(t)?)))
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
            Linear::Candle(p) => p.bytes(),
        }
    }

    /// `x · Wᵀ` for `x` of shape `[.., k]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Own(m) => x.contiguous()?.apply_op1_no_bwd(m.as_ref()),
            Linear::Candle(p) => p.forward(x),
        }
    }
}

/// The token embedding table, kept quantised (rows are dequantised on
/// lookup); with a tied output head, the same bytes serve as the output
/// projection.
pub enum Embedding {
    Own(Arc<Matrix>),
    Candle(Arc<Pieces>),
}

impl Embedding {
    pub fn new(t: QTensor) -> Result<Embedding> {
        Ok(match Linear::new(t)? {
            Linear::Own(m) => Embedding::Own(m),
            Linear::Candle(p) => Embedding::Candle(p),
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
            Embedding::Candle(p) => p.rows(ids),
        }
    }

    /// The table as the output projection (tied weights).
    pub fn as_output(&self) -> Result<Linear> {
        match self {
            Embedding::Own(m) => Ok(Linear::Own(m.clone())),
            Embedding::Candle(p) => Ok(Linear::Candle(p.clone())),
        }
    }
}

/// A matrix on candle's product, cut into row pieces that the model's pool
/// runs side by side (candle's own pool is left at one thread, see
/// [`crate::pool`]). Each piece's bytes are held once and serve both the
/// product and, for the embedding table, row lookup (by candle, which
/// dequantises only the rows asked for).
pub struct Pieces {
    parts: Vec<Piece>,
}

struct Piece {
    start: usize,
    rows: usize,
    product: QMatMul,
}

impl Pieces {
    /// Rows per piece are a multiple of this, so that every piece keeps
    /// the row alignment candle's repacked kernels ask for.
    const ROW_ALIGN: usize = 256;

    pub fn new(t: QTensor) -> Result<Pieces> {
        let dims = t.shape().dims().to_vec();
        let cut = t.device().is_cpu() && t.dtype().block_size() > 1 && dims.len() == 2;
        let count = crate::pool::pool().threads() * 2;
        if !cut || count < 2 || dims[0] < 2 * Self::ROW_ALIGN {
            let rows = dims.first().copied().unwrap_or(0);
            return Ok(Pieces {
                parts: vec![Piece {
                    start: 0,
                    rows,
                    product: QMatMul::from_qtensor(t)?,
                }],
            });
        }
        let (n, k) = (dims[0], dims[1]);
        let (dtype, device) = (t.dtype(), t.device());
        let data = t.data()?;
        let row_bytes = data.len() / n;
        let per = n.div_ceil(count).next_multiple_of(Self::ROW_ALIGN);
        let mut parts = Vec::new();
        for start in (0..n).step_by(per) {
            let rows = per.min(n - start);
            let bytes = &data[start * row_bytes..(start + rows) * row_bytes];
            let storage = QStorage::from_data(std::borrow::Cow::Borrowed(bytes), &device, dtype)?;
            parts.push(Piece {
                start,
                rows,
                product: QMatMul::from_qtensor(QTensor::new(storage, (rows, k))?)?,
            });
        }
        Ok(Pieces { parts })
    }

    /// `x · Wᵀ`, the pieces side by side on the model's pool.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let [one] = self.parts.as_slice() {
            return one.product.forward(x);
        }
        let outs: Vec<std::sync::Mutex<Option<Result<Tensor>>>> =
            self.parts.iter().map(|_| Default::default()).collect();
        crate::pool::pool().run(self.parts.len(), |range| {
            for p in range {
                let out = self.parts[p].product.forward(x);
                *outs[p].lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
            }
        });
        let outs = outs
            .into_iter()
            .map(|o| {
                o.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .unwrap_or_else(|| candle_core::bail!("a piece of the product did not run"))
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&outs, x.rank() - 1)
    }

    /// Rows `ids` of the table, `[ids, width]` f32.
    fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        let list = ids.to_vec1::<u32>()?;
        let total: usize = self.parts.iter().map(|p| p.rows).sum();
        if let Some(id) = list.iter().find(|&&id| id as usize >= total) {
            candle_core::bail!("token id {id} is outside the table of {total}");
        }
        if let [one] = self.parts.as_slice() {
            return one.product.embedding(ids);
        }
        let device = ids.device();
        let mut rows = Vec::with_capacity(list.len());
        for &id in &list {
            let id = id as usize;
            let Some(p) = self
                .parts
                .iter()
                .find(|p| (p.start..p.start + p.rows).contains(&id))
            else {
                candle_core::bail!("token id {id} is outside the table of {total}");
            };
            let row = p
                .product
                .embedding(&Tensor::new(&[(id - p.start) as u32], device)?)?;
            rows.push(row);
        }
        Tensor::cat(&rows, 0)
    }

    fn bytes(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match &p.product {
                QMatMul::QTensor(t) => t.storage_size_in_bytes(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                    t.elem_count() * t.dtype().size_in_bytes()
                }
            })
            .sum()
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
            GgmlDType::Q8_0
                | GgmlDType::Q4_0
                | GgmlDType::Q4_1
                | GgmlDType::Q5_0
                | GgmlDType::Q5_1
                | GgmlDType::Q4K
                | GgmlDType::Q5K
                | GgmlDType::Q6K
        ) && t.device().is_cpu()
            && supported()
            && t.shape().dims().len() == 2
            && t.shape().dims()[1].is_multiple_of(BLOCK)
    }

    /// From GGML blocks of `dtype` (Q8_0, Q4_0 or Q4_1), `n` rows of `k`.
    pub fn from_blocks(dtype: GgmlDType, n: usize, k: usize, bytes: &[u8]) -> Result<Matrix> {
        match dtype {
            GgmlDType::Q8_0 => Q8Matrix::from_blocks(n, k, bytes).map(Matrix::Q8),
            GgmlDType::Q4_0
            | GgmlDType::Q4_1
            | GgmlDType::Q5_0
            | GgmlDType::Q5_1
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K => NibbleMatrix::from_blocks(dtype, n, k, bytes).map(Matrix::Nibbles),
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
            Matrix::Nibbles(m) => {
                m.qs.bytes() + (m.qh.len() + m.qh6.len()) * 8 + (m.d.len() + m.m.len()) * 4
            }
        }
    }

    /// `out[i][j] = Σ x[i] · w[j]` for `m` rows of `x`, row-major `[m, n]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_quantized(&quantize_rows(x, m, self.k()), m)
    }

    fn matmul_quantized(&self, a: &Q8Rows, m: usize) -> Vec<f32> {
        match self {
            Matrix::Q8(w) => w.matmul(a, m),
            Matrix::Nibbles(w) => w.matmul_groups(a, m),
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
            Matrix::Nibbles(w) if w.bits == 6 => {
                for b in 0..w.k / BLOCK {
                    out.extend((0..BLOCK).map(|t| {
                        w.d[w.scale_at(row, b, t)] * (w.value(row, b, t) as f32 - w.centre)
                    }));
                }
            }
            Matrix::Nibbles(w) => {
                let (table, factor) = w.offsets();
                for b in 0..w.k / BLOCK {
                    let at = w.at(row, b);
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

/// A Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K matrix of `n` rows by `k`
/// columns: weight = d·q + m per block of 32, with q in 0..16 (Q4) or 0..32
/// (Q5); Q4_0 and Q5_0 are the cases m = −8·d and m = −16·d. A K-quant's
/// sub-block scale and offset are multiplied out at load (exactly: an f16
/// times a 6- or 8-bit integer), so Q4_K and Q5_K run as Q4_1 and Q5_1 do,
/// holding 24 or 28 bytes per 32 weights where the file has 18 or 22.
/// Q6_K (q in 0..64, weight = d·(q − 32) with a scale per 16 weights)
/// holds 32 bytes per 32 weights where the file has 26.25.
///
/// Layout: rows in groups of 16, `GROUP` (the last padded with zero rows),
/// each group's blocks in order, `GROUP_BLOCK` (256) bytes per block: four
/// 64-byte lines, line l holding at byte 4r + e element 8l + e of row r in
/// its low nibble and element 8l + 4 + e in its high one. A mask or a
/// shift of one line gives four values of all sixteen rows, one 32-bit
/// lane per row, against which four activation bytes are broadcast: each
/// lane ends the block with that row's whole integer dot product, so the
/// float work is one multiply-add per row and block for every lane, not
/// per four values.
///
/// For Q5 and Q6, `qh` holds per group and block eight 64-bit masks, one
/// per half line (low nibbles, then high), bit 4r + e the fifth bit of that
/// value, and for Q6 `qh6` the sixth bits the same way; otherwise they are
/// empty. `d` and (Q4_1, Q5_1, Q4_K, Q5_K) `m` hold per group and block the
/// sixteen rows' f32 scales and offsets; for Q6 `d` holds two scales per
/// block, for its first and second 16 weights. Q4_0 and Q5_0 keep no `m`:
/// their offset is −`centre`·d, so the kernel sums d·s and scales the sum
/// by −`centre` (exact, a power of two), reading 20 and 24 bytes per 32
/// weights instead of 24 and 28. Q6's centre (32) is taken off each half
/// block's integer dot product, as 32 × the activations' integer half sum.
pub struct NibbleMatrix {
    n: usize,
    k: usize,
    /// 4, 5 or 6.
    bits: u32,
    qs: Aligned,
    qh: Vec<u64>,
    qh6: Vec<u64>,
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
/// term, and the integer sums of each block's halves for Q6's.
struct Q8Rows {
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    h: Vec<i32>,
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
    /// From GGML blocks of `dtype`, `n` rows of `k` (see [`block`]).
    fn from_blocks(dtype: GgmlDType, n: usize, k: usize, bytes: &[u8]) -> Result<NibbleMatrix> {
        // (bytes and weights per GGML block, centre when no offset, bits)
        let (size, per, centre, bits) = match dtype {
            GgmlDType::Q4_0 => (18, BLOCK, Some(8.0), 4),
            GgmlDType::Q4_1 => (20, BLOCK, None, 4),
            GgmlDType::Q5_0 => (22, BLOCK, Some(16.0), 5),
            GgmlDType::Q5_1 => (24, BLOCK, None, 5),
            GgmlDType::Q4K => (144, 256, None, 4),
            GgmlDType::Q5K => (176, 256, None, 5),
            GgmlDType::Q6K => (210, 256, Some(32.0), 6),
            other => candle_core::bail!("{other:?} is not a 4-, 5- or 6-bit format"),
        };
        let halves = if bits == 6 { 2 } else { 1 };
        if !k.is_multiple_of(per) || bytes.len() != n * k / per * size {
            candle_core::bail!(
                "{dtype:?} matrix of {n}×{k} cannot be {} bytes",
                bytes.len()
            );
        }
        let kb = k / BLOCK;
        let cells = n.div_ceil(GROUP) * kb;
        let mut qs = vec![0u8; cells * GROUP_BLOCK];
        let mut qh = vec![0u64; if bits >= 5 { cells * 8 } else { 0 }];
        let mut qh6 = vec![0u64; if bits == 6 { cells * 8 } else { 0 }];
        let mut d = vec![0f32; cells * GROUP * halves];
        let mut m = vec![0f32; if centre.is_none() { cells * GROUP } else { 0 }];
        let mut q = [0u8; BLOCK];
        for (row, blocks) in bytes.chunks_exact(k / per * size).enumerate() {
            let (g, r) = (row / GROUP, row % GROUP);
            for b in 0..kb {
                let cell = g * kb + b;
                let (scales, offset) = block(dtype, blocks, b, &mut q);
                for (h, scale) in scales.iter().take(halves).enumerate() {
                    d[(cell * halves + h) * GROUP + r] = *scale;
                }
                if centre.is_none() {
                    m[cell * GROUP + r] = offset;
                }
                for (t, &v) in q.iter().enumerate() {
                    let (half, e) = (t / 4, t % 4);
                    qs[cell * GROUP_BLOCK + half / 2 * 64 + r * 4 + e] |=
                        (v & 0x0F) << (4 * (half % 2));
                    if v & 0x10 != 0 {
                        qh[cell * 8 + half] |= 1 << (r * 4 + e);
                    }
                    if v & 0x20 != 0 {
                        qh6[cell * 8 + half] |= 1 << (r * 4 + e);
                    }
                }
            }
        }
        Ok(NibbleMatrix {
            n,
            k,
            bits,
            qs: Aligned::new(qs.into_iter().map(|b| b as i8)),
            qh,
            qh6,
            d,
            m,
            centre: centre.unwrap_or(0.0),
        })
    }

    /// The table the offset term sums against the activations' block sums
    /// (`m`, or `d` for a centred format), and the factor that makes
    /// offsets of it (1, or −centre).
    #[inline]
    fn offsets(&self) -> (&[f32], f32) {
        if self.m.is_empty() {
            (&self.d, -self.centre)
        } else {
            (&self.m, 1.0)
        }
    }

    fn groups(&self) -> usize {
        self.n.div_ceil(GROUP)
    }

    /// Index of row `row`'s entry for block `b` in `m` (and in `d`,
    /// except for Q6: see [`NibbleMatrix::scale_at`]).
    fn at(&self, row: usize, b: usize) -> usize {
        (row / GROUP * (self.k / BLOCK) + b) * GROUP + row % GROUP
    }

    /// Index in `d` of the scale of element `t` of block `b` in row `row`.
    fn scale_at(&self, row: usize, b: usize, t: usize) -> usize {
        if self.bits == 6 {
            ((row / GROUP * (self.k / BLOCK) + b) * 2 + t / 16) * GROUP + row % GROUP
        } else {
            self.at(row, b)
        }
    }

    /// q of element `t` of block `b` in row `row`.
    fn value(&self, row: usize, b: usize, t: usize) -> u8 {
        let (kb, r) = (self.k / BLOCK, row % GROUP);
        let cell = row / GROUP * kb + b;
        let (half, e) = (t / 4, t % 4);
        let byte = self.qs.as_slice()[cell * GROUP_BLOCK + half / 2 * 64 + r * 4 + e] as u8;
        let low = byte >> (4 * (half % 2)) & 0x0F;
        let bit = |plane: &[u64]| {
            plane
                .get(cell * 8 + half)
                .map_or(0, |h| (h >> (r * 4 + e) & 1) as u8)
        };
        low | bit(&self.qh) << 4 | bit(&self.qh6) << 5
    }
}

/// Block `b` (32 weights) of a row of GGML `dtype` bytes: its values with
/// the fifth and sixth bits (0..64) into `q`, and ([d, d'], m) with
/// weight = d·q + m for the first 16 weights and d'·q + m for the others
/// (d' = d but for Q6_K; m is not used for Q4_0, Q5_0 and Q6_K, whose
/// offsets are −8·d, −16·d and −32·d).
///
/// Q4_0..Q5_1 blocks are an f16 d, then (Q4_1, Q5_1) an f16 m, then (Q5)
/// 4 bytes of fifth bits, then 16 bytes holding element j in the low
/// nibble of byte j and element j + 16 in the high one. Q4_K and Q5_K
/// super-blocks of 256 are an f16 d and dmin, 12 bytes of packed 6-bit
/// scales and offsets (sc, mn) for eight sub-blocks, then (Q5_K) 32 bytes
/// whose byte l holds bit s for element l of sub-block s, then 128 bytes
/// where sub-blocks 2c and 2c + 1 are the low and high nibbles of bytes
/// 32c..32c + 32; weight = d·sc·q − dmin·mn. Q6_K super-blocks of 256 are
/// 128 bytes of low nibbles, 64 of high bit pairs, 16 signed 8-bit scales
/// (one per 16 weights) and an f16 d: in each half of 128 weights, quarter
/// u takes nibble u / 2 of bytes l or l + 32 (u odd) and bit pair u of
/// byte l of the half's 32 high bytes; weight = d·sc·(q − 32).
fn block(dtype: GgmlDType, row: &[u8], b: usize, q: &mut [u8; BLOCK]) -> ([f32; 2], f32) {
    let f16 = |at: &[u8]| half::f16::from_le_bytes([at[0], at[1]]).to_f32();
    match dtype {
        GgmlDType::Q6K => {
            let sb = &row[b / 8 * 210..][..210];
            let (half, quarter) = (b % 8 / 4, b % 4);
            let low = &sb[half * 64 + quarter % 2 * 32..][..32];
            let high = &sb[128 + half * 32..][..32];
            for (l, v) in q.iter_mut().enumerate() {
                let nibble = if quarter < 2 {
                    low[l] & 0x0F
                } else {
                    low[l] >> 4
                };
                *v = nibble | (high[l] >> (2 * quarter) & 3) << 4;
            }
            let d = f16(&sb[208..]);
            let scale = |i: usize| d * sb[192 + half * 8 + quarter * 2 + i] as i8 as f32;
            ([scale(0), scale(1)], 0.0)
        }
        GgmlDType::Q4K | GgmlDType::Q5K => {
            let five = dtype == GgmlDType::Q5K;
            let size = if five { 176 } else { 144 };
            let sb = &row[b / 8 * size..][..size];
            let s = b % 8;
            let scales = &sb[4..16];
            let (sc, mn) = if s < 4 {
                (scales[s] & 63, scales[s + 4] & 63)
            } else {
                (
                    (scales[s + 4] & 0x0F) | (scales[s - 4] >> 6) << 4,
                    (scales[s + 4] >> 4) | (scales[s] >> 6) << 4,
                )
            };
            let (high, low) = if five {
                (&sb[16..48], &sb[48..])
            } else {
                (&[][..], &sb[16..])
            };
            let values = &low[s / 2 * 32..][..32];
            for (l, v) in q.iter_mut().enumerate() {
                let nibble = if s.is_multiple_of(2) {
                    values[l] & 0x0F
                } else {
                    values[l] >> 4
                };
                let fifth = high.get(l).map_or(0, |h| h >> s & 1);
                *v = nibble | fifth << 4;
            }
            let d = f16(&sb[0..]) * sc as f32;
            ([d, d], -(f16(&sb[2..]) * mn as f32))
        }
        _ => {
            let (size, offset_at, high_at) = match dtype {
                GgmlDType::Q4_0 => (18, None, None),
                GgmlDType::Q4_1 => (20, Some(2), None),
                GgmlDType::Q5_0 => (22, None, Some(2)),
                _ => (24, Some(2), Some(4)),
            };
            let blk = &row[b * size..][..size];
            let high = high_at.map_or(0, |at| {
                u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]])
            });
            let values = &blk[size - 16..];
            for (t, v) in q.iter_mut().enumerate() {
                let nibble = if t < 16 {
                    values[t] & 0x0F
                } else {
                    values[t - 16] >> 4
                };
                *v = nibble | ((high >> t & 1) as u8) << 4;
            }
            ([f16(blk); 2], offset_at.map_or(0.0, |at| f16(&blk[at..])))
        }
    }
}

/// An `m × n` product computed in `units` parts side by side on the
/// model's pool; `part(units, out)` writes only its units' output columns
/// of the row-major buffer `out`.
fn in_parts(
    m: usize,
    n: usize,
    units: usize,
    part: impl Fn(std::ops::Range<usize>, *mut f32) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let out_ptr = SendPtr(out.as_mut_ptr());
    crate::pool::pool().run(units, |range| {
        let out_ptr = &out_ptr;
        part(range, out_ptr.0)
    });
    out
}

impl Q8Matrix {
    /// The product against `m` quantised activation rows, in parts of
    /// [`TILE_ROWS`] weight rows.
    fn matmul(&self, a: &Q8Rows, m: usize) -> Vec<f32> {
        let n = self.n;
        in_parts(m, n, n.div_ceil(TILE_ROWS), |range, out| {
            let first = range.start * TILE_ROWS;
            let last = (range.end * TILE_ROWS).min(n);
            // SAFETY: parts write disjoint weight rows (output columns).
            unsafe { self.rows_into(m, a, first, last, out) };
        })
    }

    /// Output columns `first..last` for all `m` activation rows.
    ///
    /// # Safety
    /// As [`Q8Matrix::tile`], for columns `first..last`.
    unsafe fn rows_into(&self, m: usize, a: &Q8Rows, first: usize, last: usize, out: *mut f32) {
        let mut r = first;
        // One activation row (a decode step): eight weight rows per tile, so
        // the per-tile set-up is spread over twice the work.
        if m == 1 {
            while r + 2 * TILE_ROWS <= last {
                unsafe { self.tile::<{ 2 * TILE_ROWS }, 1>(a, r, 0, out) };
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
}

/// Writes a tile's sums, `sums[j][i]` at (c + j, r + i).
///
/// # Safety
/// As [`Q8Matrix::tile`].
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

impl Q8Matrix {
    /// Output columns `r..r + R` for activation rows `c..c + C`.
    ///
    /// # Safety
    /// The CPU has the kernel; `out` is the `m × n` buffer and nothing else
    /// writes those elements.
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

impl NibbleMatrix {
    fn matmul_groups(&self, a: &Q8Rows, m: usize) -> Vec<f32> {
        in_parts(m, self.n, self.groups(), |groups, out| {
            // SAFETY: parts write disjoint groups of output columns.
            unsafe { self.groups_into(a, m, groups, out) };
        })
    }

    /// Output columns of `groups` for all `m` activation rows: a decode
    /// step takes two groups per tile; more rows take one group against up
    /// to eight of them (four on 256-bit paths, which have half the
    /// registers), unpacking each weight line once for all of them.
    ///
    /// # Safety
    /// As [`NibbleMatrix::tile`], for every group in `groups`.
    unsafe fn groups_into(
        &self,
        a: &Q8Rows,
        m: usize,
        groups: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        let mut g = groups.start;
        if m == 1 {
            while g + 2 <= groups.end {
                unsafe { self.tile::<2, 1>(a, g, 0, out) };
                g += 2;
            }
        }
        let widest = if path() == Path::Avx512 { 8 } else { 4 };
        for g in g..groups.end {
            let mut c = 0;
            while c < m {
                let cols = (m - c).min(widest);
                unsafe {
                    match cols {
                        8 => self.tile::<1, 8>(a, g, c, out),
                        7 => self.tile::<1, 7>(a, g, c, out),
                        6 => self.tile::<1, 6>(a, g, c, out),
                        5 => self.tile::<1, 5>(a, g, c, out),
                        4 => self.tile::<1, 4>(a, g, c, out),
                        3 => self.tile::<1, 3>(a, g, c, out),
                        2 => self.tile::<1, 2>(a, g, c, out),
                        _ => self.tile::<1, 1>(a, g, c, out),
                    }
                }
                c += cols;
            }
        }
    }

    /// Output columns of groups `g..g + R` for activation rows `c..c + C`.
    ///
    /// # Safety
    /// The CPU has the kernel; `out` is the `m × n` buffer and nothing else
    /// writes those elements.
    #[inline(always)]
    unsafe fn tile<'a, const R: usize, const C: usize>(
        &'a self,
        a: &Q8Rows,
        g: usize,
        c: usize,
        out: *mut f32,
    ) {
        let kb = self.k / BLOCK;
        let (offsets, factor) = self.offsets();
        let halves = if self.bits == 6 { 2 } else { 1 };
        let plane = |p: &'a [u64], i: usize| -> &'a [u64] {
            if p.is_empty() {
                &[]
            } else {
                &p[(g + i) * kb * 8..][..kb * 8]
            }
        };
        let w = GroupTile {
            qs: std::array::from_fn(|i| {
                &self.qs.as_slice()[(g + i) * kb * GROUP_BLOCK..][..kb * GROUP_BLOCK]
            }),
            qh: std::array::from_fn(|i| plane(&self.qh, i)),
            qh6: std::array::from_fn(|i| plane(&self.qh6, i)),
            d: std::array::from_fn(|i| {
                &self.d[(g + i) * kb * GROUP * halves..][..kb * GROUP * halves]
            }),
            m: std::array::from_fn(|i| {
                if self.bits == 6 {
                    &[]
                } else {
                    &offsets[(g + i) * kb * GROUP..][..kb * GROUP]
                }
            }),
            factor,
        };
        let a = Q8Tile {
            qs: std::array::from_fn(|j| &a.qs[(c + j) * self.k..][..self.k]),
            d: std::array::from_fn(|j| &a.d[(c + j) * kb..][..kb]),
            s: std::array::from_fn(|j| &a.s[(c + j) * kb..][..kb]),
            h: std::array::from_fn(|j| &a.h[(c + j) * kb * 2..][..kb * 2]),
        };
        let sums = unsafe {
            match self.bits {
                4 => dot_groups::<R, C, 4>(kb, &w, &a),
                5 => dot_groups::<R, C, 5>(kb, &w, &a),
                _ => dot_groups::<R, C, 6>(kb, &w, &a),
            }
        };
        for (j, groups) in sums.iter().enumerate() {
            for (i, rows) in groups.iter().enumerate() {
                let first = (g + i) * GROUP;
                let len = GROUP.min(self.n - first);
                // SAFETY: row c + j, columns first..first + len, are inside
                // the caller's buffer and groups, and written once.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        rows.as_ptr(),
                        out.add((c + j) * self.n + first),
                        len,
                    )
                };
            }
        }
    }
}

/// `R` groups of a [`NibbleMatrix`] from their first block: values, fifth
/// and sixth bits (empty where the format has none), scales, offsets (or
/// scales; empty for Q6) and their factor ([`NibbleMatrix::offsets`]).
struct GroupTile<'a, const R: usize> {
    qs: [&'a [i8]; R],
    qh: [&'a [u64]; R],
    qh6: [&'a [u64]; R],
    d: [&'a [f32]; R],
    m: [&'a [f32]; R],
    factor: f32,
}

/// `C` rows of [`Q8Rows`]: values, scales, block sums, half-block integer
/// sums.
struct Q8Tile<'a, const C: usize> {
    qs: [&'a [i8]; C],
    d: [&'a [f32]; C],
    s: [&'a [f32]; C],
    h: [&'a [i32]; C],
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
        *scale = half::f16::from_f32(s).to_f32();
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
        qs,
        d,
        s: sums,
        h: halves,
    }
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

/// The dot products of `R` groups of `BITS`-bit (4, 5 or 6) weight rows with
/// `C` activation rows, `[column][group][row in group]`.
///
/// # Safety
/// As [`dot_tile`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_groups<const R: usize, const C: usize, const BITS: u32>(
    kb: usize,
    w: &GroupTile<R>,
    a: &Q8Tile<C>,
) -> [[[f32; GROUP]; R]; C] {
    match path() {
        Path::Avx512 => unsafe { x86::dot_groups_avx512::<R, C, BITS>(kb, w, a) },
        Path::Vnni256 => unsafe { x86::dot_groups_vnni::<R, C, BITS>(kb, w, a) },
        Path::Avx2 => unsafe { x86::dot_groups_avx2::<R, C, BITS>(kb, w, a) },
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_groups<const R: usize, const C: usize, const BITS: u32>(
    _: usize,
    _: &GroupTile<R>,
    _: &Q8Tile<C>,
) -> [[[f32; GROUP]; R]; C] {
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
    use super::{BLOCK, GROUP, GROUP_BLOCK, GroupTile, Q8Tile, SIX_CENTRE};

    /// Asks for byte `at` of the Q8_0 weight row two tiles of `rows` on
    /// (rows are contiguous). A tile reads its short rows side by side, a
    /// pattern the hardware prefetcher follows badly (see
    /// [`fetch_ahead`] for the 4- to 6-bit layout). A hint only: past the
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

    /// Asks for block `b` of group `i` two tiles of `R` groups on (groups
    /// are contiguous in each table). A tile reads its groups side by
    /// side, a pattern the hardware prefetcher follows badly: prefetching
    /// (first of rows, in the earlier layout) took one thread's decode on
    /// SmolLM2 from about 63 to 70–88 tok/s (Q4_1) and on the Qwen2.5-0.5B
    /// shape from 20 to 27 (Q5_0). A hint only: past a table's end it
    /// fetches nothing useful and faults nothing.
    #[inline(always)]
    fn fetch_ahead<const R: usize, const BITS: u32>(
        w: &GroupTile<R>,
        i: usize,
        b: usize,
        kb: usize,
    ) {
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
    #[inline(always)]
    unsafe fn four(x: *const i8) -> i32 {
        unsafe { (x as *const i32).read_unaligned() }
    }

    /// `acc` plus the sums of four byte products per i32 lane, with AVX2:
    /// the pair sums stay within i16 because the weights are below 32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn add_dot_avx2(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_add_epi32(
            acc,
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
        )
    }

    /// The same in one AVX-VNNI instruction.
    #[inline]
    #[target_feature(enable = "avx2,fma,avxvnni")]
    fn add_dot_vnni(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, u, s)
    }

    /// Groups of 4- and 5-bit rows with 256-bit vectors: each group as two
    /// halves of eight rows (the first and last 32 bytes of each line).
    macro_rules! group_tile {
        ($name:ident, $features:literal, $dot:ident) => {
            #[allow(
                clippy::needless_range_loop,
                reason = "i, j and h index the groups, activation rows and accumulators together"
            )]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const R: usize, const C: usize, const BITS: u32>(
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
                                    lo = _mm256_or_si256(
                                        lo,
                                        fifth_bits((masks[0] >> (32 * h)) as u32),
                                    );
                                    hi = _mm256_or_si256(
                                        hi,
                                        fifth_bits((masks[1] >> (32 * h)) as u32),
                                    );
                                }
                                for j in 0..C {
                                    let x = a.qs[j][b * BLOCK + 8 * l..].as_ptr();
                                    let (xl, xh) = unsafe { (four(x), four(x.add(4))) };
                                    dots[j] = $dot(dots[j], lo, _mm256_set1_epi32(xl));
                                    dots[j] = $dot(dots[j], hi, _mm256_set1_epi32(xh));
                                }
                            }
                            if BITS == 6 {
                                let d0 = unsafe {
                                    _mm256_loadu_ps(w.d[i][2 * b * GROUP + h * 8..].as_ptr())
                                };
                                let d1 = unsafe {
                                    _mm256_loadu_ps(w.d[i][(2 * b + 1) * GROUP + h * 8..].as_ptr())
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
                                let dw = unsafe {
                                    _mm256_loadu_ps(w.d[i][b * GROUP + h * 8..].as_ptr())
                                };
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
                            if BITS == 6 {
                                unsafe {
                                    _mm256_storeu_ps(out[j][i][h * 8..].as_mut_ptr(), acc[j][i][h])
                                };
                                continue;
                            }
                            let mut off = _mm256_setzero_ps();
                            for b in 0..kb {
                                let m = unsafe {
                                    _mm256_loadu_ps(w.m[i][b * GROUP + h * 8..].as_ptr())
                                };
                                off = _mm256_fmadd_ps(m, _mm256_set1_ps(a.s[j][b]), off);
                            }
                            let sum = _mm256_fmadd_ps(factor, off, acc[j][i][h]);
                            unsafe { _mm256_storeu_ps(out[j][i][h * 8..].as_mut_ptr(), sum) };
                        }
                    }
                }
                out
            }
        };
    }

    group_tile!(dot_groups_avx2, "avx2,fma", add_dot_avx2);
    group_tile!(dot_groups_vnni, "avx2,fma,avxvnni", add_dot_vnni);

    /// Groups of 4- and 5-bit rows with 512-bit vectors: a whole group per
    /// vector, the fifth bits from one 64-bit mask per half line.
    #[allow(
        clippy::needless_range_loop,
        reason = "i and j index the groups, activation rows and accumulators together"
    )]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dot_groups_avx512<const R: usize, const C: usize, const BITS: u32>(
        kb: usize,
        w: &GroupTile<R>,
        a: &Q8Tile<C>,
    ) -> [[[f32; GROUP]; R]; C] {
        let low = _mm512_set1_epi8(0x0F);
        let sixteen = _mm512_set1_epi8(0x10);
        let thirty_two = _mm512_set1_epi8(0x20);
        let mut acc = [[_mm512_setzero_ps(); R]; C];
        for b in 0..kb {
            let da: [__m512; C] = std::array::from_fn(|j| _mm512_set1_ps(a.d[j][b]));
            for i in 0..R {
                fetch_ahead::<R, BITS>(w, i, b, kb);
                let base = w.qs[i][b * GROUP_BLOCK..].as_ptr();
                // Low and high nibbles in chains of their own, added at
                // the end (exact), to halve the chain of dependent sums.
                let mut lows = [_mm512_setzero_si512(); C];
                let mut highs = [_mm512_setzero_si512(); C];
                // Q6: lines 0–1 and 2–3 are the block's two halves, each
                // with a scale of its own.
                let mut first = [_mm512_setzero_si512(); C];
                for l in 0..4 {
                    if BITS == 6 && l == 2 {
                        for j in 0..C {
                            first[j] = _mm512_add_epi32(lows[j], highs[j]);
                        }
                        lows = [_mm512_setzero_si512(); C];
                        highs = [_mm512_setzero_si512(); C];
                    }
                    let v = unsafe { _mm512_loadu_si512(base.add(l * 64) as *const __m512i) };
                    let mut lo = _mm512_and_si512(v, low);
                    let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                    if BITS == 6 {
                        let masks = &w.qh6[i][b * 8 + 2 * l..];
                        lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi8(masks[0], thirty_two));
                        hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi8(masks[1], thirty_two));
                    }
                    if BITS >= 5 {
                        let masks = &w.qh[i][b * 8 + 2 * l..];
                        lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi8(masks[0], sixteen));
                        hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi8(masks[1], sixteen));
                    }
                    for j in 0..C {
                        let x = a.qs[j][b * BLOCK + 8 * l..].as_ptr();
                        let (xl, xh) = unsafe { (four(x), four(x.add(4))) };
                        lows[j] = _mm512_dpbusd_epi32(lows[j], lo, _mm512_set1_epi32(xl));
                        highs[j] = _mm512_dpbusd_epi32(highs[j], hi, _mm512_set1_epi32(xh));
                    }
                }
                if BITS == 6 {
                    let d0 = unsafe { _mm512_loadu_ps(w.d[i][2 * b * GROUP..].as_ptr()) };
                    let d1 = unsafe { _mm512_loadu_ps(w.d[i][(2 * b + 1) * GROUP..].as_ptr()) };
                    for j in 0..C {
                        let sums = &a.h[j][2 * b..];
                        let centred = |dot: __m512i, sum: i32| {
                            _mm512_cvtepi32_ps(_mm512_sub_epi32(
                                dot,
                                _mm512_set1_epi32(SIX_CENTRE * sum),
                            ))
                        };
                        let second = _mm512_add_epi32(lows[j], highs[j]);
                        acc[j][i] = _mm512_fmadd_ps(
                            _mm512_mul_ps(d0, da[j]),
                            centred(first[j], sums[0]),
                            acc[j][i],
                        );
                        acc[j][i] = _mm512_fmadd_ps(
                            _mm512_mul_ps(d1, da[j]),
                            centred(second, sums[1]),
                            acc[j][i],
                        );
                    }
                } else {
                    let dw = unsafe { _mm512_loadu_ps(w.d[i][b * GROUP..].as_ptr()) };
                    for j in 0..C {
                        let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lows[j], highs[j]));
                        acc[j][i] = _mm512_fmadd_ps(_mm512_mul_ps(dw, da[j]), dot, acc[j][i]);
                    }
                }
            }
        }
        let factor = _mm512_set1_ps(w.factor);
        let mut out = [[[0f32; GROUP]; R]; C];
        for j in 0..C {
            for i in 0..R {
                if BITS == 6 {
                    unsafe { _mm512_storeu_ps(out[j][i].as_mut_ptr(), acc[j][i]) };
                    continue;
                }
                let mut off = _mm512_setzero_ps();
                for b in 0..kb {
                    let m = unsafe { _mm512_loadu_ps(w.m[i][b * GROUP..].as_ptr()) };
                    off = _mm512_fmadd_ps(m, _mm512_set1_ps(a.s[j][b]), off);
                }
                let sum = _mm512_fmadd_ps(factor, off, acc[j][i]);
                unsafe { _mm512_storeu_ps(out[j][i].as_mut_ptr(), sum) };
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

    const FORMATS: [GgmlDType; 8] = [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// Row widths to test `dtype` at: odd and even numbers of 32-blocks,
    /// and for K-quants one and two super-blocks.
    fn widths(dtype: GgmlDType) -> &'static [usize] {
        match dtype {
            GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K => &[256, 512],
            _ => &[96, 128, 288],
        }
    }

    /// Eight f32 lanes summed as [`x86::hsum`] does.
    fn hsum(l: [f32; 8]) -> f32 {
        let r: [f32; 4] = std::array::from_fn(|x| l[x + 4] + l[x]);
        (r[0] + r[2]) + (r[1] + r[3])
    }

    /// The kernels' arithmetic written out in scalar code.
    ///
    /// Q8_0: per block, lane l holds the exact integer sum over elements
    /// 4l to 4l + 3, times the scale product, fused into the lane's f32
    /// accumulator (the AVX-512 path keeps odd blocks in eight lanes of
    /// their own, added at the end); then the horizontal sum.
    ///
    /// 4- and 5-bit (every path alike): per block, the exact integer dot
    /// product times the scale product, fused into one f32 accumulator,
    /// and the offset times the activations' block sum fused into another;
    /// the second times the factor fused onto the first. 6-bit: per half
    /// block, the integer dot product less 32 × the activations' integer
    /// half sum, times the scale product, fused into the accumulator.
    fn model(w: &Matrix, a: &Q8Rows, i: usize, j: usize, wide: bool) -> f32 {
        let (k, kb) = (w.k(), w.k() / BLOCK);
        let w = match w {
            Matrix::Q8(w) => w,
            Matrix::Nibbles(w) if w.bits == 6 => {
                let mut acc = 0f32;
                for b in 0..kb {
                    for half in 0..2 {
                        let ts = half * 16..(half + 1) * 16;
                        let q: i32 = ts
                            .clone()
                            .map(|t| w.value(j, b, t) as i32 * a.qs[i * k + b * BLOCK + t] as i32)
                            .sum();
                        let dot = q - SIX_CENTRE * a.h[i * kb * 2 + 2 * b + half];
                        let d = w.d[w.scale_at(j, b, ts.start)] * a.d[i * kb + b];
                        acc = d.mul_add(dot as f32, acc);
                    }
                }
                return acc;
            }
            Matrix::Nibbles(w) => {
                let (table, factor) = w.offsets();
                let (mut acc, mut off) = (0f32, 0f32);
                for b in 0..kb {
                    let dot: i32 = (0..BLOCK)
                        .map(|t| w.value(j, b, t) as i32 * a.qs[i * k + b * BLOCK + t] as i32)
                        .sum();
                    let at = w.at(j, b);
                    acc = (w.d[at] * a.d[i * kb + b]).mul_add(dot as f32, acc);
                    off = table[at].mul_add(a.s[i * kb + b], off);
                }
                return factor.mul_add(off, acc);
            }
        };
        let mut lanes = [[0f32; 8]; 2];
        for b in 0..kb {
            let d = w.d[j * kb + b] * a.d[i * kb + b];
            let half = &mut lanes[if wide { b % 2 } else { 0 }];
            for (l, lane) in half.iter_mut().enumerate() {
                let s: i32 = (0..4)
                    .map(|e| {
                        let t = b * BLOCK + l * 4 + e;
                        w.qs.as_slice()[j * k + t] as i32 * a.qs[i * k + t] as i32
                    })
                    .sum();
                *lane = d.mul_add(s as f32, *lane);
            }
        }
        hsum(std::array::from_fn(|l| {
            if wide {
                lanes[0][l] + lanes[1][l]
            } else {
                lanes[0][l]
            }
        }))
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
            for &k in widths(dtype) {
                let (w, _, x) = matrix(dtype, 37, k, 3);
                let all = w.matmul(&x, 7);
                let a = quantize_rows(&x, 7, k);
                for i in 0..7 {
                    let alone = w.matmul(&x[i * k..(i + 1) * k], 1);
                    assert_eq!(alone, all[i * 37..(i + 1) * 37], "{dtype:?} k {k} row {i}");
                    for j in 0..37 {
                        assert_eq!(
                            all[i * 37 + j],
                            model(&w, &a, i, j, avx512()),
                            "{dtype:?} k {k} ({i}, {j})"
                        );
                    }
                }
            }
        }
    }

    /// Whether this CPU has the AVX-512 VNNI and the AVX-VNNI paths.
    #[cfg(target_arch = "x86_64")]
    fn wider_paths() -> (bool, bool) {
        (
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni"),
            is_x86_feature_detected!("avxvnni"),
        )
    }

    /// Every Q8_0 path this CPU has, called directly, against the scalar
    /// model.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn each_path_this_cpu_has_matches_its_scalar_model() {
        if !supported() {
            return;
        }
        let (avx512, vnni) = wider_paths();
        for dtype in [GgmlDType::Q8_0] {
            for &k in widths(dtype) {
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
                        Matrix::Nibbles(_) => unreachable!("Q8_0 is held as Q8_0"),
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

    /// Every 4-, 5- and 6-bit path this CPU has, called directly on two groups
    /// (the second partly padding), against the scalar model: all paths
    /// give the same bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn each_group_path_this_cpu_has_matches_the_scalar_model() {
        if !supported() {
            return;
        }
        let (avx512, vnni) = wider_paths();
        for dtype in &FORMATS[1..] {
            for &k in widths(*dtype) {
                let (w, _, x) = matrix(*dtype, 21, k, 5);
                let Matrix::Nibbles(nib) = &w else {
                    panic!("{dtype:?} is not held as nibbles");
                };
                let kb = k / BLOCK;
                let a = quantize_rows(&x, 3, k);
                let (table, factor) = nib.offsets();
                let halves = if nib.bits == 6 { 2 } else { 1 };
                let plane = |p: &[u64], g: usize| -> Vec<u64> {
                    p.get(g * kb * 8..(g + 1) * kb * 8)
                        .map_or(Vec::new(), <[u64]>::to_vec)
                };
                let (qh, qh6): (Vec<_>, Vec<_>) = (0..2)
                    .map(|g| (plane(&nib.qh, g), plane(&nib.qh6, g)))
                    .unzip();
                let wt = GroupTile::<2> {
                    qs: std::array::from_fn(|g| {
                        &nib.qs.as_slice()[g * kb * GROUP_BLOCK..][..kb * GROUP_BLOCK]
                    }),
                    qh: std::array::from_fn(|g| &qh[g][..]),
                    qh6: std::array::from_fn(|g| &qh6[g][..]),
                    d: std::array::from_fn(|g| {
                        &nib.d[g * kb * GROUP * halves..][..kb * GROUP * halves]
                    }),
                    m: std::array::from_fn(|g| {
                        if nib.bits == 6 {
                            &[]
                        } else {
                            &table[g * kb * GROUP..][..kb * GROUP]
                        }
                    }),
                    factor,
                };
                let at = Q8Tile::<3> {
                    qs: std::array::from_fn(|j| &a.qs[j * k..][..k]),
                    d: std::array::from_fn(|j| &a.d[j * kb..][..kb]),
                    s: std::array::from_fn(|j| &a.s[j * kb..][..kb]),
                    h: std::array::from_fn(|j| &a.h[j * kb * 2..][..kb * 2]),
                };
                let mut paths = Vec::new();
                macro_rules! call {
                    ($path:ident) => {
                        // SAFETY: each path runs only where the CPU has its
                        // features.
                        unsafe {
                            match nib.bits {
                                4 => x86::$path::<2, 3, 4>(kb, &wt, &at),
                                5 => x86::$path::<2, 3, 5>(kb, &wt, &at),
                                _ => x86::$path::<2, 3, 6>(kb, &wt, &at),
                            }
                        }
                    };
                }
                paths.push((call!(dot_groups_avx2), "avx2"));
                if vnni {
                    paths.push((call!(dot_groups_vnni), "vnni"));
                }
                if avx512 {
                    paths.push((call!(dot_groups_avx512), "avx512"));
                }
                for (out, name) in paths {
                    for (j, groups) in out.iter().enumerate() {
                        for row in 0..21 {
                            assert_eq!(
                                groups[row / GROUP][row % GROUP],
                                model(&w, &a, j, row, false),
                                "{dtype:?} {name} k {k} ({j}, {row})"
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
    /// plus 10⁻⁵ of Σ|w·x| for f32 accumulation. And against the
    /// activations as quantised, where only the f32 sums' rounding remains:
    /// within 10⁻⁵ of Σ|w·x|.
    #[test]
    fn the_product_is_within_its_stated_bound_of_the_f32_product() {
        if !supported() {
            return;
        }
        for dtype in FORMATS {
            let (n, k) = (37, *widths(dtype).last().expect("widths"));
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
                    // Against the activations as quantised, only the f32
                    // sums' rounding remains: within 10⁻⁵ of Σ|w·x|.
                    let kb = k / BLOCK;
                    let xq = |t: usize| a.qs[i * k + t] as f64 * a.d[i * kb + t / BLOCK] as f64;
                    let truth_q: f64 = (0..k).map(|t| wr[t] as f64 * xq(t)).sum();
                    let magnitude_q: f64 = (0..k).map(|t| (wr[t] as f64 * xq(t)).abs()).sum();
                    let err_q = (ours[i * n + j] as f64 - truth_q).abs();
                    assert!(
                        err_q <= 1e-5 * magnitude_q,
                        "{dtype:?} ({i}, {j}): error {err_q} against the quantised activations"
                    );
                }
            }
        }
        let t = Tensor::from_vec(
            numbers(1, 64 * 256, 1.0),
            (64, 256),
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
            let (n, k) = (9, widths(dtype)[0]);
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

    /// A Q3_K matrix left to candle, cut into row pieces run on the pool:
    /// the product and rows of candle's on the whole matrix.
    #[test]
    fn candles_product_in_pieces_equals_it_whole() {
        let cpu = candle_core::Device::Cpu;
        let (n, k) = (1100, 256);
        let t = Tensor::from_vec(numbers(4, n * k, 1.0), (n, k), &cpu).unwrap();
        let whole = QMatMul::from_qtensor(QTensor::quantize(&t, GgmlDType::Q3K).unwrap()).unwrap();
        let pieces = Pieces::new(QTensor::quantize(&t, GgmlDType::Q3K).unwrap()).unwrap();
        assert!(pieces.parts.len() > 1);
        assert_eq!(
            pieces.bytes(),
            QTensor::quantize(&t, GgmlDType::Q3K)
                .unwrap()
                .storage_size_in_bytes()
        );
        for m in [1, 3] {
            let x = Tensor::from_vec(numbers(5, m * k, 2.0), (m, k), &cpu).unwrap();
            let (a, b) = (pieces.forward(&x).unwrap(), whole.forward(&x).unwrap());
            let diff = (a - &b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let top = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            // One row: the same bits. More: candle's sums run in an order
            // that depends on the matrix's shape, so f32 rounding only.
            if m == 1 {
                assert_eq!(diff, 0.0);
            } else {
                assert!(diff <= 1e-6 * top, "{m} rows: {diff} off, of {top}");
            }
        }
        let ids = Tensor::new(&[0u32, 1099, 512, 7], &cpu).unwrap();
        assert_eq!(
            pieces.rows(&ids).unwrap().to_vec2::<f32>().unwrap(),
            whole.embedding(&ids).unwrap().to_vec2::<f32>().unwrap()
        );
        assert!(
            pieces
                .rows(&Tensor::new(&[1100u32], &cpu).unwrap())
                .is_err()
        );
    }

    /// Q4_1 holds 24 bytes per 32 weights (16 of values, f32 scale and
    /// offset), against 36 for Q8_0 and 20 in the file; Q5 adds 4 bytes of
    /// fifth bits; Q4_0 and Q5_0 keep no offsets. Rows are padded to whole
    /// groups of sixteen.
    #[test]
    fn four_and_five_bit_weights_stay_small() {
        if !supported() {
            return;
        }
        // (format, rows, columns, bytes per 32 weights); Q5_1's 60 rows pad
        // to 64.
        for (dtype, rows, cols, per_block) in [
            (GgmlDType::Q4_1, 64, 576, 24),
            (GgmlDType::Q4_0, 64, 576, 20),
            (GgmlDType::Q5_0, 64, 576, 24),
            (GgmlDType::Q5_1, 60, 576, 28),
            (GgmlDType::Q8_0, 64, 576, 32 + 4),
            (GgmlDType::Q4K, 64, 512, 24),
            (GgmlDType::Q5K, 64, 512, 28),
            (GgmlDType::Q6K, 64, 512, 32),
        ] {
            let (w, _, _) = matrix(dtype, rows, cols, 2);
            assert_eq!(w.bytes(), 64 * cols / BLOCK * per_block, "{dtype:?}");
        }
    }

    /// The paths side by side, in GMAC/s. It switches the process-wide
    /// path, so it runs alone: `cargo test --release -p ganglion-llm --lib
    /// kernel_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn kernel_speed() {
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
        ] {
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
