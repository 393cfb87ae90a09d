// A JSON reader and writer that accept, reject and round exactly like
// serde_json 1.0.154 as the Rust plugins build it (from a byte slice, default
// features: no float_roundtrip, no arbitrary_precision, no preserve_order).
// JSON.parse cannot stand in for it: it turns 1e400 into Infinity instead of
// failing, loses duplicate keys, rounds differently for long numbers, and
// cannot tell 1 from 1.0. serde_json also only validates strings it keeps:
// values a visitor skips are checked for syntax alone.

export class JsonError extends Error {}

const MAX_DEPTH = 128;

// serde_json's POW10 table: the f64 literals 1e0 ..= 1e308.
const POW10 = Array.from({ length: 309 }, (_, i) => Number(`1e${i}`));

// Below this, significand * 10 + digit is exact as a double.
const SMALL_SIGNIFICAND = 9e14;
const U64_MAX_DIV_10 = 1844674407370955161n;
const I32_MAX_DIV_10 = 214748364;
const I32_MAX = 2147483647;
const I32_MIN = -2147483648;
const TWO_POW_63 = 2n ** 63n;

const textEncoder = new TextEncoder();

export function utf8(s) {
  return textEncoder.encode(s);
}

function isDigit(b) {
  return b >= 0x30 && b <= 0x39;
}

function hexValue(b) {
  if (b >= 0x30 && b <= 0x39) return b - 0x30;
  if (b >= 0x41 && b <= 0x46) return b - 0x41 + 10;
  if (b >= 0x61 && b <= 0x66) return b - 0x61 + 10;
  return -1;
}

/** Strict UTF-8 (what str::from_utf8 accepts) to a string; throws on invalid input. */
export function decodeUtf8(b, start, end) {
  let out = '';
  let i = start;
  while (i < end) {
    let run = i;
    while (run < end && b[run] < 0x80) run++;
    if (run > i) {
      for (let j = i; j < run; j += 4096) {
        out += String.fromCharCode.apply(null, b.subarray(j, Math.min(run, j + 4096)));
      }
      i = run;
      if (i >= end) break;
    }
    const b0 = b[i];
    let need;
    let cp;
    let lo = 0x80;
    let hi = 0xbf;
    if (b0 >= 0xc2 && b0 <= 0xdf) {
      need = 1;
      cp = b0 & 0x1f;
    } else if (b0 >= 0xe0 && b0 <= 0xef) {
      need = 2;
      cp = b0 & 0x0f;
      if (b0 === 0xe0) lo = 0xa0;
      if (b0 === 0xed) hi = 0x9f;
    } else if (b0 >= 0xf0 && b0 <= 0xf4) {
      need = 3;
      cp = b0 & 0x07;
      if (b0 === 0xf0) lo = 0x90;
      if (b0 === 0xf4) hi = 0x8f;
    } else {
      throw new JsonError('invalid unicode code point');
    }
    for (let k = 1; k <= need; k++) {
      const c = b[i + k];
      const min = k === 1 ? lo : 0x80;
      const max = k === 1 ? hi : 0xbf;
      if (i + k >= end || c < min || c > max) {
        throw new JsonError('invalid unicode code point');
      }
      cp = (cp << 6) | (c & 0x3f);
    }
    out += String.fromCodePoint(cp);
    i += need + 1;
  }
  return out;
}

function significandStep(sig, digit) {
  if (typeof sig === 'number') {
    if (sig < SMALL_SIGNIFICAND) return sig * 10 + digit;
    sig = BigInt(sig);
  }
  return sig * 10n + BigInt(digit);
}

/** serde_json's overflow!(significand * 10 + digit, u64::MAX) */
function significandOverflows(sig, digit) {
  if (typeof sig === 'number') return false;
  return sig >= U64_MAX_DIV_10 && (sig > U64_MAX_DIV_10 || digit > 5);
}

function significandToF64(sig) {
  return typeof sig === 'number' ? sig : Number(sig);
}

function saturatingI32(x) {
  return x > I32_MAX ? I32_MAX : x < I32_MIN ? I32_MIN : x;
}

