//! The repacked weight matrices: what is held in memory and how the paths
//! address it. Built once at load from GGML blocks.

use crate::ggml::{self, Format};
use crate::matrix::Error;

/// Weights per quantisation block.
pub(crate) const BLOCK: usize = 32;
/// Weight rows interleaved together in a 4- to 6-bit matrix: one lane of a
/// 512-bit vector per row.
pub(crate) const GROUP: usize = 16;
/// Bytes of values per group and block: 16 rows of 32 nibbles.
pub(crate) const GROUP_BLOCK: usize = GROUP * BLOCK / 2;
/// Q6_K's centre: weight = d·(q − 32).
pub(crate) const SIX_CENTRE: i32 = 32;

/// A Q8_0 matrix of `n` rows by `k` columns: the quantised weights row by
/// row, and each block's scale as f32.
pub struct Q8Matrix {
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) qs: Aligned,
    pub(crate) d: Vec<f32>,
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
/// per four values. A 512-bit vector takes a line whole, a 256-bit one
/// half (eight rows), a 128-bit one a quarter (four rows).
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
    pub(crate) n: usize,
    pub(crate) k: usize,
    /// 4, 5 or 6.
    pub(crate) bits: u32,
    pub(crate) qs: Aligned,
    pub(crate) qh: Vec<u64>,
    pub(crate) qh6: Vec<u64>,
    pub(crate) d: Vec<f32>,
    pub(crate) m: Vec<f32>,
    pub(crate) centre: f32,
}

/// Bytes on 64-byte boundaries, so that a row whose length is a multiple of
/// 64 never has a two-block load straddle cache lines.
pub struct Aligned {
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
        // SAFETY: `lines` holds at least `len` bytes, contiguous and
        // initialised, and `Line` is plain bytes.
        let flat = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut i8, len) };
        for (d, s) in flat.iter_mut().zip(bytes) {
            *d = s;
        }
        Aligned { lines, len }
    }

    pub(crate) fn as_slice(&self) -> &[i8] {
        // SAFETY: `lines` holds at least `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const i8, self.len) }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.lines.len() * 64
    }
}

impl std::ops::Index<std::ops::Range<usize>> for Aligned {
    type Output = [i8];
    fn index(&self, r: std::ops::Range<usize>) -> &[i8] {
        &self.as_slice()[r]
    }
}

/// Whether `bytes` can be `n` rows of `k` weights of `format`.
fn check(format: Format, n: usize, k: usize, bytes: &[u8]) -> Result<(), Error> {
    let per = format.block_weights();
    let fits = k.is_multiple_of(per)
        && n.checked_mul(k / per)
            .and_then(|b| b.checked_mul(format.block_bytes()))
            == Some(bytes.len());
    if fits {
        Ok(())
    } else {
        Err(Error::Size {
            format,
            n,
            k,
            bytes: bytes.len(),
        })
    }
}

impl Q8Matrix {
    /// From GGML Q8_0 blocks (2-byte f16 scale, 32 signed bytes).
    pub(crate) fn from_blocks(n: usize, k: usize, bytes: &[u8]) -> Result<Q8Matrix, Error> {
        check(Format::Q8_0, n, k, bytes)?;
        let d = bytes.chunks_exact(34).map(ggml::q8_scale).collect();
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
    /// From GGML blocks of `format`, `n` rows of `k` (see [`ggml::block`]).
    pub(crate) fn from_blocks(
        format: Format,
        n: usize,
        k: usize,
        bytes: &[u8],
    ) -> Result<NibbleMatrix, Error> {
        if format == Format::Q8_0 {
            return Err(Error::NotNibbles(format));
        }
        check(format, n, k, bytes)?;
        let (bits, centre) = (format.bits(), format.centre());
        let halves = if bits == 6 { 2 } else { 1 };
        let kb = k / BLOCK;
        let cells = n.div_ceil(GROUP) * kb;
        let mut qs = vec![0u8; cells * GROUP_BLOCK];
        let mut qh = vec![0u64; if bits >= 5 { cells * 8 } else { 0 }];
        let mut qh6 = vec![0u64; if bits == 6 { cells * 8 } else { 0 }];
        let mut d = vec![0f32; cells * GROUP * halves];
        let mut m = vec![0f32; if centre.is_none() { cells * GROUP } else { 0 }];
        let mut q = [0u8; BLOCK];
        let row_bytes = k / format.block_weights() * format.block_bytes();
        for (row, blocks) in bytes.chunks_exact(row_bytes.max(1)).enumerate() {
            let (g, r) = (row / GROUP, row % GROUP);
            for b in 0..kb {
                let cell = g * kb + b;
                let (scales, offset) = ggml::block(format, blocks, b, &mut q);
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
    pub(crate) fn offsets(&self) -> (&[f32], f32) {
        if self.m.is_empty() {
            (&self.d, -self.centre)
        } else {
            (&self.m, 1.0)
        }
    }

    pub(crate) fn groups(&self) -> usize {
        self.n.div_ceil(GROUP)
    }

    /// Index of row `row`'s entry for block `b` in `m` (and in `d`,
    /// except for Q6: see [`NibbleMatrix::scale_at`]).
    pub(crate) fn at(&self, row: usize, b: usize) -> usize {
        (row / GROUP * (self.k / BLOCK) + b) * GROUP + row % GROUP
    }

    /// Index in `d` of the scale of element `t` of block `b` in row `row`.
    pub(crate) fn scale_at(&self, row: usize, b: usize, t: usize) -> usize {
        if self.bits == 6 {
            ((row / GROUP * (self.k / BLOCK) + b) * 2 + t / 16) * GROUP + row % GROUP
        } else {
            self.at(row, b)
        }
    }

    /// q of element `t` of block `b` in row `row`.
    pub(crate) fn value(&self, row: usize, b: usize, t: usize) -> u8 {
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
