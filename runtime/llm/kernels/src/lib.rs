//! Ganglion's quantised matrix product for the CPU: GGML Q8_0, Q4_0, Q4_1,
//! Q5_0, Q5_1, Q4_K, Q5_K and Q6_K weights against f32 activations, on
//! byte slices, with no dependency on a tensor library (the candle glue is
//! in `ganglion-llm`), so that the aarch64 cross build and its qemu tests
//! compile this crate alone.
//!
//! Why its own: candle's product walks one activation row at a time,
//! converting every block's f16 scales again per row, has no SIMD path for
//! Q4_1, Q5_0 and Q5_1, and its fast K-quant paths need rows that are
//! multiples of 256. This one takes a tile of weight rows against a tile of
//! activation rows, loading each weight block once per tile, with the
//! scales converted once at load, so a batch of sequences costs little
//! more weight traffic than one.
//!
//! Module map:
//! - `ggml`: the GGML block formats ([`Format`]), decoding one block of
//!   32 weights, f16 conversion.
//! - `layout`: the repacked matrices: Q8_0 row by row, the 4- to 6-bit
//!   formats sixteen rows interleaved, one vector lane per row.
//! - `quantize`: activations to 8 bits per block of 32, as GGML does it.
//! - `matrix`: [`Matrix`], the public product, and [`Parallel`], how its
//!   parts are spread over threads.
//! - `tile`: cutting a product into tiles of weight and activation rows.
//! - `dispatch`: which instruction path this CPU takes ([`Path`]), and
//!   the checks that make calling it sound.
//! - `scalar`: the portable path, in plain Rust; also the arithmetic
//!   every SIMD path reproduces.
//! - `x86`: AVX2, AVX-VNNI and AVX-512 VNNI (x86-64 only).
//! - `arm`: NEON, with `sdot` where the CPU has dotprod (aarch64 only).
//!
//! Batch invariance: each output element is computed by the same
//! instruction sequence whatever the tile, the number of rows or the
//! thread split, so a row's result does not depend on the other rows in
//! the call.
//!
//! Same bits across paths: the 4- to 6-bit formats give the same bits on
//! every path (integer dot products per block, exact; then the same fused
//! multiply-adds in the same order). Q8_0 gives the same bits on every
//! path but AVX-512, which adds even and odd blocks in separate lanes and
//! sums them at the end (see [`scalar`]).

mod dispatch;
mod ggml;
mod layout;
mod matrix;
mod quantize;
mod scalar;
mod tile;

#[cfg(target_arch = "aarch64")]
mod arm;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;

pub use dispatch::{Path, path};
pub use ggml::Format;
pub use matrix::{Error, Matrix, Parallel, Serial};
pub use quantize::{Q8Rows, quantize_rows};