/**
 * A number as serde_json's parser hands it to a visitor: `kind` is u64, i64
 * or f64 (which visit_* is called), `f` the value as f64, `text` the exact
 * integer for u64/i64 (Value keeps those exactly).
 */
function number(kind, f, text) {
  return { t: 'number', kind, f, text };
}

export class Reader {
  constructor(bytes) {
    this.b = bytes;
    this.i = 0;
    this.depth = MAX_DEPTH;
  }

  fail(message) {
    throw new JsonError(`${message} at byte ${this.i}`);
  }

  /** parse_whitespace: the next byte after JSON whitespace, or -1 at the end. */
  peekWs() {
    const b = this.b;
    let i = this.i;
    while (i < b.length) {
      const c = b[i];
      if (c !== 0x20 && c !== 0x0a && c !== 0x09 && c !== 0x0d) break;
      i++;
    }
    this.i = i;
    return i < b.length ? b[i] : -1;
  }

  peek() {
    return this.i < this.b.length ? this.b[this.i] : -1;
  }

  /** Deserializer::end: only whitespace may follow the value. */
  end() {
    if (this.peekWs() !== -1) this.fail('trailing characters');
  }

  /** check_recursion!: entering an array or object the visitor looks into. */
  enter() {
    this.depth -= 1;
    if (this.depth === 0) this.fail('recursion limit exceeded');
    this.i += 1;
  }

  leave() {
    this.depth += 1;
  }

  ident(rest) {
    this.i += 1;
    for (let k = 0; k < rest.length; k++) {
      if (this.i >= this.b.length) this.fail('EOF while parsing a value');
      if (this.b[this.i] !== rest.charCodeAt(k)) this.fail('expected ident');
      this.i += 1;
    }
  }

  // SeqAccess::has_next_element; `state.first` starts true. Does not eat `]`.
  nextElement(state) {
    const c = this.peekWs();
    if (c === -1) this.fail('EOF while parsing a list');
    if (c === 0x5d) return false;
    if (state.first) {
      state.first = false;
      return true;
    }
    if (c !== 0x2c) this.fail('expected `,` or `]`');
    this.i += 1;
    const d = this.peekWs();
    if (d === 0x5d) this.fail('trailing comma');
    if (d === -1) this.fail('EOF while parsing a value');
    return true;
  }

  endSeq() {
    const c = this.peekWs();
    if (c !== 0x5d) this.fail(c === -1 ? 'EOF while parsing a list' : 'trailing characters');
    this.i += 1;
  }

  // MapAccess::next_key_seed: parses the key (always validated) and the colon.
  nextKey(state) {
    const c = this.peekWs();
    if (c === -1) this.fail('EOF while parsing an object');
    if (c === 0x7d) return null;
    if (state.first) {
      state.first = false;
      if (c !== 0x22) this.fail('key must be a string');
    } else {
      if (c !== 0x2c) this.fail('expected `,` or `}`');
      this.i += 1;
      const d = this.peekWs();
      if (d === 0x7d) this.fail('trailing comma');
      if (d !== 0x22) this.fail(d === -1 ? 'EOF while parsing a value' : 'key must be a string');
    }
    this.i += 1;
    const key = this.parseStrBody();
    if (this.peekWs() !== 0x3a) this.fail('expected `:`');
    this.i += 1;
    return key;
  }

  endMap() {
    const c = this.peekWs();
    if (c !== 0x7d) this.fail(c === -1 ? 'EOF while parsing an object' : 'trailing characters');
    this.i += 1;
  }

  /** Moves to the next quote, backslash or control byte of a string and returns it. */
  toStringStop() {
    const b = this.b;
    let i = this.i;
    while (i < b.length) {
      const c = b[i];
      if (c === 0x22 || c === 0x5c || c < 0x20) break;
      i++;
    }
    this.i = i;
    if (i >= b.length) this.fail('EOF while parsing a string');
    return b[i];
  }

