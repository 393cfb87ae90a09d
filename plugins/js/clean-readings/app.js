// Preprocessor: JSON telemetry to clean readings. The JavaScript twin of the
// Rust plugin plugins/clean-readings: same settings, same readings out (in
// the same order, with bit-identical numbers), same error kinds.
//
// Drops readings that are not finite numbers where a number is expected
// (NaN, ±inf, "NaN" text), readings outside the configured range of their
// metric, and duplicates (same device, metric and timestamp) within a
// message; with `drop_stale`, also readings not newer than the last one kept
// for that device and metric, using the plugin's persistent state. Converts
// units to the configured unit of each metric; a reading whose unit cannot be
// converted is dropped.
//
//   [[preprocess]]
//   plugin = "js-clean-readings"
//   config = { device_from_topic = 1, units = { temperature = "C" }, ranges = { temperature = [-40.0, 150.0] } }

import { log } from 'ganglion:plugin/log@0.1.0';
import { get as stateGet, set as stateSet } from 'ganglion:plugin/state@0.1.0';
import { array, bool, f64, map, option, string, usize } from '../lib/config.js';
import { cachedSettings, PluginError } from '../lib/plugin.js';
import { i64FromLeBytes, i64ToLeBytes, parseF64, trim } from '../lib/rust.js';
import { BadPayload, optionsFromTopic, parseJson } from '../lib/telemetry.js';
import { convert } from '../lib/units.js';

const CONFIG_FIELDS = {
  device_from_topic: option(usize),
  ranges: map(array(f64, 2)),
  units: map(string),
  numeric_text: option(bool),
  drop_stale: bool,
};

const config = cachedSettings(CONFIG_FIELDS, (c) => ({
  deviceFromTopic: c.device_from_topic,
  ranges: c.ranges ?? new Map(),
  units: c.units ?? new Map(),
  numericText: c.numeric_text ?? true,
  dropStale: c.drop_stale ?? false,
}));

/** Appends readings to a batch, storing each distinct name once (the SDK's BatchBuilder). */
class BatchBuilder {
  constructor() {
    this.names = [];
    this.index = new Map();
    this.readings = [];
  }

  intern(name) {
    let i = this.index.get(name);
    if (i === undefined) {
      i = this.names.length;
      this.names.push(name);
      this.index.set(name, i);
    }
    return i;
  }

  push(r) {
    this.readings.push({
      device: this.intern(r.device),
      metric: this.intern(r.metric),
      unit: this.intern(r.unit),
      value: r.value,
      timestamp: r.timestamp,
    });
  }

  finish() {
    return { names: this.names, readings: this.readings };
  }
}

function resolve(batch) {
  const name = (i) => batch.names[i] ?? '';
  return batch.readings.map((r) => ({
    device: name(r.device),
    metric: name(r.metric),
    unit: name(r.unit),
    value: r.value,
    timestamp: r.timestamp,
  }));
}

/** The cleaning logic; `isFresh` decides staleness. */
function clean(message, input, cfg, isFresh) {
  let parsed;
  if (input.readings.length === 0) {
    try {
      parsed = parseJson(message.payload, optionsFromTopic(message.topic, cfg.deviceFromTopic, message.timestamp));
    } catch (e) {
      if (e instanceof BadPayload) throw new PluginError('bad-payload', e.message);
      throw e;
    }
  } else {
    parsed = resolve(input);
  }
  const out = new BatchBuilder();
  const seen = new Set();
  const dropped = { not_finite: 0, out_of_range: 0, duplicate: 0, bad_unit: 0, stale: 0 };
  for (const r of parsed) {
    let value = r.value;
    if (cfg.numericText && value.tag === 'text') {
      const n = parseF64(trim(value.val));
      if (n !== null) value = { tag: 'number', val: n };
    }
    let unit = r.unit;
    if (value.tag === 'number') {
      let n = value.val;
      if (!Number.isFinite(n)) {
        dropped.not_finite += 1;
        continue;
      }
      const target = cfg.units.get(r.metric);
      if (target !== undefined) {
        if (unit === '') {
          unit = target;
        } else {
          const converted = convert(n, unit, target);
          if (converted === null) {
            dropped.bad_unit += 1;
            continue;
          }
          n = converted;
          unit = target;
        }
      }
      const range = cfg.ranges.get(r.metric);
      if (range !== undefined && !(range[0] <= n && n <= range[1])) {
        dropped.out_of_range += 1;
        continue;
      }
      value = { tag: 'number', val: n };
    }
    const key = `${out.intern(r.device)}/${out.intern(r.metric)}/${r.timestamp}`;
    if (seen.has(key)) {
      dropped.duplicate += 1;
      continue;
    }
    seen.add(key);
    const cleaned = { device: r.device, metric: r.metric, unit, value, timestamp: r.timestamp };
    if (!isFresh(cleaned)) {
      dropped.stale += 1;
      continue;
    }
    out.push(cleaned);
  }
  return { batch: out.finish(), dropped };
}

function stateErrorText(e) {
  const p = e.payload ?? e;
  switch (p.tag) {
    case 'too-large':
      return 'TooLarge';
    case 'quota-exceeded':
      return 'QuotaExceeded';
    case 'io':
      return `Io(${JSON.stringify(p.val)})`;
    default:
      return String(e);
  }
}

export const preprocess = {
  preprocess(message, readings) {
    const cfg = config();
    let stateError = null;
    const { batch, dropped } = clean(message, readings, cfg, (r) => {
      if (!cfg.dropStale || stateError !== null) return true;
      const key = `last/${r.device}/${r.metric}`;
      try {
        const stored = stateGet(key);
        const last = stored == null ? null : i64FromLeBytes(stored);
        if (last !== null && r.timestamp <= last) return false;
        stateSet(key, i64ToLeBytes(r.timestamp));
        return true;
      } catch (e) {
        stateError = e;
        return true;
      }
    });
    if (stateError !== null) throw new PluginError('other', `state: ${stateErrorText(stateError)}`);
    const total = Object.values(dropped).reduce((a, b) => a + b, 0);
    if (total > 0) {
      const detail = Object.entries(dropped)
        .map(([k, v]) => `${k}: ${v}`)
        .join(', ');
      log('debug', `${total} readings dropped from ${message.topic}: Dropped { ${detail} }`);
    }
    return batch;
  },
};
