//! Every path against a scalar model of its arithmetic, bit for bit; batch
//! and thread-split invariance; the layout's size and dequantised rows.
//! Weights are random GGML blocks (any bytes are valid values; scales are
//! set to sane f16), so no tensor library is needed and the tests run
//! under qemu for aarch64.

use crate::dispatch::{self, Path, path};
use crate::ggml::{self, Format, f16_to_f32, f32_to_f16};
use crate::layout::{BLOCK, GROUP, SIX_CENTRE};
use crate::matrix::{Matrix, Parallel, Serial};
use crate::quantize::{Q8Rows, quantize_rows};
use crate::scalar::hsum;
use crate::tile::{Q8Tile, RowTile};
use std::ops::Range;

/// Row widths to test `format` at: odd and even numbers of 32-blocks, and
/// for K-quants one and two super-blocks.
fn widths(format: Format) -> &'static [usize] {
    match format {
        Format::Q4K | Format::Q5K | Format::Q6K => &[256, 512],
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

/// `n × k` weights of `format` as GGML blocks: random bytes (every byte
/// pattern is a valid set of values and K-quant sub-scales), with the f16
/// scales and offsets set to small finite values.
fn blocks(format: Format, n: usize, k: usize, seed: u32) -> Vec<u8> {
    let (size, count) = (format.block_bytes(), n * k / format.block_weights());
    let mut state = seed.wrapping_mul(2654435761) | 1;
    let mut bytes: Vec<u8> = (0..size * count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect();
    let scales = numbers(seed ^ 0x5eed, 2 * count, 1.0);
    for (blk, s) in bytes.chunks_exact_mut(size).zip(scales.chunks_exact(2)) {
        let d = f32_to_f16(0.002 + 0.02 * s[0].abs()).to_le_bytes();
        let m = f32_to_f16(0.1 * s[1]).to_le_bytes();
        let at = if format == Format::Q6K { 208 } else { 0 };
        blk[at..at + 2].copy_from_slice(&d);
        if matches!(
            format,
            Format::Q4_1 | Format::Q5_1 | Format::Q4K | Format::Q5K
        ) {
            blk[2..4].copy_from_slice(&m);
        }
    }
    bytes
}

/// A random `n × k` matrix of `format` and `rows` rows of activations.
fn matrix(format: Format, n: usize, k: usize, rows: usize, seed: u32) -> (Matrix, Vec<f32>) {
    let w = Matrix::from_blocks(format, n, k, &blocks(format, n, k, seed)).expect("sizes fit");
    (w, numbers(seed + 1, rows * k, 3.0))
}

/// Element (i, j) of the product of activation row i and weight row j, in
/// the arithmetic `crate::scalar` describes; `wide` for AVX-512's Q8_0.
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

/// The paths this CPU has.
fn paths() -> Vec<Path> {
    Path::ALL.into_iter().filter(|p| p.available()).collect()
}

/// Parts on `threads` scoped threads, units dealt round-robin in ones, so
/// that neighbouring columns come from different threads.
struct Threads(usize);

// SAFETY: each unit goes to exactly one call, and the scope joins every
// thread before `run` returns.
unsafe impl Parallel for Threads {
    fn run(&self, units: usize, task: &(dyn Fn(Range<usize>) + Sync)) {
        std::thread::scope(|s| {
            for t in 0..self.0 {
                s.spawn(move || {
                    for u in (t..units).step_by(self.0) {
                        task(u..u + 1);
                    }
                });
            }
        });
    }
}

#[test]
fn path_order_is_the_discriminant_order() {
    for (i, p) in Path::ALL.into_iter().enumerate() {
        assert_eq!(p as usize, i, "{p:?}");
    }
    assert!(path().available());
    #[cfg(target_arch = "aarch64")]
    assert!(matches!(path(), Path::Neon | Path::NeonDot));
    // Set by `cargo run -p xtask -- aarch64`, so that a qemu CPU model
    // that does not give the path it is meant to test fails here.
    if let Ok(want) = std::env::var("GANGLION_KERNELS_PATH") {
        assert_eq!(path().name(), want);
    }
}

#[test]
fn f16_conversions_are_halfs() {
    for h in 0..=u16::MAX {
        let ours = f16_to_f32(h);
        let theirs = half::f16::from_bits(h).to_f32();
        if theirs.is_nan() {
            assert!(ours.is_nan(), "{h:#06x}");
        } else {
            assert_eq!(ours.to_bits(), theirs.to_bits(), "{h:#06x}");
        }
    }
    // Every f32 exponent, a stride through the significands, and the
    // values either side of each f16 rounding boundary.
    let mut checked = 0;
    for bits in (0..=u32::MAX)
        .step_by(4093)
        .chain((0..=u16::MAX).flat_map(|h| {
            let x = half::f16::from_bits(h).to_f32().to_bits();
            let mid = x.wrapping_add(1 << 12);
            [x, mid.wrapping_sub(1), mid, mid.wrapping_add(1)]
        }))
    {
        let x = f32::from_bits(bits);
        let (ours, theirs) = (f32_to_f16(x), half::f16::from_f32(x).to_bits());
        if x.is_nan() {
            assert!(f16_to_f32(ours).is_nan(), "{bits:#010x}");
        } else {
            assert_eq!(ours, theirs, "{x:e} ({bits:#010x})");
        }
        checked += 1;
    }
    assert!(checked > 1_000_000);
}

#[test]
fn each_element_is_the_same_whatever_the_tile_rows_and_threads() {
    // 3 and 9 blocks: the odd last block of the two-block paths, and
    // block sums padded past one group of eight.
    for format in Format::ALL {
        for &k in widths(format) {
            let (w, x) = matrix(format, 37, k, 7, 3);
            let all = w.matmul(&x, 7, &Serial);
            assert_eq!(all, w.matmul(&x, 7, &Threads(3)), "{format:?} k {k}");
            let a = quantize_rows(&x, 7, k);
            for i in 0..7 {
                let alone = w.matmul(&x[i * k..(i + 1) * k], 1, &Threads(2));
                assert_eq!(alone, all[i * 37..(i + 1) * 37], "{format:?} k {k} row {i}");
                for j in 0..37 {
                    assert_eq!(
                        all[i * 37 + j],
                        model(&w, &a, i, j, path() == Path::Avx512),
                        "{format:?} {} k {k} ({i}, {j})",
                        path().name()
                    );
                }
            }
        }
    }
}

/// One Q8_0 tile of `R` weight rows by `C` activation rows on `p`, against
/// the scalar model.
fn check_q8_tile<const R: usize, const C: usize>(p: Path, k: usize) {
    let (w, x) = matrix(Format::Q8_0, R, k, C, 5);
    let a = quantize_rows(&x, C, k);
    let Matrix::Q8(m) = &w else {
        panic!("Q8_0 is held as Q8_0");
    };
    let kb = k / BLOCK;
    let rows = RowTile::<R> {
        qs: std::array::from_fn(|i| &m.qs[i * k..(i + 1) * k]),
        d: std::array::from_fn(|i| &m.d[i * kb..(i + 1) * kb]),
    };
    let a_qs: [&[i8]; C] = std::array::from_fn(|j| &a.qs[j * k..(j + 1) * k]);
    let a_d: [&[f32]; C] = std::array::from_fn(|j| &a.d[j * kb..(j + 1) * kb]);
    let out = dispatch::dot_tile::<R, C>(p, kb, &rows, &a_qs, &a_d);
    for (j, row) in out.iter().enumerate() {
        for (i, &v) in row.iter().enumerate() {
            assert_eq!(
                v,
                model(&w, &a, j, i, p == Path::Avx512),
                "Q8_0 {} k {k} ({j}, {i})",
                p.name()
            );
        }
    }
}

/// Every Q8_0 path this CPU has, the portable one included, called
/// directly at the tile shapes the product uses.
#[test]
fn each_q8_path_this_cpu_has_matches_the_scalar_model() {
    for p in paths() {
        for &k in widths(Format::Q8_0) {
            check_q8_tile::<4, 2>(p, k);
            check_q8_tile::<8, 1>(p, k);
            check_q8_tile::<3, 4>(p, k);
        }
    }
}

/// `R` groups (the last partly padding: 16·R − 11 rows) against `C`
/// activation rows on `p`, against the scalar model.
fn check_groups<const R: usize, const C: usize>(p: Path, format: Format, k: usize) {
    let n = GROUP * R - 11;
    let (w, x) = matrix(format, n, k, C, 5);
    let Matrix::Nibbles(nib) = &w else {
        panic!("{format:?} is not held as nibbles");
    };
    let a = quantize_rows(&x, C, k);
    let (wt, at) = (nib.group_tile::<R>(0), Q8Tile::<C>::new(&a, 0));
    let out = match nib.bits {
        4 => dispatch::dot_groups::<R, C, 4>(p, k / BLOCK, &wt, &at),
        5 => dispatch::dot_groups::<R, C, 5>(p, k / BLOCK, &wt, &at),
        _ => dispatch::dot_groups::<R, C, 6>(p, k / BLOCK, &wt, &at),
    };
    for (j, groups) in out.iter().enumerate() {
        for row in 0..n {
            assert_eq!(
                groups[row / GROUP][row % GROUP],
                model(&w, &a, j, row, false),
                "{format:?} {} k {k} ({j}, {row})",
                p.name()
            );
        }
    }
}

/// Every 4-, 5- and 6-bit path this CPU has, the portable one included,
/// called directly: all give the same bits.
#[test]
fn each_group_path_this_cpu_has_matches_the_scalar_model() {
    for p in paths() {
        for format in &Format::ALL[1..] {
            for &k in widths(*format) {
                check_groups::<2, 3>(p, *format, k);
                check_groups::<2, 1>(p, *format, k);
                check_groups::<1, 8>(p, *format, k);
            }
        }
    }
}

/// Dequantised rows against each GGML block decoded directly (the
/// layout's addressing), and a row index outside the table refused.
#[test]
fn rows_dequantise_as_their_blocks() {
    for format in Format::ALL {
        let (n, k) = (19, widths(format)[0]);
        let bytes = blocks(format, n, k, 11);
        let w = Matrix::from_blocks(format, n, k, &bytes).expect("sizes fit");
        let row_bytes = bytes.len() / n;
        for row in [0, 7, 16, 18] {
            let mut ours = Vec::new();
            w.push_row(row, &mut ours);
            let src = &bytes[row * row_bytes..][..row_bytes];
            let mut want = Vec::new();
            for b in 0..k / BLOCK {
                if format == Format::Q8_0 {
                    let blk = &src[b * 34..][..34];
                    let d = ggml::q8_scale(blk);
                    want.extend(blk[2..].iter().map(|&q| q as i8 as f32 * d));
                    continue;
                }
                let mut q = [0u8; BLOCK];
                let ([d0, d1], m) = ggml::block(format, src, b, &mut q);
                want.extend(q.iter().enumerate().map(|(t, &v)| match format.centre() {
                    Some(c) if format == Format::Q6K => {
                        (if t < 16 { d0 } else { d1 }) * (v as f32 - c)
                    }
                    Some(c) => d0.mul_add(v as f32, -c * d0),
                    None => d0.mul_add(v as f32, m),
                }));
            }
            assert_eq!(ours, want, "{format:?} row {row}");
        }
        let refused = std::panic::catch_unwind(|| w.push_row(n, &mut Vec::new()));
        assert!(refused.is_err(), "{format:?}");
    }
}

/// Q4_1 holds 24 bytes per 32 weights (16 of values, f32 scale and
/// offset), against 36 for Q8_0 and 20 in the file; Q5 adds 4 bytes of
/// fifth bits; Q4_0 and Q5_0 keep no offsets. Rows are padded to whole
/// groups of sixteen.
#[test]
fn four_to_six_bit_weights_stay_small() {
    // (format, rows, columns, bytes per 32 weights); Q5_1's 60 rows pad to
    // 64.
    for (format, rows, cols, per_block) in [
        (Format::Q4_1, 64, 576, 24),
        (Format::Q4_0, 64, 576, 20),
        (Format::Q5_0, 64, 576, 24),
        (Format::Q5_1, 60, 576, 28),
        (Format::Q8_0, 64, 576, 32 + 4),
        (Format::Q4K, 64, 512, 24),
        (Format::Q5K, 64, 512, 28),
        (Format::Q6K, 64, 512, 32),
    ] {
        let (w, _) = matrix(format, rows, cols, 1, 2);
        assert_eq!(w.bytes(), 64 * cols / BLOCK * per_block, "{format:?}");
    }
}

#[test]
fn wrong_sizes_are_refused() {
    for format in Format::ALL {
        let k = format.block_weights();
        let bytes = vec![0u8; 3 * format.block_bytes()];
        assert!(Matrix::from_blocks(format, 3, k, &bytes).is_ok());
        assert!(Matrix::from_blocks(format, 2, k, &bytes).is_err());
        assert!(Matrix::from_blocks(format, 3, k + 16, &bytes).is_err());
    }
    assert!(Matrix::from_blocks(Format::Q4_0, usize::MAX, 32, &[]).is_err());
}

/// The paths this CPU has side by side, in GMAC/s, on one thread. It
/// switches the process-wide path, so it runs alone: `cargo test -p
/// ganglion-kernels kernel_speed -- --ignored --nocapture` (the dev
/// profile optimises this crate). `GANGLION_KERNEL_SPEED=quick`: the two
/// small shapes, 1 and 8 rows, a hundredth of the work, for runs under
/// qemu, whose figures are emulation speed, not the hardware's.
#[test]
#[ignore]
fn kernel_speed() {
    let quick = std::env::var("GANGLION_KERNEL_SPEED").is_ok_and(|v| v == "quick");
    let formats = [
        Format::Q8_0,
        Format::Q4_0,
        Format::Q4_1,
        Format::Q5_0,
        Format::Q4K,
        Format::Q6K,
    ];
    let shapes: &[(usize, usize)] = if quick {
        &[(1536, 576), (576, 1536)]
    } else {
        &[(1536, 576), (576, 1536), (49152, 576)]
    };
    let (rows, work, rounds): (&[usize], usize, usize) = if quick {
        (&[1, 8], 1_000_000, 3)
    } else {
        (&[1, 8, 64], 100_000_000, 5)
    };
    for format in formats {
        for &(n, k) in shapes {
            let k = k.next_multiple_of(format.block_weights());
            let (w, _) = matrix(format, n, k, 1, 1);
            for &m in rows {
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
                let reps = work / (n * k * m).max(1) + 1;
                let mut best = vec![0f64; Path::ALL.len()];
                // The portable path last, so that the SIMD paths follow
                // each other as they did before it existed.
                let order = paths().into_iter().cycle().skip(1).take(paths().len());
                for _ in 0..rounds {
                    for p in order.clone() {
                        assert!(dispatch::force(Some(p)));
                        let t = std::time::Instant::now();
                        for _ in 0..reps {
                            std::hint::black_box(w.matmul(&x, m, &Serial));
                        }
                        let g = (n * k * m * reps) as f64 / t.elapsed().as_secs_f64() / 1e9;
                        best[p as usize] = best[p as usize].max(g);
                    }
                }
                dispatch::force(None);
                let line: Vec<String> = paths()
                    .into_iter()
                    .map(|p| format!("{} {:.2}", p.name(), best[p as usize]))
                    .collect();
                eprintln!("{format:?} n {n} k {k} m {m}: GMAC/s {}", line.join(" "));
            }
        }
    }
}
