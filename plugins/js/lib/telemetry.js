// JSON telemetry payloads to readings: the JavaScript twin of the Rust SDK's
// `telemetry::parse_json` (sdk/src/telemetry.rs), field for field.
//
// Accepted shapes (and a top-level array of any of them):
// - one reading: {"device":"m1","metric":"temperature","value":21.5,"unit":"C","ts":1700000000000}
// - a list: {"device":"m1","ts":1700000000000,"readings":[{"metric":"temperature","value":21.5}]}
// - flat fields: {"device":"m1","temperature":21.5,"door_open":false,"units":{"temperature":"C"}}
//
// `device` may also be `id`, `metric` may be `name`, the time `ts`,
// `timestamp` or `time` (epoch seconds below 10^11, else milliseconds, or
// `YYYY-MM-DD[T ]HH:MM[:SS[.fff]][Z|±HH:MM]` text). A null value is skipped.
// Every failure is a BadPayload.

import { JsonError, Reader } from './serde-json.js';
import { f64ToI64, trim } from './rust.js';

export class BadPayload extends Error {}

const NESTED_KIND = { array: 'an array', object: 'an object' };

function kindOf(s) {
  switch (s.t) {
    case 'null':
      return 'null';
    case 'number':
      return 'a number';
    case 'bool':
      return 'a boolean';
    case 'text':
      return 'text';
    default:
      return NESTED_KIND[s.t];
  }
}

/** Scalar::value: what a reading can hold, or null for null and containers. */
function valueOf(s) {
  switch (s.t) {
    case 'number':
      return { tag: 'number', val: s.f };
    case 'bool':
      return { tag: 'boolean', val: s.v };
    case 'text':
      return { tag: 'text', val: s.v };
    default:
      return null;
  }
}

function isNull(s) {
  return s !== undefined && s.t === 'null';
}

// The first non-null device or metric wins (serde visitor order).
function setFirst(o, field, v) {
  if (o[field] === undefined || isNull(o[field])) o[field] = v;
}

/** One telemetry object; fields are kept until it ends (device and time may follow the values). */
function parseObjectBody(r) {
  const o = {
    device: undefined,
    metric: undefined,
    time: undefined,
    unit: undefined,
    value: undefined,
    hasValue: false,
    units: [],
    readings: undefined,
    fields: [],
  };
  const st = { first: true };
  for (let key = r.nextKey(st); key !== null; key = r.nextKey(st)) {
    switch (key) {
      case 'device':
      case 'id':
        setFirst(o, 'device', r.parseScalar());
        break;
      case 'metric':
      case 'name':
        setFirst(o, 'metric', r.parseScalar());
        break;
      case 'ts':
      case 'timestamp':
      case 'time': {
        const v = r.parseScalar();
        if (o.time === undefined && !isNull(v)) o.time = { key, v };
        break;
      }
      case 'unit':
        o.unit = r.parseScalar();
        break;
      case 'value':
        o.hasValue = true;
        o.value = r.parseScalar();
        break;
      case 'units':
        o.units = parseUnits(r);
        break;
      case 'readings':
        o.readings = parseReadings(r);
        break;
      default:
        o.fields.push([key, r.parseScalar()]);
    }
  }
  return o;
}

function parseObject(r) {
  r.enter();
  const o = parseObjectBody(r);
  r.leave();
  r.endMap();
  return o;
}

function parseUnits(r) {
  const c = r.peekWs();
  if (c === 0x6e) {
    r.ident('ull');
    return [];
  }
  if (c !== 0x7b) r.fail('invalid type, expected an object of units');
  r.enter();
  const out = [];
  const st = { first: true };
  for (let key = r.nextKey(st); key !== null; key = r.nextKey(st)) out.push([key, r.parseScalar()]);
  r.leave();
  r.endMap();
  return out;
}

/**
 * `readings`: a list of objects, or an error kept until the object is
 * emitted (a later `readings` key replaces it). After the first element that
 * is not an object the rest are skipped unvalidated, as serde_json does.
 */
