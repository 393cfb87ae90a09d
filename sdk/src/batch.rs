//! Building and reading [`ReadingBatch`]es without handling the name table by hand.

use crate::{Reading, ReadingBatch, Value};

/// A reading with its names resolved, borrowed from a batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadingRef<'a> {
    /// The device that produced it.
    pub device: &'a str,
    /// What was measured, such as `temperature`.
    pub metric: &'a str,
    /// The unit as the payload gave it (see [`crate::units`]); empty when
    /// none was given.
    pub unit: &'a str,
    /// The value.
    pub value: &'a Value,
    /// When it was measured: milliseconds since the Unix epoch, UTC.
    pub timestamp: i64,
}

/// Above this many names, lookups use a hash index instead of a linear scan.
const LINEAR_SCAN_LIMIT: usize = 16;

/// Appends readings to a batch, storing each distinct name once.
#[derive(Default)]
pub struct BatchBuilder {
    batch: ReadingBatch,
    index: Option<std::collections::HashMap<String, u32>>,
}

// Generated types can only take derives that fit every WIT type (enums have no Default).
#[allow(clippy::derivable_impls)]
impl Default for ReadingBatch {
    fn default() -> Self {
        ReadingBatch {
            names: Vec::new(),
            readings: Vec::new(),
        }
    }
}

impl BatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty builder with room for `readings` readings, for when the
    /// count is known (a payload's list) and reallocation is worth avoiding.
    pub fn with_capacity(readings: usize) -> Self {
        BatchBuilder {
            batch: ReadingBatch {
                names: Vec::with_capacity(4),
                readings: Vec::with_capacity(readings),
            },
            index: None,
        }
    }

    /// Index of `name` in the table, adding it if new. Linear in the table
    /// up to 16 names, hashed beyond.
    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(index) = &self.index {
            if let Some(i) = index.get(name) {
                return *i;
            }
        } else if let Some(i) = self.batch.names.iter().position(|n| n == name) {
            return i as u32;
        }
        let i = self.batch.names.len() as u32;
        self.batch.names.push(name.to_owned());
        if let Some(index) = &mut self.index {
            index.insert(name.to_owned(), i);
        } else if self.batch.names.len() > LINEAR_SCAN_LIMIT {
            self.index = Some(
                self.batch
                    .names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n.clone(), i as u32))
                    .collect(),
            );
        }
        i
    }

    /// Appends a reading; `timestamp` is milliseconds since the Unix epoch,
    /// and `unit` may be empty.
    pub fn push(&mut self, device: &str, metric: &str, value: Value, unit: &str, timestamp: i64) {
        let reading = Reading {
            device: self.intern(device),
            metric: self.intern(metric),
            unit: self.intern(unit),
            value,
            timestamp,
        };
        self.batch.readings.push(reading);
    }

    /// Appends a reading borrowed from another batch, re-interning its
    /// names here (to filter or merge batches).
    pub fn push_ref(&mut self, r: ReadingRef<'_>) {
        self.push(r.device, r.metric, r.value.clone(), r.unit, r.timestamp)
    }

    /// Readings appended so far.
    pub fn len(&self) -> usize {
        self.batch.readings.len()
    }

    /// Whether no reading has been appended.
    pub fn is_empty(&self) -> bool {
        self.batch.readings.is_empty()
    }

    /// The batch, with each distinct name stored once.
    pub fn finish(self) -> ReadingBatch {
        self.batch
    }
}

impl ReadingBatch {
    /// Readings in the batch (not names).
    pub fn len(&self) -> usize {
        self.readings.len()
    }

    /// Whether the batch holds no readings.
    pub fn is_empty(&self) -> bool {
        self.readings.is_empty()
    }

    /// The name at `index`, or "" when the index is out of range (the host
    /// refuses such batches before they reach a plugin).
    pub fn name(&self, index: u32) -> &str {
        self.names
            .get(index as usize)
            .map(String::as_str)
            .unwrap_or("")
    }

    /// Reading `i` with its names resolved; `None` past the end.
    pub fn get(&self, i: usize) -> Option<ReadingRef<'_>> {
        self.readings.get(i).map(|r| self.resolve(r))
    }

    /// The readings in order, names resolved.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = ReadingRef<'_>> + '_ {
        self.readings.iter().map(|r| self.resolve(r))
    }

    fn resolve<'a>(&'a self, r: &'a Reading) -> ReadingRef<'a> {
        ReadingRef {
            device: self.name(r.device),
            metric: self.name(r.metric),
            unit: self.name(r.unit),
            value: &r.value,
            timestamp: r.timestamp,
        }
    }
}

impl<'a> FromIterator<ReadingRef<'a>> for ReadingBatch {
    fn from_iter<I: IntoIterator<Item = ReadingRef<'a>>>(iter: I) -> Self {
        let mut b = BatchBuilder::new();
        for r in iter {
            b.push_ref(r);
        }
        b.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stored_once_and_resolve_back() {
        let mut b = BatchBuilder::new();
        for i in 0..40 {
            b.push(
                "dev-1",
                &format!("m{}", i % 20),
                Value::Number(i as f64),
                "C",
                i,
            );
        }
        let batch = b.finish();
        assert_eq!(batch.names.len(), 22);
        let r = batch.get(25).unwrap();
        assert_eq!(
            (r.device, r.metric, r.unit, r.timestamp),
            ("dev-1", "m5", "C", 25)
        );
        assert_eq!(batch.iter().filter(|r| r.metric == "m3").count(), 2);
    }
}
