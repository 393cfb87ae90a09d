//! Prompt-prefix KV reuse: the KV state of recent prompts, kept so that a
//! prompt sharing a prefix with one of them (a rule's fixed system message,
//! device catalogue or output schema) prefills only the rest.
//!
//! Entries are keyed by token ids. A lookup takes the entry with the longest
//! common prefix; when that is only part of the entry (two prompts with the
//! same system message and different user messages), the shared part is
//! kept as an entry of its own, so it outlives the full prompts around it.
//! The bound is on the bytes of KV state held, least recently used out first.
//! A linear scan is enough: a bound in MiB holds tens of entries, not
//! thousands.

use crate::model::KvCache;

/// Shorter shared prefixes are not worth a copy of their KV state (a chat
/// template's first tokens are common to every prompt).
const MIN_REUSE: usize = 8;

struct Entry {
    ids: Vec<u32>,
    cache: KvCache,
    bytes: usize,
    used: u64,
}

/// See the module docs.
pub struct PrefixCache {
    max_bytes: usize,
    bytes: usize,
    clock: u64,
    entries: Vec<Entry>,
}

impl PrefixCache {
    /// A cache holding at most `max_bytes` of KV state; 0 turns it off.
    pub fn new(max_bytes: usize) -> PrefixCache {
        PrefixCache {
            max_bytes,
            bytes: 0,
            clock: 0,
            entries: Vec::new(),
        }
    }

    /// Bytes of KV state held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The KV state of the longest cached prefix of `ids`, leaving at least
    /// one token to prefill (its logits start generation), and its length;
    /// `(0, empty)` on a miss.
    pub fn lookup(&mut self, ids: &[u32]) -> candle_core::Result<(usize, KvCache)> {
        let limit = ids.len().saturating_sub(1);
        let mut best: Option<(usize, usize)> = None;
        for (i, e) in self.entries.iter().enumerate() {
            let common = e.ids.iter().zip(ids).take_while(|(a, b)| a == b).count();
            // On a tie, the shorter entry: it needs no cut.
            let better = match best {
                None => true,
                Some((n, j)) => {
                    common > n || (common == n && e.ids.len() < self.entries[j].ids.len())
                }
            };
            if common >= MIN_REUSE && better {
                best = Some((common, i));
            }
        }
        let Some((common, i)) = best else {
            return Ok((0, KvCache::default()));
        };
        self.clock += 1;
        self.entries[i].used = self.clock;
        let reuse = common.min(limit);
        if reuse < MIN_REUSE {
            return Ok((0, KvCache::default()));
        }
        if reuse == self.entries[i].ids.len() {
            return Ok((reuse, self.entries[i].cache.clone()));
        }
        let cache = self.entries[i].cache.prefix(reuse)?;
        // Where the prompts part ways, the shared part is worth an entry;
        // a prompt cut only to leave its last token to prefill is not.
        if reuse == common {
            self.insert(&ids[..reuse], &cache);
        }
        Ok((reuse, cache))
    }

    /// Keeps the KV state of the prompt `ids`, evicting the least recently
    /// used entries beyond the bound.
    pub fn insert(&mut self, ids: &[u32], cache: &KvCache) {
        let bytes = cache.bytes();
        if bytes > self.max_bytes || ids.len() < MIN_REUSE || cache.len() != ids.len() {
            return;
        }
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.ids == ids) {
            e.used = self.clock;
            return;
        }
        while self.bytes + bytes > self.max_bytes {
            let Some(oldest) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].used) else {
                break;
            };
            self.bytes -= self.entries.swap_remove(oldest).bytes;
        }
        self.bytes += bytes;
        self.entries.push(Entry {
            ids: ids.to_vec(),
            cache: cache.clone(),
            bytes,
            used: self.clock,
        });
    }
}
