//! The GGML block formats the kernel takes, decoded one block of 32
//! weights at a time, and the f16 conversions their scales need (written
//! here rather than taken from a crate, to keep the crate free of
//! dependencies; checked against `half` in the tests).

use crate::layout::BLOCK;

/// A GGML weight format the kernel takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4K,
    Q5K,
    Q6K,
}

impl Format {
    /// Every format, Q8_0 first.
    pub const ALL: [Format; 8] = [
        Format::Q8_0,
        Format::Q4_0,
        Format::Q4_1,
        Format::Q5_0,
        Format::Q5_1,
        Format::Q4K,
        Format::Q5K,
        Format::Q6K,
    ];

    /// Weights per GGML block (a K-quant's super-block is 256).
    pub fn block_weights(self) -> usize {
        match self {
            Format::Q4K | Format::Q5K | Format::Q6K => 256,
            _ => BLOCK,
        }
    }

    /// Bytes per GGML block.
    pub fn block_bytes(self) -> usize {
        match self {
            Format::Q8_0 => 34,
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q5_0 => 22,
            Format::Q5_1 => 24,
            Format::Q4K => 144,
            Format::Q5K => 176,
            Format::Q6K => 210,
        }
    }

    /// Bits per weight value once decoded: 8, 4, 5 or 6.
    pub(crate) fn bits(self) -> u32 {
        match self {
            Format::Q8_0 => 8,
            Format::Q4_0 | Format::Q4_1 | Format::Q4K => 4,
            Format::Q5_0 | Format::Q5_1 | Format::Q5K => 5,
            Format::Q6K => 6,
        }
    }

    /// The centre c of a format without offsets (weight = d·(q − c)).
    pub(crate) fn centre(self) -> Option<f32> {
        match self {
            Format::Q4_0 => Some(8.0),
            Format::Q5_0 => Some(16.0),
            Format::Q6K => Some(32.0),
            _ => None,
        }
    }
}

/// f16 bits to f32, exactly.
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from(h >> 10 & 0x1F);
    let man = u32::from(h & 0x3FF);
    match exp {
        0 => {
            // Zero or subnormal: man · 2⁻²⁴, exact in f32.
            let v = man as f32 * f32::from_bits(0x3380_0000);
            f32::from_bits(v.to_bits() | sign)
        }
        0x1F if man != 0 => f32::from_bits(sign | 0x7FC0_0000 | man << 13),
        0x1F => f32::from_bits(sign | 0x7F80_0000),
        _ => f32::from_bits(sign | (exp + 112) << 23 | man << 13),
    }
}

/// f32 to f16 bits, rounded to nearest, ties to even (as GGML and `half`
/// round).
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = (b >> 16 & 0x8000) as u16;
    let exp = (b >> 23 & 0xFF) as i32;
    let man = b & 0x7F_FFFF;
    if exp == 0xFF {
        let nan = if man != 0 {
            0x200 | (man >> 13) as u16
        } else {
            0
        };
        return sign | 0x7C00 | nan;
    }
    let e = exp - 127 + 15;
    if e >= 0x1F {
        return sign | 0x7C00;
    }
    let (value, shift) = if e <= 0 {
        // An f16 subnormal (or zero): the value in units of 2⁻²⁴ is the
        // full significand shifted right by 14 − e.
        if e < -10 {
            return sign;
        }
        (man | 0x80_0000, (14 - e) as u32)
    } else {
        ((e as u32) << 23 | man, 13)
    };
    let half = 1u32 << (shift - 1);
    let rem = value & ((1 << shift) - 1);
    let mut r = value >> shift;
    // A carry out of the significand moves into the exponent, which is the
    // right result up to and including infinity.
    if rem > half || (rem == half && r & 1 == 1) {
        r += 1;
    }
    sign | r as u16
}

/// f16 at the start of `at`, little-endian.
fn f16(at: &[u8]) -> f32 {
    f16_to_f32(u16::from_le_bytes([at[0], at[1]]))
}

/// Block `b` (32 weights) of a row of `format` bytes: its values with the
/// fifth and sixth bits (0..64) into `q`, and ([d, d'], m) with weight =
/// d·q + m for the first 16 weights and d'·q + m for the others (d' = d
/// but for Q6_K; m is not used for Q4_0, Q5_0 and Q6_K, whose offsets are
/// −8·d, −16·d and −32·d). Not for Q8_0, which is not repacked by value.
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
pub(crate) fn block(format: Format, row: &[u8], b: usize, q: &mut [u8; BLOCK]) -> ([f32; 2], f32) {
    match format {
        Format::Q6K => {
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
        Format::Q4K | Format::Q5K => {
            let five = format == Format::Q5K;
            let size = format.block_bytes();
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
            let (offset_at, high_at) = match format {
                Format::Q4_0 => (None, None),
                Format::Q4_1 => (Some(2), None),
                Format::Q5_0 => (None, Some(2)),
                _ => (Some(2), Some(4)),
            };
            let size = format.block_bytes();
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

/// The f32 scale of Q8_0 block `blk` (34 bytes).
pub(crate) fn q8_scale(blk: &[u8]) -> f32 {
    f16(blk)
}
