//! The plugins' persistent key–value store, on redb.
//!
//! Entries are keyed by (plugin name, rule, key), never by plugin version, so
//! state survives restarts and reloads of the same plugin. Writes commit
//! without fsync and a flusher thread makes them durable every
//! `flush_interval` (default 100 ms): a crash loses at most that much of the
//! latest writes, and a message that writes state does not pay an fsync.
//! With `flush_interval` zero every write is durable when it returns.

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

const ENTRIES: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("entries");
const COUNTS: TableDefinition<(&str, &str), u64> = TableDefinition::new("counts");

/// Size limits and durability of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateLimits {
    /// Longest key, in bytes. Default 1 KiB.
    pub max_key_bytes: usize,
    /// Largest value, in bytes. Default 64 KiB.
    pub max_value_bytes: usize,
    /// Keys one plugin may hold in one rule. Default 10 000.
    pub max_keys_per_scope: u64,
    /// How often writes are made durable; zero makes every write durable
    /// when it returns. Default 100 ms.
    pub flush_interval: Duration,
}

impl Default for StateLimits {
    fn default() -> Self {
        StateLimits {
            max_key_bytes: 1024,
            max_value_bytes: 64 * 1024,
            max_keys_per_scope: 10_000,
            flush_interval: Duration::from_millis(100),
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The key is over `max_key_bytes` or the value over `max_value_bytes`.
    #[error("state key or value over its size limit")]
    TooLarge,
    /// A new key would take the scope over `max_keys_per_scope`.
    #[error("state scope holds its maximum number of keys")]
    QuotaExceeded,
    /// The database failed (open, transaction, commit).
    #[error("state store: {0}")]
    Io(String),
}

fn io(e: impl std::fmt::Display) -> StateError {
    StateError::Io(e.to_string())
}

struct Inner {
    db: Database,
    limits: StateLimits,
    dirty: AtomicBool,
}

/// A handle on the store; cheap to clone.
#[derive(Clone)]
pub struct StateStore {
    inner: Arc<Inner>,
}

impl StateStore {
    /// Opens (or creates) the store file; the error names the file.
    pub fn open(path: &Path, limits: StateLimits) -> Result<Self, StateError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StateError::Io(format!("{}: {e}", dir.display())))?;
        }
        let db = Database::create(path)
            .map_err(|e| StateError::Io(format!("{}: {e}", path.display())))?;
        Self::with_db(db, limits)
    }

    /// A store that lives in memory only (tests, `ganglion check`).
    pub fn in_memory() -> Self {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("in-memory redb");
        Self::with_db(
            db,
            StateLimits {
                flush_interval: Duration::ZERO,
                ..StateLimits::default()
            },
        )
        .expect("in-memory redb")
    }

    fn with_db(db: Database, limits: StateLimits) -> Result<Self, StateError> {
        let txn = db.begin_write().map_err(io)?;
        txn.open_table(ENTRIES).map_err(io)?;
        txn.open_table(COUNTS).map_err(io)?;
        txn.commit().map_err(io)?;
        let inner = Arc::new(Inner {
            db,
            limits,
            dirty: AtomicBool::new(false),
        });
        if !limits.flush_interval.is_zero() {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("ganglion-state-flush".into())
                .spawn(move || flusher(weak))
                .map_err(io)?;
        }
        Ok(StateStore { inner })
    }

    /// A handle on the entries of `plugin` in `rule`.
    pub fn scope(&self, plugin: &str, rule: &str) -> StateScope {
        StateScope {
            store: self.clone(),
            plugin: plugin.to_owned(),
            rule: rule.to_owned(),
        }
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), StateError> {
        flush(&self.inner)
    }

    /// Removes every entry of a scope (a rule asked not to keep state).
    pub fn clear_scope(&self, plugin: &str, rule: &str) -> Result<(), StateError> {
        let txn = self.write_txn()?;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(io)?;
            entries
                .retain_in((plugin, rule, "")..(plugin, rule, "\u{10FFFF}"), |_, _| {
                    false
                })
                .map_err(io)?;
            txn.open_table(COUNTS)
                .map_err(io)?
                .remove((plugin, rule))
                .map_err(io)?;
        }
        self.commit(txn)
    }

    fn write_txn(&self) -> Result<redb::WriteTransaction, StateError> {
        let mut txn = self.inner.db.begin_write().map_err(io)?;
        if !self.inner.limits.flush_interval.is_zero() {
            txn.set_durability(Durability::None).map_err(io)?;
        }
        Ok(txn)
    }

    fn commit(&self, txn: redb::WriteTransaction) -> Result<(), StateError> {
        txn.commit().map_err(io)?;
        self.inner.dirty.store(true, Ordering::Release);
        Ok(())
    }
}

