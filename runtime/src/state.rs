//! The plugins' persistent key–value store, on redb.
//!
//! Entries are keyed by (plugin name, rule, key), never by plugin version, so
//! state survives restarts and reloads of the same plugin. Writes commit
//! without fsync and a flusher thread makes them durable every
//! `flush_interval` (default 100 ms): a crash loses at most that much of the
//! latest writes, and a message that writes state does not pay an fsync.
//! With `flush_interval` zero every write is durable when it returns.
//!
//! The rules' open windows are kept here too (one entry per rule and device,
//! rewritten as readings arrive), so that a crash loses no reading a window
//! accepted: the gateway acknowledges a message that added to a window only
//! once the write is durable ([`StateStore::durable`]).

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

const ENTRIES: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("entries");
const COUNTS: TableDefinition<(&str, &str), u64> = TableDefinition::new("counts");
/// Open windows: (rule, device) → the window as the pipeline encodes it.
const WINDOWS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("windows");
/// Rules an operator switched off (the admin endpoint): rule → 1. At most
/// one entry per rule name the gateway ever ran.
const DISABLED: TableDefinition<&str, u8> = TableDefinition::new("disabled_rules");

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

impl From<&crate::config::StateConfig> for StateLimits {
    /// Key and value size caps keep their defaults.
    fn from(c: &crate::config::StateConfig) -> Self {
        StateLimits {
            flush_interval: std::time::Duration::from_millis(c.flush_interval_ms),
            max_keys_per_scope: c.max_keys_per_scope,
            ..Default::default()
        }
    }
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
    /// Commits so far; a window write returns the number of its commit.
    written: AtomicU64,
    /// The highest commit number known durable.
    durable: tokio::sync::watch::Sender<u64>,
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
        txn.open_table(WINDOWS).map_err(io)?;
        txn.open_table(DISABLED).map_err(io)?;
        txn.commit().map_err(io)?;
        let inner = Arc::new(Inner {
            db,
            limits,
            dirty: AtomicBool::new(false),
            written: AtomicU64::new(0),
            durable: tokio::sync::watch::Sender::new(0),
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
        self.commit(txn).map(|_| ())
    }

    fn write_txn(&self) -> Result<redb::WriteTransaction, StateError> {
        let mut txn = self.inner.db.begin_write().map_err(io)?;
        if !self.inner.limits.flush_interval.is_zero() {
            txn.set_durability(Durability::None).map_err(io)?;
        }
        Ok(txn)
    }

    fn commit(&self, txn: redb::WriteTransaction) -> Result<u64, StateError> {
        txn.commit().map_err(io)?;
        let n = self.inner.written.fetch_add(1, Ordering::AcqRel) + 1;
        if self.inner.limits.flush_interval.is_zero() {
            self.inner.durable.send_if_modified(|d| {
                let newer = n > *d;
                *d = (*d).max(n);
                newer
            });
        } else {
            self.inner.dirty.store(true, Ordering::Release);
        }
        Ok(n)
    }

    /// Stores the open window of `device` in `rule`; returns the commit's
    /// number, for [`StateStore::durable`].
    pub fn save_window(&self, rule: &str, device: &str, window: &[u8]) -> Result<u64, StateError> {
        let txn = self.write_txn()?;
        txn.open_table(WINDOWS)
            .map_err(io)?
            .insert((rule, device), window)
            .map_err(io)?;
        self.commit(txn)
    }

    /// Forgets the window of `device` in `rule` (it ran); returns the
    /// commit's number.
    pub fn delete_window(&self, rule: &str, device: &str) -> Result<u64, StateError> {
        let txn = self.write_txn()?;
        txn.open_table(WINDOWS)
            .map_err(io)?
            .remove((rule, device))
            .map_err(io)?;
        self.commit(txn)
    }

    /// Records whether `rule` is switched off, durable when this returns
    /// (an fsync: call it off the executor), so that a rule an operator
    /// disabled stays disabled across restarts and reloads.
    pub fn set_rule_disabled(&self, rule: &str, disabled: bool) -> Result<(), StateError> {
        let txn = self.write_txn()?;
        {
            let mut table = txn.open_table(DISABLED).map_err(io)?;
            if disabled {
                table.insert(rule, 1).map_err(io)?;
            } else {
                table.remove(rule).map_err(io)?;
            }
        }
        self.commit(txn)?;
        self.flush()
    }

    /// Whether `rule` was switched off and not on again.
    pub fn rule_disabled(&self, rule: &str) -> Result<bool, StateError> {
        let txn = self.inner.db.begin_read().map_err(io)?;
        let table = txn.open_table(DISABLED).map_err(io)?;
        Ok(table.get(rule).map_err(io)?.is_some())
    }

    /// The windows `rule` left open, by device.
    pub fn windows(&self, rule: &str) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let txn = self.inner.db.begin_read().map_err(io)?;
        let table = txn.open_table(WINDOWS).map_err(io)?;
        let range = table.range((rule, "")..).map_err(io)?;
        let mut out = Vec::new();
        for entry in range {
            let (k, v) = entry.map_err(io)?;
            let (r, device) = k.value();
            if r != rule {
                break;
            }
            out.push((device.to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Completes once commit number `commit` is durable: at once with
    /// `flush_interval` zero, else at the next flush (at most
    /// `flush_interval` later). A store that is dropped meanwhile made
    /// everything durable on the way out.
    pub async fn durable(&self, commit: u64) {
        let mut rx = self.inner.durable.subscribe();
        let _ = rx.wait_for(|d| *d >= commit).await;
    }
}

fn flush(inner: &Inner) -> Result<(), StateError> {
    if inner.dirty.swap(false, Ordering::AcqRel) {
        let upto = inner.written.load(Ordering::Acquire);
        let txn = inner.db.begin_write().map_err(io)?;
        txn.commit().map_err(io)?;
        inner.durable.send_if_modified(|d| {
            let newer = upto > *d;
            *d = (*d).max(upto);
            newer
        });
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
        self.store.commit(txn).map(|_| ())
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
        self.store.commit(txn).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen(path: &Path, limits: StateLimits) -> StateStore {
        for _ in 0..100 {
            if let Ok(s) = StateStore::open(path, limits) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        StateStore::open(path, limits).unwrap()
    }

    #[tokio::test]
    async fn windows_are_kept_per_rule_and_become_durable_at_the_next_flush() {
        let dir =
            std::env::temp_dir().join(format!("ganglion-state-windows-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("s.redb");
        let limits = StateLimits {
            flush_interval: Duration::from_millis(50),
            ..Default::default()
        };
        {
            let store = StateStore::open(&path, limits).unwrap();
            store.save_window("r", "b", b"2").unwrap();
            store.save_window("r", "a", b"1").unwrap();
            store.save_window("r-2", "a", b"x").unwrap();
            let n = store.save_window("r", "a", b"1+").unwrap();
            tokio::time::timeout(Duration::from_secs(5), store.durable(n))
                .await
                .expect("durable within a flush interval");
            store.delete_window("r", "b").unwrap();
        }
        // The flusher thread may hold the last handle for a moment.
        let store = reopen(&path, limits);
        assert_eq!(
            store.windows("r").unwrap(),
            vec![("a".into(), b"1+".to_vec())]
        );
        assert_eq!(store.windows("r-2").unwrap().len(), 1);
        assert!(store.windows("q").unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

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
