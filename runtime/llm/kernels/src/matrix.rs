//! The public matrix: GGML blocks in, the product out, its independent
//! parts handed to the caller's threads through [`Parallel`].

use crate::ggml::Format;
use crate::layout::{BLOCK, NibbleMatrix, Q8Matrix};
use crate::quantize::{Q8Rows, quantize_rows};
use std::ops::Range;

/// Why a matrix could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("a {format:?} matrix of {n}×{k} cannot be {bytes} bytes")]
    Size {
        format: Format,
        n: usize,
        k: usize,
        bytes: usize,
    },
    #[error("{0:?} is not a 4-, 5- or 6-bit format")]
    NotNibbles(Format),
}

/// Runs the independent parts of a product side by side.
///
/// # Safety
/// `run` must call `task` on disjoint ranges within `0..units` (no unit
/// twice) and return only once every call has returned: the parts write
/// their units' output columns through one shared pointer, so a unit run
/// twice at once, or a call outliving `run`, would be a data race. Units
/// left out are left at zero (wrong, but not unsound).
pub unsafe trait Parallel {
    fn run(&self, units: usize, task: &(dyn Fn(Range<usize>) + Sync));
}

/// Every part on the calling thread.
pub struct Serial;

// SAFETY: one call covering every unit, returning before `run` does.
unsafe impl Parallel for Serial {
    fn run(&self, units: usize, task: &(dyn Fn(Range<usize>) + Sync)) {
        if units > 0 {
            task(0..units);
        }
    }
}

/// A weight matrix in one of the kernel's layouts.
pub enum Matrix {
    Q8(Q8Matrix),
    Nibbles(NibbleMatrix),
}

impl Matrix {
    /// From GGML blocks of `format`, `n` rows of `k` weights.
    pub fn from_blocks(format: Format, n: usize, k: usize, bytes: &[u8]) -> Result<Matrix, Error> {
        match format {
            Format::Q8_0 => Q8Matrix::from_blocks(n, k, bytes).map(Matrix::Q8),
            _ => NibbleMatrix::from_blocks(format, n, k, bytes).map(Matrix::Nibbles),
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
    pub fn matmul(&self, x: &[f32], m: usize, parallel: &dyn Parallel) -> Vec<f32> {
        self.matmul_quantized(&quantize_rows(x, m, self.k()), parallel)
    }

    /// The product against activations already quantised (several matrices
    /// that read the same input quantise it once).
    ///
    /// # Panics
    /// If the activations' rows are not `k` wide.
    pub fn matmul_quantized(&self, a: &Q8Rows, parallel: &dyn Parallel) -> Vec<f32> {
        assert_eq!(a.k, self.k(), "activations of the wrong width");
        let m = a.rows();
        match self {
            Matrix::Q8(w) => w.matmul(a, m, parallel),
            Matrix::Nibbles(w) => w.matmul_groups(a, m, parallel),
        }
    }

    /// Appends row `row`, dequantised.
    ///
    /// # Panics
    /// If `row` is not below `n`.
    pub fn push_row(&self, row: usize, out: &mut Vec<f32>) {
        assert!(row < self.n(), "row {row} of {}", self.n());
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

/// The output pointer, shared by parts that write disjoint columns.
struct SendPtr(*mut f32);
// SAFETY: handed only to parts that write disjoint elements of one buffer
// (the [`Parallel`] contract), which outlives them.
unsafe impl Sync for SendPtr {}

/// An `m × n` product computed in `units` parts side by side;
/// `part(units, out)` writes only its units' output columns of the
/// row-major buffer `out`.
pub(crate) fn in_parts(
    m: usize,
    n: usize,
    units: usize,
    parallel: &dyn Parallel,
    part: impl Fn(Range<usize>, *mut f32) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let out_ptr = SendPtr(out.as_mut_ptr());
    parallel.run(units, &|range| {
        let out_ptr = &out_ptr;
        part(range, out_ptr.0)
    });
    out
}