function parseReadings(r) {
  const c = r.peekWs();
  if (c === 0x5b) {
    r.enter();
    const list = [];
    let error = null;
    const st = { first: true };
    while (r.nextElement(st)) {
      if (error !== null) {
        r.ignoreValue();
        continue;
      }
      const item = parseItem(r);
      if (item.object !== undefined) list.push(item.object);
      else error = `readings[${list.length}] is ${item.other}, not an object`;
    }
    r.leave();
    r.endSeq();
    return error === null ? { ok: list } : { err: error };
  }
  if (c === 0x7b) {
    r.enter();
    const st = { first: true };
    while (r.nextKey(st) !== null) r.ignoreValue();
    r.leave();
    r.endMap();
    return { err: '`readings` is not an array' };
  }
  r.fail('invalid type, expected a list of readings');
}

/** An array element: a telemetry object, or the kind of anything else. */
function parseItem(r) {
  const c = r.peekWs();
  if (c === 0x7b) return { object: parseObject(r) };
  const s = r.parseScalar();
  return { other: kindOf(s) };
}

function parseDoc(r) {
  const c = r.peekWs();
  if (c === 0x7b) return [parseObject(r)];
  if (c !== 0x5b) r.fail('invalid type, expected a JSON object or array');
  r.enter();
  const items = [];
  const st = { first: true };
  while (r.nextElement(st)) {
    const item = parseItem(r);
    if (item.object === undefined) {
      r.fail(`item ${items.length} of the array is ${item.other}, not an object`);
    }
    items.push(item.object);
  }
  r.leave();
  r.endSeq();
  return items;
}

function textField(slot, key) {
  if (slot === undefined || slot.t === 'null') return undefined;
  if (slot.t === 'text') return slot.v;
  throw new BadPayload(`\`${key}\` should be a string, found ${kindOf(slot)}`);
}

function timeOf(o) {
  if (o.time === undefined) return undefined;
  const { key, v } = o.time;
  if (v.t === 'number') {
    const t = v.f;
    if (!Number.isFinite(t)) throw new BadPayload(`\`${key}\` is not a finite number`);
    return Math.abs(t) < 1e11 ? f64ToI64(t * 1000) : f64ToI64(t);
  }
  if (v.t === 'text') {
    const ms = parseTime(v.v);
    if (ms === null) throw new BadPayload(`\`${key}\`: cannot read time ${JSON.stringify(v.v)}`);
    return ms;
  }
  throw new BadPayload(`\`${key}\` should be a number or text, found ${kindOf(v)}`);
}

function emit(o, options, out) {
  let device = textField(o.device, 'device');
  if (device === undefined) {
    device = options.defaultDevice;
    if (device === undefined) {
      throw new BadPayload('no device: payload has no `device` field and the topic gives none');
    }
  }
  const ts = timeOf(o) ?? options.defaultTimestamp;
  if (o.readings !== undefined) {
    if (o.readings.err !== undefined) throw new BadPayload(o.readings.err);
    o.readings.ok.forEach((reading, i) => {
      try {
        single(reading, device, ts, out);
      } catch (e) {
        if (e instanceof BadPayload) throw new BadPayload(`readings[${i}]: ${e.message}`);
        throw e;
      }
    });
    return;
  }
  if (o.hasValue || o.metric !== undefined) {
    single(o, device, ts, out);
    return;
  }
  for (const [key, v] of o.fields) {
    const value = valueOf(v);
    if (value === null) continue;
    const entry = o.units.find(([k]) => k === key);
    const unit = entry !== undefined && entry[1].t === 'text' ? entry[1].v : '';
    out.push({ device, metric: key, value, unit, timestamp: ts });
  }
}

function single(o, defaultDevice, defaultTs, out) {
  const device = textField(o.device, 'device') ?? defaultDevice;
  const metric = textField(o.metric, 'metric');
  if (metric === undefined) throw new BadPayload('reading has no `metric`');
  const ts = timeOf(o) ?? defaultTs;
  const unit = textField(o.unit, 'unit') ?? '';
  const raw = o.value;
  if (raw === undefined) throw new BadPayload(`reading \`${metric}\` has no \`value\``);
  if (raw.t === 'null') return;
  const value = valueOf(raw);
  if (value === null) throw new BadPayload(`reading \`${metric}\`: value is ${kindOf(raw)}`);
  out.push({ device, metric, value, unit, timestamp: ts });
}

/**
 * ParseOptions::from_topic: the device defaults to topic level `level`
 * (0-based) when given and not empty.
 */