  /** SliceRead::parse_str after the opening quote: validated UTF-8, paired surrogates. */
  parseStrBody() {
    let out = '';
    let start = this.i;
    for (;;) {
      const c = this.toStringStop();
      const i = this.i;
      if (c === 0x22) {
        out += this.decode(start, i);
        this.i = i + 1;
        return out;
      }
      if (c === 0x5c) {
        out += this.decode(start, i);
        this.i = i + 1;
        out += this.parseEscape();
        start = this.i;
      } else {
        this.i = i + 1;
        this.fail('control character (\\u0000-\\u001F) found while parsing a string');
      }
    }
  }

  decode(start, end) {
    try {
      return decodeUtf8(this.b, start, end);
    } catch (e) {
      this.fail('invalid unicode code point');
    }
  }

  parseEscape() {
    if (this.i >= this.b.length) this.fail('EOF while parsing a string');
    const c = this.b[this.i++];
    switch (c) {
      case 0x22:
        return '"';
      case 0x5c:
        return '\\';
      case 0x2f:
        return '/';
      case 0x62:
        return '\b';
      case 0x66:
        return '\f';
      case 0x6e:
        return '\n';
      case 0x72:
        return '\r';
      case 0x74:
        return '\t';
      case 0x75:
        return this.parseUnicodeEscape();
      default:
        this.fail('invalid escape');
    }
  }

  hex4() {
    if (this.b.length - this.i < 4) {
      this.i = this.b.length;
      this.fail('EOF while parsing a string');
    }
    let n = 0;
    for (let k = 0; k < 4; k++) {
      const v = hexValue(this.b[this.i + k]);
      if (v < 0) this.fail('invalid escape');
      n = n * 16 + v;
    }
    this.i += 4;
    return n;
  }

  parseUnicodeEscape() {
    const n = this.hex4();
    if (n >= 0xdc00 && n <= 0xdfff) this.fail('lone leading surrogate in hex escape');
    if (n < 0xd800 || n > 0xdbff) return String.fromCharCode(n);
    if (this.peek() === -1) this.fail('EOF while parsing a string');
    if (this.peek() !== 0x5c) this.fail('unexpected end of hex escape');
    this.i += 1;
    if (this.peek() === -1) this.fail('EOF while parsing a string');
    if (this.peek() !== 0x75) this.fail('unexpected end of hex escape');
    this.i += 1;
    const n2 = this.hex4();
    if (n2 < 0xdc00 || n2 > 0xdfff) this.fail('lone leading surrogate in hex escape');
    return String.fromCharCode(n, n2);
  }

  /** SliceRead::ignore_str after the opening quote: escapes and control characters only. */
  ignoreStrBody() {
    const b = this.b;
    for (;;) {
      const c = this.toStringStop();
      const i = this.i;
      if (c === 0x22) {
        this.i = i + 1;
        return;
      }
      if (c !== 0x5c) this.fail('control character (\\u0000-\\u001F) found while parsing a string');
      this.i = i + 1;
      if (this.i >= b.length) this.fail('EOF while parsing a string');
      const e = b[this.i++];
      if (e === 0x75) {
        this.hex4();
      } else if (
        e !== 0x22 &&
        e !== 0x5c &&
        e !== 0x2f &&
        e !== 0x62 &&
        e !== 0x66 &&
        e !== 0x6e &&
        e !== 0x72 &&
        e !== 0x74
      ) {
        this.fail('invalid escape');
      }
    }
  }

  // ---- numbers (Deserializer::parse_integer and friends) ----

  /** After an optional `-` was eaten. */
  parseInteger(positive) {
    if (this.i >= this.b.length) this.fail('EOF while parsing a value');
    const c = this.b[this.i++];
    if (c === 0x30) {
      if (isDigit(this.peek())) this.fail('invalid number');
      return this.parseNumber(positive, 0);
    }
    if (c >= 0x31 && c <= 0x39) {
      let sig = c - 0x30;
      for (;;) {
        const d = this.peek();
        if (!isDigit(d)) return this.parseNumber(positive, sig);
        const digit = d - 0x30;
        if (significandOverflows(sig, digit)) {
          return number('f64', this.parseLongInteger(positive, sig));
        }
        this.i += 1;
        sig = significandStep(sig, digit);
      }
    }
    this.fail('invalid number');
  }

