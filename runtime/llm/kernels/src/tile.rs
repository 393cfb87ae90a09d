//! A product cut into tiles of weight rows against activation rows, each
//! tile's dot products left to the path [`crate::dispatch`] picks. Q8_0
//! runs in tiles of 4 × 4 rows (8 × 1 for one activation row); the 4- to
//! 6-bit formats in tiles of whole groups of 16 rows against up to 8
//! activation rows.

use crate::dispatch::{self, path};
use crate::layout::{BLOCK, GROUP, GROUP_BLOCK, NibbleMatrix, Q8Matrix};
use crate::matrix::{Parallel, in_parts};
use crate::quantize::Q8Rows;
use std::ops::Range;

/// Weight rows per Q8_0 tile.
const TILE_ROWS: usize = 4;
/// Activation rows per Q8_0 tile.
const TILE_COLS: usize = 4;

/// `R` groups of a [`NibbleMatrix`] from their first block: values, fifth
/// and sixth bits (empty where the format has none), scales, offsets (or
/// scales; empty for Q6) and their factor ([`NibbleMatrix::offsets`]).
pub(crate) struct GroupTile<'a, const R: usize> {
    pub(crate) qs: [&'a [i8]; R],
    pub(crate) qh: [&'a [u64]; R],
    pub(crate) qh6: [&'a [u64]; R],
    pub(crate) d: [&'a [f32]; R],
    pub(crate) m: [&'a [f32]; R],
    pub(crate) factor: f32,
}

/// `C` rows of [`Q8Rows`]: values, scales, block sums, half-block integer
/// sums.
pub(crate) struct Q8Tile<'a, const C: usize> {
    pub(crate) qs: [&'a [i8]; C],
    pub(crate) d: [&'a [f32]; C],
    pub(crate) s: [&'a [f32]; C],
    pub(crate) h: [&'a [i32]; C],
}

/// `R` Q8_0 weight rows and their scales.
pub(crate) struct RowTile<'a, const R: usize> {
    pub(crate) qs: [&'a [i8]; R],
    pub(crate) d: [&'a [f32]; R],
}

impl Q8Matrix {
    /// The product against `m` quantised activation rows, in parts of
    /// [`TILE_ROWS`] weight rows.
    pub(crate) fn matmul(&self, a: &Q8Rows, m: usize, parallel: &dyn Parallel) -> Vec<f32> {
        let n = self.n;
        in_parts(m, n, n.div_ceil(TILE_ROWS), parallel, |range, out| {
            let first = range.start * TILE_ROWS;
            let last = (range.end * TILE_ROWS).min(n);
            // SAFETY: `Parallel` hands out disjoint ranges, so parts write
            // disjoint weight rows (output columns) of the `m × n` buffer.
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
                // SAFETY: columns r..r + 8 are within first..last.
                unsafe { self.tile::<{ 2 * TILE_ROWS }, 1>(a, r, 0, out) };
                r += 2 * TILE_ROWS;
            }
        }
        while r < last {
            let rows = (last - r).min(TILE_ROWS);
            let mut c = 0;
            while c < m {
                let cols = (m - c).min(TILE_COLS);
                // SAFETY: columns r..r + rows are within first..last, and
                // activation rows c..c + cols within 0..m.
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

    /// Output columns `r..r + R` for activation rows `c..c + C`.
    ///
    /// # Safety
    /// `out` is the `m × n` buffer, those elements are inside it, and
    /// nothing else writes them meanwhile.
    #[inline(always)]
    unsafe fn tile<const R: usize, const C: usize>(
        &self,
        a: &Q8Rows,
        r: usize,
        c: usize,
        out: *mut f32,
    ) {
        let kb = self.k / BLOCK;
        let w = RowTile::<R> {
            qs: std::array::from_fn(|i| &self.qs[(r + i) * self.k..(r + i + 1) * self.k]),
            d: std::array::from_fn(|i| &self.d[(r + i) * kb..][..kb]),
        };
        let a_qs: [&[i8]; C] = std::array::from_fn(|j| &a.qs[(c + j) * self.k..][..self.k]);
        let a_d: [&[f32]; C] = std::array::from_fn(|j| &a.d[(c + j) * kb..][..kb]);
        let sums = dispatch::dot_tile(path(), kb, &w, &a_qs, &a_d);
        for (j, row) in sums.iter().enumerate() {
            for (i, &v) in row.iter().enumerate() {
                // SAFETY: (c + j, r + i) is inside the caller's buffer and
                // columns, and written once.
                unsafe { *out.add((c + j) * self.n + r + i) = v };
            }
        }
    }
}

impl NibbleMatrix {
    pub(crate) fn matmul_groups(&self, a: &Q8Rows, m: usize, parallel: &dyn Parallel) -> Vec<f32> {
        in_parts(m, self.n, self.groups(), parallel, |groups, out| {
            // SAFETY: `Parallel` hands out disjoint ranges, so parts write
            // disjoint groups of output columns of the `m × n` buffer.
            unsafe { self.groups_into(a, m, groups, out) };
        })
    }

    /// Output columns of `groups` for all `m` activation rows: a decode
    /// step takes two groups per tile; more rows take one group against up
    /// to eight of them (four on 256- and 128-bit paths, which have fewer
    /// registers for the accumulators), unpacking each weight line once
    /// for all of them.
    ///
    /// # Safety
    /// As [`NibbleMatrix::tile`], for every group in `groups`.
    unsafe fn groups_into(&self, a: &Q8Rows, m: usize, groups: Range<usize>, out: *mut f32) {
        let mut g = groups.start;
        if m == 1 {
            while g + 2 <= groups.end {
                // SAFETY: groups g and g + 1 are in `groups`.
                unsafe { self.tile::<2, 1>(a, g, 0, out) };
                g += 2;
            }
        }
        let widest = path().widest();
        for g in g..groups.end {
            let mut c = 0;
            while c < m {
                let cols = (m - c).min(widest);
                // SAFETY: group g is in `groups`, activation rows c..c +
                // cols within 0..m.
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

    /// Groups `g..g + R` of the matrix as a tile.
    pub(crate) fn group_tile<'a, const R: usize>(&'a self, g: usize) -> GroupTile<'a, R> {
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
        GroupTile {
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
        }
    }

    /// Output columns of groups `g..g + R` for activation rows `c..c + C`.
    ///
    /// # Safety
    /// `out` is the `m × n` buffer, those elements are inside it, and
    /// nothing else writes them meanwhile.
    #[inline(always)]
    unsafe fn tile<const R: usize, const C: usize>(
        &self,
        a: &Q8Rows,
        g: usize,
        c: usize,
        out: *mut f32,
    ) {
        let w = self.group_tile::<R>(g);
        let a = Q8Tile::<C>::new(a, c);
        let sums = match self.bits {
            4 => dispatch::dot_groups::<R, C, 4>(path(), self.k / BLOCK, &w, &a),
            5 => dispatch::dot_groups::<R, C, 5>(path(), self.k / BLOCK, &w, &a),
            _ => dispatch::dot_groups::<R, C, 6>(path(), self.k / BLOCK, &w, &a),
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

impl<'a, const C: usize> Q8Tile<'a, C> {
    /// Activation rows `c..c + C`.
    pub(crate) fn new(a: &'a Q8Rows, c: usize) -> Q8Tile<'a, C> {
        let (k, kb) = (a.k, a.k / BLOCK);
        Q8Tile {
            qs: std::array::from_fn(|j| &a.qs[(c + j) * k..][..k]),
            d: std::array::from_fn(|j| &a.d[(c + j) * kb..][..kb]),
            s: std::array::from_fn(|j| &a.s[(c + j) * kb..][..kb]),
            h: std::array::from_fn(|j| &a.h[(c + j) * kb * 2..][..kb * 2]),
        }
    }
}
