// Rust standard-library behaviour that JavaScript's built-ins get subtly
// wrong for our purposes: the plugins must give byte-identical results to
// their Rust counterparts.

// char::is_whitespace (Unicode White_Space). String.prototype.trim differs:
// it strips U+FEFF and keeps U+0085.
function isRustWhitespace(c) {
  return (
    (c >= 0x09 && c <= 0x0d) ||
    c === 0x20 ||
    c === 0x85 ||
    c === 0xa0 ||
    c === 0x1680 ||
    (c >= 0x2000 && c <= 0x200a) ||
    c === 0x2028 ||
    c === 0x2029 ||
    c === 0x202f ||
    c === 0x205f ||
    c === 0x3000
  );
}

/** str::trim */
export function trim(s) {
  let start = 0;
  let end = s.length;
  while (start < end && isRustWhitespace(s.charCodeAt(start))) start++;
  while (end > start && isRustWhitespace(s.charCodeAt(end - 1))) end--;
  return start === 0 && end === s.length ? s : s.slice(start, end);
}

/** str::to_ascii_lowercase: only A-Z change (toLowerCase also folds e.g. U+212A KELVIN SIGN to "k"). */
export function asciiLowercase(s) {
  return s.replace(/[A-Z]+/g, (m) => m.toLowerCase());
}

const DECIMAL = /^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$/;
const SPECIAL = /^([+-]?)(inf|infinity|nan)$/i;

/**
 * `s.parse::<f64>()`, or null where Rust returns an error. Number() accepts
 * more ("", "0x10", "1_000" is rejected by both but " 1" is not), so the
 * grammar is checked first; both round correctly, so the value then agrees.
 */
export function parseF64(s) {
  if (DECIMAL.test(s)) return Number(s);
  const m = SPECIAL.exec(s);
  if (m === null) return null;
  if (m[2].toLowerCase() === 'nan') return NaN;
  return m[1] === '-' ? -Infinity : Infinity;
}

export const I64_MIN = -(2n ** 63n);
export const I64_MAX = 2n ** 63n - 1n;

/** `x as i64`: truncates toward zero, saturates, NaN is 0. */
export function f64ToI64(x) {
  if (Number.isNaN(x)) return 0n;
  if (x >= 9223372036854775807) return I64_MAX;
  if (x <= -9223372036854775808) return I64_MIN;
  return BigInt(Math.trunc(x));
}

/** i64::to_le_bytes */
export function i64ToLeBytes(v) {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigInt64(0, v, true);
  return out;
}

/** i64::from_le_bytes over exactly 8 bytes, else null (what state::get_i64 does). */
export function i64FromLeBytes(bytes) {
  if (bytes.length !== 8) return null;
  return new DataView(bytes.buffer, bytes.byteOffset, 8).getBigInt64(0, true);
}

/** Ord for str: UTF-8 byte order, which is code point order (not UTF-16 order). */
export function compareStr(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    const x = a.charCodeAt(i);
    const y = b.charCodeAt(i);
    if (x !== y) {
      const xs = x >= 0xd800 && x <= 0xdfff;
      const ys = y >= 0xd800 && y <= 0xdfff;
      if (xs !== ys) return xs ? 1 : -1;
      return x < y ? -1 : 1;
    }
  }
  return a.length - b.length;
}