  parseNumber(positive, sig) {
    const c = this.peek();
    if (c === 0x2e) return number('f64', this.parseDecimal(positive, sig, 0));
    if (c === 0x65 || c === 0x45) return number('f64', this.parseExponent(positive, sig, 0));
    const big = typeof sig === 'number' ? null : sig;
    if (positive) return number('u64', significandToF64(sig), String(sig));
    if (big === null ? sig === 0 : big === 0n) return number('f64', -0);
    if (big !== null && big > TWO_POW_63) return number('f64', -significandToF64(sig));
    return number('i64', -significandToF64(sig), `-${sig}`);
  }

  parseDecimal(positive, sig, exponentBefore) {
    this.i += 1;
    let after = 0;
    for (;;) {
      const d = this.peek();
      if (!isDigit(d)) break;
      const digit = d - 0x30;
      if (significandOverflows(sig, digit)) {
        return this.parseDecimalOverflow(positive, sig, exponentBefore + after);
      }
      this.i += 1;
      sig = significandStep(sig, digit);
      after -= 1;
    }
    if (after === 0) {
      this.fail(this.peek() === -1 ? 'EOF while parsing a value' : 'invalid number');
    }
    const exponent = exponentBefore + after;
    const c = this.peek();
    if (c === 0x65 || c === 0x45) return this.parseExponent(positive, sig, exponent);
    return this.f64FromParts(positive, sig, exponent);
  }

  parseExponent(positive, sig, startingExp) {
    this.i += 1;
    let positiveExp = true;
    const s = this.peek();
    if (s === 0x2b) {
      this.i += 1;
    } else if (s === 0x2d) {
      this.i += 1;
      positiveExp = false;
    }
    if (this.i >= this.b.length) this.fail('EOF while parsing a value');
    const first = this.b[this.i++];
    if (!isDigit(first)) this.fail('invalid number');
    let exp = first - 0x30;
    for (;;) {
      const d = this.peek();
      if (!isDigit(d)) break;
      this.i += 1;
      const digit = d - 0x30;
      if (exp >= I32_MAX_DIV_10 && (exp > I32_MAX_DIV_10 || digit > 7)) {
        const zero = typeof sig === 'number' ? sig === 0 : sig === 0n;
        return this.parseExponentOverflow(positive, zero, positiveExp);
      }
      exp = exp * 10 + digit;
    }
    const finalExp = saturatingI32(positiveExp ? startingExp + exp : startingExp - exp);
    return this.f64FromParts(positive, sig, finalExp);
  }

  parseExponentOverflow(positive, zeroSignificand, positiveExp) {
    if (!zeroSignificand && positiveExp) this.fail('number out of range');
    while (isDigit(this.peek())) this.i += 1;
    return positive ? 0 : -0;
  }

  parseLongInteger(positive, sig) {
    let exponent = 0;
    for (;;) {
      const c = this.peek();
      if (isDigit(c)) {
        this.i += 1;
        exponent += 1;
      } else if (c === 0x2e) {
        return this.parseDecimal(positive, sig, exponent);
      } else if (c === 0x65 || c === 0x45) {
        return this.parseExponent(positive, sig, exponent);
      } else {
        return this.f64FromParts(positive, sig, exponent);
      }
    }
  }

  parseDecimalOverflow(positive, sig, exponent) {
    while (isDigit(this.peek())) this.i += 1;
    const c = this.peek();
    if (c === 0x65 || c === 0x45) return this.parseExponent(positive, sig, exponent);
    return this.f64FromParts(positive, sig, exponent);
  }

  f64FromParts(positive, sig, exponent) {
    let f = significandToF64(sig);
    for (;;) {
      const k = Math.abs(exponent);
      if (k < POW10.length) {
        if (exponent >= 0) {
          f *= POW10[k];
          if (!Number.isFinite(f)) this.fail('number out of range');
        } else {
          f /= POW10[k];
        }
        break;
      }
      if (f === 0) break;
      if (exponent >= 0) this.fail('number out of range');
      f /= 1e308;
      exponent += 308;
    }
    return positive ? f : -f;
  }