export function optionsFromTopic(topic, level, defaultTimestamp) {
  let defaultDevice;
  if (level !== undefined) {
    const part = topic.split('/')[level];
    if (part !== undefined && part !== '') defaultDevice = part;
  }
  return { defaultDevice, defaultTimestamp };
}

/**
 * The readings in a payload, as { device, metric, value, unit, timestamp }
 * with value a WIT `value` and timestamp a BigInt; throws BadPayload.
 */
export function parseJson(payload, options) {
  let docs;
  try {
    const r = new Reader(payload);
    docs = parseDoc(r);
    r.end();
  } catch (e) {
    if (e instanceof JsonError) throw new BadPayload(`invalid JSON: ${e.message}`);
    throw e;
  }
  const out = [];
  for (const o of docs) emit(o, options, out);
  return out;
}

/**
 * Milliseconds since the Unix epoch (BigInt) for
 * `YYYY-MM-DD[T ]HH:MM[:SS[.fff]][Z|±HH:MM]` (UTC when no offset is given),
 * or null when the text is not such a time. Works on UTF-8 bytes as the Rust
 * code does, so lengths and positions agree for non-ASCII text.
 */
export function parseTime(s) {
  const b = new TextEncoder().encode(trim(s));
  const num = (start, end) => {
    if (end > b.length || start >= end) return null;
    let n = 0;
    for (let k = start; k < end; k++) {
      if (b[k] < 0x30 || b[k] > 0x39) return null;
      n = n * 10 + (b[k] - 0x30);
    }
    return n;
  };
  if (
    b.length < 16 ||
    b[4] !== 0x2d ||
    b[7] !== 0x2d ||
    !(b[10] === 0x54 || b[10] === 0x20 || b[10] === 0x74) ||
    b[13] !== 0x3a
  ) {
    return null;
  }
  const year = num(0, 4);
  const month = num(5, 7);
  const day = num(8, 10);
  const hour = num(11, 13);
  const minute = num(14, 16);
  if (year === null || month === null || day === null || hour === null || minute === null) return null;
  let i = 16;
  let second = 0;
  let millis = 0;
  if (b[i] === 0x3a) {
    second = num(i + 1, i + 3);
    if (second === null) return null;
    i += 3;
    if (b[i] === 0x2e) {
      const start = i + 1;
      let end = start;
      while (end < b.length && b[end] >= 0x30 && b[end] <= 0x39) end++;
      if (end === start) return null;
      const used = Math.min(end, start + 3);
      millis = num(start, used) * 10 ** (3 - (used - start));
      i = end;
    }
  }
  let offsetMinutes;
  if (i >= b.length) {
    offsetMinutes = 0;
  } else if ((b[i] === 0x5a || b[i] === 0x7a) && i + 1 === b.length) {
    offsetMinutes = 0;
  } else if ((b[i] === 0x2b || b[i] === 0x2d) && b.length === i + 6 && b[i + 3] === 0x3a) {
    const h = num(i + 1, i + 3);
    if (h === null) return null;
    const m = num(i + 4, i + 6);
    if (m === null) return null;
    offsetMinutes = b[i] === 0x2b ? h * 60 + m : -(h * 60 + m);
  } else {
    return null;
  }
  if (month < 1 || month > 12 || day < 1 || day > 31 || hour > 23 || minute > 59 || second > 60) {
    return null;
  }
  const days = daysFromCivil(year, month, day);
  // Every term stays far below 2^53, so Number arithmetic is exact here.
  const ms = (days * 86400 + hour * 3600 + minute * 60 + second - offsetMinutes * 60) * 1000 + millis;
  return BigInt(ms);
}

/** Days since 1970-01-01 in the proleptic Gregorian calendar (H. Hinnant's algorithm). */
function daysFromCivil(y, m, d) {
  const yy = m <= 2 ? y - 1 : y;
  const era = Math.floor(yy / 400);
  const yoe = yy - era * 400;
  const mp = (m + 9) % 12;
  const doy = Math.floor((153 * mp + 2) / 5) + d - 1;
  const doe = yoe * 365 + Math.floor(yoe / 4) - Math.floor(yoe / 100) + doy;
  return era * 146097 + doe - 719468;
}
