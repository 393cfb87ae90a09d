//! A sequence's KV cache: what the forward pass appends to, what the
//! prefix cache keeps and copies, and what the scheduler counts against
//! `kv_cache_mib`.

use super::Result;
use candle_core::Tensor;

/// One sequence's keys and values. On the CPU, per layer, token-major
/// `[positions][kv_heads][head_dim]` in plain memory; on other devices, per
/// layer `[kv_heads, positions, head_dim]` tensors.
#[derive(Clone, Default)]
pub struct KvCache {
    pub(super) host: Vec<(Vec<f32>, Vec<f32>)>,
    pub(super) layers: Vec<(Tensor, Tensor)>,
    pub(super) len: usize,
    /// Positions to make room for at the first append (host memory).
    pub(super) reserve: usize,
}

impl KvCache {
    /// Positions (tokens) whose keys and values it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no positions: a sequence not yet started.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The state of the first `n` positions, in memory of its own (the
    /// cached entry it came from stays as it is).
    pub fn prefix(&self, n: usize) -> Result<KvCache> {
        let n = n.min(self.len);
        let host = self
            .host
            .iter()
            .map(|(k, v)| {
                let row = k.len() / self.len.max(1);
                (k[..n * row].to_vec(), v[..n * row].to_vec())
            })
            .collect();
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.narrow(1, 0, n)?.contiguous()?,
                    v.narrow(1, 0, n)?.contiguous()?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            host,
            layers,
            len: n,
            reserve: 0,
        })
    }

    /// Makes room for `positions` in all, so that a sequence whose memory
    /// was reserved up front does not grow past it.
    pub fn reserve(&mut self, positions: usize) {
        self.reserve = positions;
        let len = self.len.max(1);
        for (k, v) in &mut self.host {
            let row = k.len() / len;
            let want = positions * row;
            k.reserve_exact(want.saturating_sub(k.len()));
            v.reserve_exact(want.saturating_sub(v.len()));
        }
    }

    /// Bytes held, for memory accounting.
    pub fn bytes(&self) -> usize {
        let host: usize = self
            .host
            .iter()
            .map(|(k, v)| (k.capacity() + v.capacity()) * 4)
            .sum();
        let device: usize = self
            .layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * 4)
            .sum();
        host + device
    }
}
