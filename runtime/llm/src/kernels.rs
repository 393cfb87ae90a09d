//! The candle side of the engine's CPU matrix product: which tensors go
//! to the engine's own kernel (the `ganglion-kernels` crate: Q8_0, Q4_0,
//! Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K on any CPU, with AVX2, AVX-VNNI,
//! AVX-512 VNNI, NEON or NEON dotprod paths where the CPU has them and a
//! portable one elsewhere), run as a candle custom op on the engine's
//! pool; the other formats stay with candle's product, cut into row
//! pieces that run on the engine's pool ([`Pieces`]).
//!
//! Limits: on GPUs, and for Q2_K, Q3_K, Q8_K and float weights, candle's
//! product is used. See the kernel crate's docs for its layout, batch
//! invariance and which paths give the same bits.

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use ganglion_kernels::{Format, Parallel, quantize_rows};
use std::sync::Arc;

/// A layer matrix: the engine's kernel where it applies, else candle's.
pub enum Linear {
    /// On the engine's kernel: a CPU matrix in one of its formats.
    Own(Arc<Matrix>),
    /// On candle's product: other formats, float weights, GPUs.
    Candle(Arc<Pieces>),
}

impl Linear {
    /// Takes a matrix in one of the kernel's formats on the CPU for the
    /// engine's kernel; anything else stays with candle.
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
        let a = quantize_rows(&data, data.len() / k, k);
        ours.iter()
            .map(|w| {
                let mut shape = dims.clone();
                *shape.last_mut().expect("checked above") = w.n();
                Tensor::from_vec(w.matmul_quantized(&a), shape, x.device())
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
    /// Held in the engine's kernel layout; rows dequantised by it.
    Own(Arc<Matrix>),
    /// Held by candle; rows dequantised by candle.
    Candle(Arc<Pieces>),
}

impl Embedding {
    /// Wraps the `[vocab, width]` table, on the engine's kernel where
    /// [`Matrix::takes`] it, as for [`Linear::new`].
    ///
    /// # Errors
    ///
    /// When the tensor's bytes cannot be read or repacked.
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

    /// Cuts a matrix into about two row pieces per pool thread, cut at
    /// multiples of 256 rows; a matrix that is under 512 rows, not 2-D,
    /// unquantised, or not on the CPU, or a pool of one thread, leaves it
    /// whole (one piece).
    ///
    /// # Errors
    ///
    /// When candle cannot read the tensor's bytes or build a piece from
    /// them.
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

/// A weight matrix on the engine's kernel.
pub struct Matrix(ganglion_kernels::Matrix);

/// The kernel's name for a GGML type it takes.
fn format(dtype: GgmlDType) -> Option<Format> {
    Some(match dtype {
        GgmlDType::Q8_0 => Format::Q8_0,
        GgmlDType::Q4_0 => Format::Q4_0,
        GgmlDType::Q4_1 => Format::Q4_1,
        GgmlDType::Q5_0 => Format::Q5_0,
        GgmlDType::Q5_1 => Format::Q5_1,
        GgmlDType::Q4K => Format::Q4K,
        GgmlDType::Q5K => Format::Q5K,
        GgmlDType::Q6K => Format::Q6K,
        _ => return None,
    })
}

/// The engine's pool as the kernel's [`Parallel`].
struct Pool;

// SAFETY: `Pool::run` calls its task on disjoint ranges covering
// `0..items` and returns only once every call has returned (its contract,
// in crate::pool).
unsafe impl Parallel for Pool {
    fn run(&self, units: usize, task: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        crate::pool::pool().run(units, task)
    }
}

impl Matrix {
    /// Whether the engine's kernel takes this tensor: a 2-D CPU tensor in
    /// one of the kernel's formats (every CPU has a path for them).
    pub fn takes(t: &QTensor) -> bool {
        format(t.dtype()).is_some()
            && t.device().is_cpu()
            && t.shape().dims().len() == 2
            && t.shape().dims()[1].is_multiple_of(32)
    }

    /// From GGML blocks of `dtype`, `n` rows of `k`.
    ///
    /// # Errors
    ///
    /// When `dtype` is not one of the kernel's formats, or `bytes` does not
    /// hold exactly `n` rows of `k` in it.
    pub fn from_blocks(dtype: GgmlDType, n: usize, k: usize, bytes: &[u8]) -> Result<Matrix> {
        let Some(format) = format(dtype) else {
            candle_core::bail!("the engine's kernel does not take {dtype:?}");
        };
        ganglion_kernels::Matrix::from_blocks(format, n, k, bytes)
            .map(Matrix)
            .map_err(candle_core::Error::wrap)
    }

    /// Rows: output features (vocabulary size for the embedding table).
    pub fn n(&self) -> usize {
        self.0.n()
    }

    /// Columns: input features, a multiple of 32.
    pub fn k(&self) -> usize {
        self.0.k()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.0.bytes()
    }

    /// `out[i][j] = Σ x[i] · w[j]` for `m` rows of `x`, row-major `[m, n]`,
    /// on the engine's pool.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.0.matmul(x, m, &Pool)
    }

    fn matmul_quantized(&self, a: &ganglion_kernels::Q8Rows) -> Vec<f32> {
        self.0.matmul_quantized(a, &Pool)
    }

    /// Appends row `row` (below `n`), dequantised.
    fn push_row(&self, row: usize, out: &mut Vec<f32>) {
        self.0.push_row(row, out)
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

    /// Weights per quantisation block.
    const BLOCK: usize = 32;

    /// Row widths to test `dtype` at: odd and even numbers of 32-blocks,
    /// and for K-quants one and two super-blocks.
    fn widths(dtype: GgmlDType) -> &'static [usize] {
        match dtype {
            GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K => &[256, 512],
            _ => &[96, 128, 288],
        }
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

    /// A random `n × k` matrix in `dtype` quantised by candle, its
    /// dequantised f32 values, and seven rows of activations.
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

    /// The engine's pool splits the product as the kernel's own tests do
    /// not: the same bits as one thread, and through the custom op.
    #[test]
    fn the_pool_and_the_custom_op_give_the_bits_of_one_thread() {
        for dtype in FORMATS {
            let k = widths(dtype)[0];
            let (w, _, x) = matrix(dtype, 53, k, 7);
            let ours = w.matmul(&x, 7);
            assert_eq!(
                ours,
                w.0.matmul(&x, 7, &ganglion_kernels::Serial),
                "{dtype:?}"
            );
            let t = Tensor::from_vec(x.clone(), (7, k), &candle_core::Device::Cpu).unwrap();
            let op: Vec<f32> = t
                .apply_op1_no_bwd(&w)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(op, ours, "{dtype:?}");
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
        for dtype in FORMATS {
            let (n, k) = (37, *widths(dtype).last().expect("widths"));
            let (w, exact, x) = matrix(dtype, n, k, 9);
            let ours = w.matmul(&x, 7);
            let a = quantize_rows(&x, 7, k);
            let (a_qs, a_d) = (a.values(), a.scales());
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
                            0.6 * a_d[i * (k / BLOCK) + b] as f64 * abs
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
                    let xq = |t: usize| a_qs[i * k + t] as f64 * a_d[i * kb + t / BLOCK] as f64;
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
}
