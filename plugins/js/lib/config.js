// Plugin settings the way the Rust SDK reads them: `serde_json::from_str`
// into a `#[derive(Deserialize)] #[serde(deny_unknown_fields)]` struct, so
// an unknown or repeated key, a wrong type, a negative or fractional count
// or a number out of range is a bad-config error.

import { Reader } from './serde-json.js';

// usize on wasm32, the Rust plugins' target.
const USIZE_MAX = 4294967295;

function number(r) {
  const c = r.peekWs();
  if (c !== 0x2d && !(c >= 0x30 && c <= 0x39)) r.fail('invalid type, expected a number');
  return r.parseAnyNumber();
}

export function usize(r) {
  const n = number(r);
  if (n.kind === 'f64') r.fail(`invalid type: floating point \`${n.f}\`, expected usize`);
  if (n.kind === 'i64' || n.f > USIZE_MAX) r.fail(`invalid value: integer \`${n.text}\`, expected usize`);
  return n.f;
}

export function f64(r) {
  return number(r).f;
}

export function bool(r) {
  const c = r.peekWs();
  if (c === 0x74) {
    r.ident('rue');
    return true;
  }
  if (c === 0x66) {
    r.ident('alse');
    return false;
  }
  r.fail('invalid type, expected a boolean');
}

export function string(r) {
  if (r.peekWs() !== 0x22) r.fail('invalid type, expected a string');
  r.i += 1;
  return r.parseStrBody();
}

/** Option<T>: null is None (undefined here). */
export function option(inner) {
  return (r) => {
    if (r.peekWs() === 0x6e) {
      r.ident('ull');
      return undefined;
    }
    return inner(r);
  };
}

/** HashMap<String, T>: a repeated key keeps its last value. */
export function map(inner) {
  return (r) => {
    if (r.peekWs() !== 0x7b) r.fail('invalid type, expected a map');
    r.enter();
    const out = new Map();
    const st = { first: true };
    for (let key = r.nextKey(st); key !== null; key = r.nextKey(st)) out.set(key, inner(r));
    r.leave();
    r.endMap();
    return out;
  };
}

/** [T; n] */
export function array(inner, n) {
  return (r) => {
    if (r.peekWs() !== 0x5b) r.fail(`invalid type, expected an array of length ${n}`);
    r.enter();
    const out = [];
    const st = { first: true };
    for (let k = 0; k < n; k++) {
      if (!r.nextElement(st)) r.fail(`invalid length ${k}, expected an array of length ${n}`);
      out.push(inner(r));
    }
    r.leave();
    r.endSeq();
    return out;
  };
}

/**
 * The settings object as { field: value } for the fields present; `fields`
 * maps each allowed key to its reader. Throws a JsonError saying what is wrong.
 */
export function parseStruct(text, fields) {
  const r = new Reader(new TextEncoder().encode(text));
  if (r.peekWs() !== 0x7b) r.fail('invalid type, expected a settings object');
  r.enter();
  const out = {};
  const st = { first: true };
  for (let key = r.nextKey(st); key !== null; key = r.nextKey(st)) {
    if (!Object.hasOwn(fields, key)) {
      r.fail(`unknown field \`${key}\`, expected one of ${Object.keys(fields).map((f) => `\`${f}\``).join(', ')}`);
    }
    if (Object.hasOwn(out, key)) r.fail(`duplicate field \`${key}\``);
    out[key] = fields[key](r);
  }
  r.leave();
  r.endMap();
  r.end();
  return out;
}