  /** A number where the deserializer asked for any value (deserialize_any / deserialize_number). */
  parseAnyNumber() {
    if (this.b[this.i] === 0x2d) {
      this.i += 1;
      return this.parseInteger(false);
    }
    return this.parseInteger(true);
  }

  ignoreNumber() {
    if (this.b[this.i] === 0x2d) this.i += 1;
    if (this.i >= this.b.length) this.fail('invalid number');
    const c = this.b[this.i++];
    if (c === 0x30) {
      if (isDigit(this.peek())) this.fail('invalid number');
    } else if (c >= 0x31 && c <= 0x39) {
      while (isDigit(this.peek())) this.i += 1;
    } else {
      this.fail('invalid number');
    }
    if (this.peek() === 0x2e) {
      this.i += 1;
      let any = false;
      while (isDigit(this.peek())) {
        this.i += 1;
        any = true;
      }
      if (!any) this.fail('invalid number');
    }
    const e = this.peek();
    if (e === 0x65 || e === 0x45) {
      this.i += 1;
      const s = this.peek();
      if (s === 0x2b || s === 0x2d) this.i += 1;
      if (!isDigit(this.peek())) this.fail('invalid number');
      this.i += 1;
      while (isDigit(this.peek())) this.i += 1;
    }
  }

  /** Deserializer::ignore_value (IgnoredAny): syntax only, no depth limit, strings unvalidated. */
  ignoreValue() {
    const stack = [];
    for (;;) {
      const c = this.peekWs();
      let opened = false;
      switch (c) {
        case -1:
          this.fail('EOF while parsing a value');
          break;
        case 0x6e:
          this.ident('ull');
          break;
        case 0x74:
          this.ident('rue');
          break;
        case 0x66:
          this.ident('alse');
          break;
        case 0x22:
          this.i += 1;
          this.ignoreStrBody();
          break;
        case 0x5b:
        case 0x7b:
          this.i += 1;
          stack.push(c);
          opened = true;
          break;
        default:
          if (c === 0x2d || isDigit(c)) this.ignoreNumber();
          else this.fail('expected value');
      }
      let acceptComma = !opened;
      if (stack.length === 0) return;
      for (;;) {
        const frame = stack[stack.length - 1];
        const d = this.peekWs();
        if (d === 0x2c && acceptComma) {
          this.i += 1;
          break;
        }
        if ((d === 0x5d && frame === 0x5b) || (d === 0x7d && frame === 0x7b)) {
          this.i += 1;
          stack.pop();
          if (stack.length === 0) return;
          acceptComma = true;
          continue;
        }
        if (d === -1) this.fail(frame === 0x5b ? 'EOF while parsing a list' : 'EOF while parsing an object');
        if (acceptComma) this.fail(frame === 0x5b ? 'expected `,` or `]`' : 'expected `,` or `}`');
        break;
      }
      if (stack[stack.length - 1] === 0x7b) {
        const k = this.peekWs();
        if (k === -1) this.fail('EOF while parsing an object');
        if (k !== 0x22) this.fail('key must be a string');
        this.i += 1;
        this.ignoreStrBody();
        const colon = this.peekWs();
        if (colon === -1) this.fail('EOF while parsing an object');
        if (colon !== 0x3a) this.fail('expected `:`');
        this.i += 1;
      }
    }
  }

