//! Which instruction path this CPU takes, detected once at run time, and
//! the checks that make calling a path's `unsafe` code sound: the path's
//! CPU features are asserted present and every slice the path reads
//! through raw pointers is asserted long enough, once per tile.

use crate::layout::{BLOCK, GROUP, GROUP_BLOCK};
use crate::scalar;
use crate::tile::{GroupTile, Q8Tile, RowTile};

/// An instruction path of the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// Plain Rust, on every CPU the others do not cover.
    Portable,
    /// x86-64 with AVX2 and FMA.
    Avx2,
    /// x86-64 with AVX-VNNI (VNNI on 256-bit vectors, no AVX-512).
    Vnni256,
    /// x86-64 with AVX-512 F, BW, VL and VNNI.
    Avx512,
    /// aarch64 NEON.
    Neon,
    /// aarch64 NEON with the dotprod extension (`sdot`).
    NeonDot,
}

impl Path {
    /// Every path, the portable one first.
    pub const ALL: [Path; 6] = [
        Path::Portable,
        Path::Avx2,
        Path::Vnni256,
        Path::Avx512,
        Path::Neon,
        Path::NeonDot,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Path::Portable => "portable",
            Path::Avx2 => "avx2",
            Path::Vnni256 => "avx-vnni",
            Path::Avx512 => "avx512-vnni",
            Path::Neon => "neon",
            Path::NeonDot => "neon-dotprod",
        }
    }

    /// Whether this CPU has the path's features.
    pub fn available(self) -> bool {
        match self {
            Path::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Path::Vnni256 => Path::Avx2.available() && is_x86_feature_detected!("avxvnni"),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => {
                Path::Avx2.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            Path::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Path::NeonDot => {
                Path::Neon.available() && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[allow(unreachable_patterns, reason = "the other arches' paths")]
            _ => false,
        }
    }

    /// Activation rows per 4- to 6-bit tile: AVX-512 has 32 registers of
    /// 16 lanes for the accumulators, the others hold a group's 16 rows in
    /// two or four registers each.
    pub(crate) fn widest(self) -> usize {
        if self == Path::Avx512 { 8 } else { 4 }
    }
}

/// Set by the side-by-side speed test only: 0 detect, else 1 + the index
/// in [`Path::ALL`].
#[cfg(test)]
static FORCED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Makes [`path`] return `p` (None: the detected path again), if this CPU
/// has it.
#[cfg(test)]
pub(crate) fn force(p: Option<Path>) -> bool {
    let code = match p {
        Some(p) if !p.available() => return false,
        Some(p) => 1 + Path::ALL.iter().position(|&q| q == p).unwrap_or(0) as u8,
        None => 0,
    };
    FORCED.store(code, std::sync::atomic::Ordering::Relaxed);
    true
}

/// The path this CPU takes: the widest it has.
pub fn path() -> Path {
    use std::sync::OnceLock;
    static PATH: OnceLock<Path> = OnceLock::new();
    #[cfg(test)]
    if let Some(i) = FORCED
        .load(std::sync::atomic::Ordering::Relaxed)
        .checked_sub(1)
    {
        return Path::ALL[i as usize];
    }
    *PATH.get_or_init(|| {
        [
            Path::Avx512,
            Path::Vnni256,
            Path::Avx2,
            Path::NeonDot,
            Path::Neon,
        ]
        .into_iter()
        .find(|p| p.available())
        .unwrap_or(Path::Portable)
    })
}

/// [`Path::available`], detected once: the checks run once per tile.
fn usable(p: Path) -> bool {
    use std::sync::OnceLock;
    static MASK: OnceLock<u8> = OnceLock::new();
    let mask = MASK.get_or_init(|| {
        Path::ALL
            .iter()
            .enumerate()
            .filter(|(_, p)| p.available())
            .fold(0, |mask, (i, _)| mask | 1 << i)
    });
    mask & 1 << (p as u8) != 0
}

/// The dot products of `R` Q8_0 weight rows with `C` activation rows, on
/// `path`, `[column][row]`.
///
/// # Panics
/// If this CPU lacks `path`, or a slice holds fewer than `kb` blocks.
#[inline(always)]
pub(crate) fn dot_tile<const R: usize, const C: usize>(
    path: Path,
    kb: usize,
    w: &RowTile<R>,
    a_qs: &[&[i8]; C],
    a_d: &[&[f32]; C],
) -> [[f32; R]; C] {
    assert!(
        w.qs.iter().chain(a_qs).all(|q| q.len() >= kb * BLOCK)
            && w.d.iter().chain(a_d).all(|d| d.len() >= kb),
        "a Q8_0 tile shorter than {kb} blocks"
    );
    assert!(usable(path), "this CPU has no {} path", path.name());
    let (w_qs, w_d) = (&w.qs, &w.d);
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path's features were asserted present and every
        // slice at least `kb` blocks long, just above.
        Path::Avx2 => unsafe { crate::x86::avx2::dot_tile::<R, C>(kb, w_qs, w_d, a_qs, a_d) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Path::Vnni256 => unsafe { crate::x86::vnni::dot_tile::<R, C>(kb, w_qs, w_d, a_qs, a_d) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Path::Avx512 => unsafe { crate::x86::avx512::dot_tile::<R, C>(kb, w_qs, w_d, a_qs, a_d) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Path::Neon => unsafe { crate::arm::neon::dot_tile::<R, C>(kb, w_qs, w_d, a_qs, a_d) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Path::NeonDot => unsafe { crate::arm::dotprod::dot_tile::<R, C>(kb, w_qs, w_d, a_qs, a_d) },
        _ => scalar::dot_tile::<R, C>(kb, w_qs, w_d, a_qs, a_d),
    }
}

/// The dot products of `R` groups of `BITS`-bit (4, 5 or 6) weight rows
/// with `C` activation rows, on `path`, `[column][group][row in group]`.
///
/// # Panics
/// If this CPU lacks `path`, or a slice is shorter than `kb` blocks of
/// its table.
#[inline(always)]
pub(crate) fn dot_groups<const R: usize, const C: usize, const BITS: u32>(
    path: Path,
    kb: usize,
    w: &GroupTile<R>,
    a: &Q8Tile<C>,
) -> [[[f32; GROUP]; R]; C] {
    let scales = if BITS == 6 {
        2 * kb * GROUP
    } else {
        kb * GROUP
    };
    let weights = (0..R).all(|i| {
        w.qs[i].len() >= kb * GROUP_BLOCK
            && (BITS < 5 || w.qh[i].len() >= kb * 8)
            && (BITS < 6 || w.qh6[i].len() >= kb * 8)
            && w.d[i].len() >= scales
            && (BITS == 6 || w.m[i].len() >= kb * GROUP)
    });
    let activations = (0..C).all(|j| {
        a.qs[j].len() >= kb * BLOCK
            && a.d[j].len() >= kb
            && a.s[j].len() >= kb
            && a.h[j].len() >= 2 * kb
    });
    assert!(
        BITS >= 4 && BITS <= 6 && weights && activations,
        "a {BITS}-bit tile shorter than {kb} blocks"
    );
    assert!(usable(path), "this CPU has no {} path", path.name());
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path's features were asserted present and every
        // table at least `kb` blocks long, just above.
        Path::Avx2 => unsafe { crate::x86::avx2::dot_groups::<R, C, BITS>(kb, w, a) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Path::Vnni256 => unsafe { crate::x86::vnni::dot_groups::<R, C, BITS>(kb, w, a) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Path::Avx512 => unsafe { crate::x86::avx512::dot_groups::<R, C, BITS>(kb, w, a) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Path::Neon => unsafe { crate::arm::neon::dot_groups::<R, C, BITS>(kb, w, a) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Path::NeonDot => unsafe { crate::arm::dotprod::dot_groups::<R, C, BITS>(kb, w, a) },
        _ => scalar::dot_groups::<R, C, BITS>(kb, w, a),
    }
}