fn flush(inner: &Inner) -> Result<(), StateError> {
    if inner.dirty.swap(false, Ordering::AcqRel) {
        let txn = inner.db.begin_write().map_err(io)?;
        txn.commit().map_err(io)?;
    }
    Ok(())
}

fn flusher(inner: Weak<Inner>) {
    loop {
        let Some(interval) = inner.upgrade().map(|i| i.limits.flush_interval) else {
            return;
        };
        std::thread::sleep(interval);
        let Some(inner) = inner.upgrade() else { return };
        if let Err(e) = flush(&inner) {
            tracing::error!(error = %e, "state store flush failed");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = flush(self) {
            tracing::error!(error = %e, "state store final flush failed");
        }
    }
}

/// The entries of one plugin in one rule.
#[derive(Clone)]
pub struct StateScope {
    store: StateStore,
    plugin: String,
    rule: String,
}

impl StateScope {
    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        if key.len() > self.store.inner.limits.max_key_bytes {
            return Err(StateError::TooLarge);
        }
        let txn = self.store.inner.db.begin_read().map_err(io)?;
        let table = txn.open_table(ENTRIES).map_err(io)?;
        Ok(table
            .get((self.plugin.as_str(), self.rule.as_str(), key))
            .map_err(io)?
            .map(|v| v.value().to_vec()))
    }

    /// Sets `key` to `value`; a new key counts against `max_keys_per_scope`.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), StateError> {
        let limits = &self.store.inner.limits;
        if key.len() > limits.max_key_bytes || value.len() > limits.max_value_bytes {
            return Err(StateError::TooLarge);
        }
        let txn = self.store.write_txn()?;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(io)?;
            let id = (self.plugin.as_str(), self.rule.as_str(), key);
            let existed = entries.insert(id, value).map_err(io)?.is_some();
            if !existed {
                let mut counts = txn.open_table(COUNTS).map_err(io)?;
                let scope = (self.plugin.as_str(), self.rule.as_str());
                let n = counts
                    .get(scope)
                    .map_err(io)?
                    .map(|v| v.value())
                    .unwrap_or(0);
                if n >= limits.max_keys_per_scope {
                    drop(entries);
                    drop(counts);
                    txn.abort().map_err(io)?;
                    return Err(StateError::QuotaExceeded);
                }
                counts.insert(scope, n + 1).map_err(io)?;
            }
        }
        self.store.commit(txn)
    }

    /// Removes `key`; removing a key that is not set is not an error.
    pub fn delete(&self, key: &str) -> Result<(), StateError> {
        if key.len() > self.store.inner.limits.max_key_bytes {
            return Err(StateError::TooLarge);
        }
        let txn = self.store.write_txn()?;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(io)?;
            if entries
                .remove((self.plugin.as_str(), self.rule.as_str(), key))
                .map_err(io)?
                .is_some()
            {
                let mut counts = txn.open_table(COUNTS).map_err(io)?;
                let scope = (self.plugin.as_str(), self.rule.as_str());
                let n = counts
                    .get(scope)
                    .map_err(io)?
                    .map(|v| v.value())
                    .unwrap_or(1);
                counts.insert(scope, n.saturating_sub(1)).map_err(io)?;
            }
        }
        self.store.commit(txn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_separate_and_quota_holds() {
        let store = StateStore::in_memory();
        let a = store.scope("p", "rule-a");
        let b = store.scope("p", "rule-b");
        a.set("k", b"1").unwrap();
        assert_eq!(a.get("k").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(b.get("k").unwrap(), None);
        assert_eq!(a.set(&"x".repeat(2000), b""), Err(StateError::TooLarge));
        let limited = StateStore::with_db(
            Database::builder()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .unwrap(),
            StateLimits {
                max_keys_per_scope: 2,
                flush_interval: Duration::ZERO,
                ..Default::default()
            },
        )
        .unwrap()
        .scope("p", "r");
        limited.set("1", b"").unwrap();
        limited.set("2", b"").unwrap();
        limited.set("2", b"overwrite is fine").unwrap();
        assert_eq!(limited.set("3", b""), Err(StateError::QuotaExceeded));
        limited.delete("1").unwrap();
        limited.set("3", b"").unwrap();
        store.clear_scope("p", "rule-a").unwrap();
        assert_eq!(a.get("k").unwrap(), None);
    }

    #[test]
    fn survives_reopen() {
        let dir = std::env::temp_dir().join(format!("ganglion-state-{}", std::process::id()));
        let path = dir.join("state.redb");
        {
            let store = StateStore::open(&path, StateLimits::default()).unwrap();
            store.scope("p", "r").set("k", b"v").unwrap();
        }
        let store = StateStore::open(&path, StateLimits::default()).unwrap();
        assert_eq!(
            store.scope("p", "r").get("k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