  /**
   * deserialize_any into a visitor that keeps scalars and only notes
   * containers (elements skipped as IgnoredAny, object keys still parsed):
   * { t: 'null' | 'bool' | 'number' | 'text' | 'array' | 'object' }.
   */
  parseScalar() {
    const c = this.peekWs();
    switch (c) {
      case 0x6e:
        this.ident('ull');
        return { t: 'null' };
      case 0x74:
        this.ident('rue');
        return { t: 'bool', v: true };
      case 0x66:
        this.ident('alse');
        return { t: 'bool', v: false };
      case 0x22:
        this.i += 1;
        return { t: 'text', v: this.parseStrBody() };
      case 0x5b: {
        this.enter();
        const st = { first: true };
        while (this.nextElement(st)) this.ignoreValue();
        this.leave();
        this.endSeq();
        return { t: 'array' };
      }
      case 0x7b: {
        this.enter();
        const st = { first: true };
        while (this.nextKey(st) !== null) this.ignoreValue();
        this.leave();
        this.endMap();
        return { t: 'object' };
      }
      case -1:
        this.fail('EOF while parsing a value');
        break;
      default:
        if (c === 0x2d || isDigit(c)) return this.parseAnyNumber();
        this.fail('expected value');
    }
  }

  /**
   * serde_json::Value: { t: 'null' | 'bool' | 'number' | 'text' }, arrays as
   * { t: 'array', v: [...] }, objects as { t: 'object', v: Map } where a
   * repeated key keeps its last value (BTreeMap::insert).
   */
  parseValue() {
    const c = this.peekWs();
    if (c === 0x5b) {
      this.enter();
      const st = { first: true };
      const items = [];
      while (this.nextElement(st)) items.push(this.parseValue());
      this.leave();
      this.endSeq();
      return { t: 'array', v: items };
    }
    if (c === 0x7b) {
      this.enter();
      const st = { first: true };
      const map = new Map();
      for (let key = this.nextKey(st); key !== null; key = this.nextKey(st)) {
        map.set(key, this.parseValue());
      }
      this.leave();
      this.endMap();
      return { t: 'object', v: map };
    }
    return this.parseScalar();
  }
}

/** Compact serde_json text of a value from parseValue (Display for Value). */
export function stringify(v, compareKeys) {
  switch (v.t) {
    case 'null':
      return 'null';
    case 'bool':
      return v.v ? 'true' : 'false';
    case 'number':
      return v.kind === 'f64' ? formatF64(v.f) : v.text;
    case 'text':
      return quote(v.v);
    case 'array':
      return `[${v.v.map((x) => stringify(x, compareKeys)).join(',')}]`;
    case 'object': {
      const keys = [...v.v.keys()].sort(compareKeys);
      return `{${keys.map((k) => `${quote(k)}:${stringify(v.v.get(k), compareKeys)}`).join(',')}}`;
    }
    default:
      throw new Error(`not a JSON value: ${v.t}`);
  }
}

const SHORT_ESCAPES = { 0x08: '\\b', 0x09: '\\t', 0x0a: '\\n', 0x0c: '\\f', 0x0d: '\\r', 0x22: '\\"', 0x5c: '\\\\' };

/** serde_json's string escaping: `"`, `\` and C0 controls only (JSON.stringify also escapes lone surrogates). */
export function quote(s) {
  let out = '"';
  let start = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0x20 && c !== 0x22 && c !== 0x5c) continue;
    out += s.slice(start, i);
    out += SHORT_ESCAPES[c] ?? `\\u00${c.toString(16).padStart(2, '0')}`;
    start = i + 1;
  }
  return `${out}${s.slice(start)}"`;
}

/**
 * A finite f64 as zmij (serde_json's float writer) prints it: the shortest
 * round-tripping digits, like JavaScript, but laid out differently: plain
 * notation with a `.0` for decimal exponents -5..=15, else `1.5e+16` style.
 */
export function formatF64(x) {
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  const sign = x < 0 ? '-' : '';
  const [mantissa, expText] = Math.abs(x).toExponential().split('e');
  const exp = Number(expText);
  if (exp < -5 || exp > 15) return `${sign}${mantissa}e${exp >= 0 ? '+' : '-'}${Math.abs(exp)}`;
  const digits = mantissa.replace('.', '');
  if (digits.length - 1 <= exp) return `${sign}${digits}${'0'.repeat(exp + 1 - digits.length)}.0`;
  if (exp >= 0) return `${sign}${digits.slice(0, exp + 1)}.${digits.slice(exp + 1)}`;
  return `${sign}0.${'0'.repeat(-exp - 1)}${digits}`;
}
