//! Attention on the CPU over each sequence's own KV cache, for every new
//! token of every sequence of a forward pass in one parallel loop.
//!
//! Why not candle ops: per sequence and layer they cost a dozen small
//! tensor operations and a copy of the whole cache (`cat`), which at a
//! batch of eight outweighs the attention arithmetic itself. Here keys and
//! values are appended in place, token-major, and each (token, head) output
//! is one loop over that sequence's keys.
//!
//! Exactness: a token's output is computed by the same loop whatever the
//! chunk it came in, the sequences beside it or the thread that ran it, so
//! a prompt fed whole, in chunks, after a cached prefix or next to other
//! sequences gives the same bits.

/// Rotary position embedding of one token's heads in place: `pairs`
/// rotations per head, from the `cos`/`sin` rows of its position.
/// `interleaved`: pairs are adjacent elements (GGUF llama); otherwise the
/// two halves of the head (qwen).
pub(crate) fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// One new token's place: its row in the pass, and its sequence's keys and
/// values (token-major `[positions][kv_heads][head_dim]`) up to and
/// including its own position.
pub(crate) struct Query<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
}

/// Shapes of one layer's attention.
#[derive(Clone, Copy)]
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// `out[t] = softmax(q[t] · Kᵀ / √d) · V` per head, for each token `t`;
/// `q` is `[tokens, heads, head_dim]`, `out` the same shape.
pub(crate) fn attend(q: &[f32], queries: &[Query<'_>], h: Heads, out: &mut [f32]) {
    let scale = 1.0 / (h.head_dim as f32).sqrt();
    let group = h.heads / h.kv_heads;
    let d = h.head_dim;
    let items = out.len() / d;
    let out_ptr = OutPtr(out.as_mut_ptr());
    crate::pool::pool().run(items, |range| {
        let out_ptr = &out_ptr;
        let mut scores = Vec::new();
        for i in range {
            let (t, head) = (i / h.heads, i % h.heads);
            let qh = &q[i * d..(i + 1) * d];
            // SAFETY: each (token, head) item is written by one range only.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.0.add(i * d), d) };
            attend_one(qh, &queries[t], head / group, h, scale, &mut scores, o);
        }
    });
}

struct OutPtr(*mut f32);
// SAFETY: used only to hand disjoint rows of one buffer to the pool.
unsafe impl Sync for OutPtr {}

fn attend_one(
    q: &[f32],
    query: &Query<'_>,
    kv: usize,
    h: Heads,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if fma() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { fma_path::attend_one(q, query, kv, h, scale, scores, out) };
        }
    }
    plain::body(q, query, kv, h, scale, scores, out)
}

#[cfg(target_arch = "x86_64")]
fn fma() -> bool {
    use std::sync::OnceLock;
    static FMA: OnceLock<bool> = OnceLock::new();
    *FMA.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// The loop, written once and compiled twice: with FMA (`mul_add` is one
/// instruction there) and without (`a * b + c`).
macro_rules! attend_body {
    ($madd:expr) => {
        #[allow(clippy::redundant_closure_call)]
        #[inline(always)]
        pub(super) fn body(
            q: &[f32],
            query: &Query<'_>,
            kv: usize,
            h: Heads,
            scale: f32,
            scores: &mut Vec<f32>,
            out: &mut [f32],
        ) {
            let madd = $madd;
            let d = h.head_dim;
            let row = h.kv_heads * d;
            let n = query.keys.len() / row;
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in 0..n {
                let k = &query.keys[j * row + kv * d..][..d];
                let mut lanes = [0f32; 8];
                let mut tail = 0f32;
                // Fixed-size chunks: the eight lanes become one vector.
                let (qc, kc) = (q.chunks_exact(8), k.chunks_exact(8));
                let rest = qc.remainder().iter().zip(kc.remainder());
                for (qa, ka) in qc.zip(kc) {
                    let (qa, ka): (&[f32; 8], &[f32; 8]) = (
                        qa.try_into().expect("chunks of 8"),
                        ka.try_into().expect("chunks of 8"),
                    );
                    for ((lane, &x), &y) in lanes.iter_mut().zip(qa).zip(ka) {
                        *lane = madd(x, y, *lane);
                    }
                }
                for (&x, &y) in rest {
                    tail = madd(x, y, tail);
                }
                let s = (((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                    + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
                    + tail)
                    * scale;
                max = max.max(s);
                scores.push(s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            out.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                let v = &query.values[j * row + kv * d..][..d];
                for (o, &x) in out.iter_mut().zip(v) {
                    *o = madd(p, x, *o);
                }
            }
            let inv = 1.0 / sum;
            for o in out.iter_mut() {
                *o *= inv;
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod fma_path {
    use super::{Heads, Query};
    attend_body!(|a: f32, b: f32, c: f32| a.mul_add(b, c));

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_one(
        q: &[f32],
        query: &Query<'_>,
        kv: usize,
        h: Heads,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        body(q, query, kv, h, scale, scores, out)
    }
}

mod plain {
    use super::{Heads, Query};
    attend_body!(|a: f32, b: f32, c: f32| a * b + c);
}
