"""JSON reading and writing with the exact semantics of Rust's serde_json 1.0
(default features: no `float_roundtrip`, no `arbitrary_precision`, no
`preserve_order`), which the Rust plugins use.

Python's `json` module differs from it in ways that change results: it
accepts `NaN`/`Infinity` and numbers out of f64 range, lone surrogate
escapes and control characters in strings; it rounds long decimals
correctly where serde_json's default parser may be off by one ulp; and it
writes floats differently. So the Python plugins read and write JSON here.

`Reader` mirrors serde_json's `Deserializer` over a byte slice: each method
names the serde_json function it follows. Plugins build their serde
visitors on it, so that which inputs are accepted, and what they read as,
is the same as in Rust.
"""

import re

U64_MAX = 2**64 - 1
I32_MAX = 2**31 - 1
I32_MIN = -(2**31)

# serde_json's POW10 table: 1e0 ..= 1e308, each a correctly rounded literal.
POW10 = [float("1e%d" % i) for i in range(309)]

_STR_STOP = re.compile(rb'["\\\x00-\x1f]')
_SIMPLE_ESCAPES = {
    ord('"'): b'"',
    ord("\\"): b"\\",
    ord("/"): b"/",
    ord("b"): b"\x08",
    ord("f"): b"\x0c",
    ord("n"): b"\n",
    ord("r"): b"\r",
    ord("t"): b"\t",
}
_HEX = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}
_LITERALS = {ord("n"): (b"ull", None), ord("t"): (b"rue", True), ord("f"): (b"alse", False)}


class JsonError(Exception):
    """Input that serde_json refuses. `data` is serde_json's `is_data()`:
    well-formed JSON of the wrong shape, as opposed to a syntax error."""

    def __init__(self, message, data=False):
        super().__init__(message)
        self.data = data


def shape_error(message):
    return JsonError(message, data=True)


class Num:
    """A JSON number as serde_json's parser classifies it: `u` (fits u64),
    `i` (negative, fits i64) or `f` (anything else, as f64)."""

    __slots__ = ("kind", "value")

    def __init__(self, kind, value):
        self.kind = kind
        self.value = value

    def as_f64(self):
        return float(self.value)


def _overflow(a, digit, limit):
    # serde_json's `overflow!(a * 10 + digit, limit)`.
    return a >= limit // 10 and (a > limit // 10 or digit > limit % 10)


def _is_digit(c):
    return c is not None and 0x30 <= c <= 0x39


class Reader:
    def __init__(self, data):
        self.b = bytes(data)
        self.n = len(self.b)
        self.i = 0
        self.remaining_depth = 128

    # -- bytes -------------------------------------------------------------

    def peek(self):
        return self.b[self.i] if self.i < self.n else None

    def eat(self):
        self.i += 1

    def next_char(self):
        if self.i < self.n:
            c = self.b[self.i]
            self.i += 1
            return c
        return None

    def ws(self):
        """`parse_whitespace`: the next byte that is not JSON whitespace."""
        b, i, n = self.b, self.i, self.n
        while i < n and b[i] in b" \n\t\r":
            i += 1
        self.i = i
        return b[i] if i < n else None

    def end(self):
        if self.ws() is not None:
            raise JsonError("trailing characters")

    def ident(self, rest):
        """`parse_ident`: the rest of `null`, `true` or `false`."""
        if self.b[self.i : self.i + len(rest)] != rest:
            raise JsonError("expected ident")
        self.i += len(rest)

    def literal(self, c):
        """`null`, `true` or `false`, from its first byte `c` (peeked)."""
        rest, value = _LITERALS[c]
        self.eat()
        self.ident(rest)
        return value

    def enter(self):
        """`check_recursion!`: serde_json refuses nesting 128 deep."""
        self.remaining_depth -= 1
        if self.remaining_depth == 0:
            raise JsonError("recursion limit exceeded")

    def leave(self):
        self.remaining_depth += 1

    # -- strings -----------------------------------------------------------

    def _hex4(self):
        """`decode_hex_escape`."""
        if self.n - self.i < 4:
            self.i = self.n
            raise JsonError("EOF while parsing a string")
        v = 0
        for c in self.b[self.i : self.i + 4]:
            d = _HEX.get(c)
            if d is None:
                self.i += 4
                raise JsonError("invalid escape")
            v = v * 16 + d
        self.i += 4
        return v

    def _escape(self, out):
        """`parse_escape` with `validate`: surrogates must pair."""
        c = self.next_char()
        if c is None:
            raise JsonError("EOF while parsing a string")
        simple = _SIMPLE_ESCAPES.get(c)
        if simple is not None:
            out += simple
            return
        if c != ord("u"):
            raise JsonError("invalid escape")
        n = self._hex4()
        if 0xDC00 <= n <= 0xDFFF:
            raise JsonError("lone leading surrogate in hex escape")
        if n < 0xD800 or n > 0xDBFF:
            out += chr(n).encode("utf-8")
            return
        if self.peek() != ord("\\"):
            raise JsonError("unexpected end of hex escape")
        self.eat()
        if self.peek() != ord("u"):
            raise JsonError("unexpected end of hex escape")
        self.eat()
        n2 = self._hex4()
        if n2 < 0xDC00 or n2 > 0xDFFF:
            raise JsonError("lone leading surrogate in hex escape")
        out += chr((((n - 0xD800) << 10) | (n2 - 0xDC00)) + 0x10000).encode("utf-8")

    def _string_stop(self):
        """Where the string goes on from the next quote, backslash or control
        byte: its position and the byte."""
        m = _STR_STOP.search(self.b, self.i)
        if m is None:
            self.i = self.n
            raise JsonError("EOF while parsing a string")
        j = m.start()
        return j, self.b[j]

    def parse_str(self):
        """`parse_str` after the opening quote: escapes decoded, UTF-8 checked."""
        b = self.b
        out = bytearray()
        start = self.i
        while True:
            j, c = self._string_stop()
            if c == 0x22:
                out += b[start:j]
                self.i = j + 1
                break
            if c == 0x5C:
                out += b[start:j]
                self.i = j + 1
                self._escape(out)
                start = self.i
                continue
            self.i = j + 1
            raise JsonError("control character while parsing a string")
        try:
            return out.decode("utf-8")
        except UnicodeDecodeError:
            raise JsonError("invalid unicode code point") from None

    def ignore_str(self):
        """`ignore_str`: escapes checked for form only, bytes not UTF-8 checked."""
        while True:
            j, c = self._string_stop()
            self.i = j + 1
            if c == 0x22:
                return
            if c != 0x5C:
                raise JsonError("control character while parsing a string")
            e = self.next_char()
            if e is None:
                raise JsonError("EOF while parsing a string")
            if e == ord("u"):
                self._hex4()
            elif e not in _SIMPLE_ESCAPES:
                raise JsonError("invalid escape")

    def parse_key(self):
        """A map key (`MapKey`), after `has_next_key` saw its quote."""
        self.eat()
        return self.parse_str()

    # -- numbers -----------------------------------------------------------

    def parse_number(self):
        """`parse_integer` from a `-` or a digit (the caller peeked one)."""
        if self.peek() == 0x2D:
            self.eat()
            return self._parse_integer(False)
        return self._parse_integer(True)

    def _parse_integer(self, positive):
        c = self.next_char()
        if c is None:
            raise JsonError("EOF while parsing a value")
        if c == 0x30:
            if _is_digit(self.peek()):
                raise JsonError("invalid number")
            return self._parse_number(positive, 0)
        if not 0x31 <= c <= 0x39:
            raise JsonError("invalid number")
        significand = c - 0x30
        while True:
            c = self.peek()
            if not _is_digit(c):
                return self._parse_number(positive, significand)
            digit = c - 0x30
            if _overflow(significand, digit, U64_MAX):
                return Num("f", self._parse_long_integer(positive, significand))
            self.eat()
            significand = significand * 10 + digit

    def _parse_number(self, positive, significand):
        c = self.peek()
        if c == 0x2E:
            return Num("f", self._parse_decimal(positive, significand, 0))
        if c in (0x65, 0x45):
            return Num("f", self._parse_exponent(positive, significand, 0))
        if positive:
            return Num("u", significand)
        # `(significand as i64).wrapping_neg()`, a float when that is >= 0
        # (on `-0` and below i64::MIN).
        if significand == 0:
            return Num("f", -0.0)
        if significand <= 2**63:
            return Num("i", -significand)
        return Num("f", -float(significand))

    def _parse_decimal(self, positive, significand, exponent_before):
        self.eat()
        exponent_after = 0
        while True:
            c = self.peek()
            if not _is_digit(c):
                break
            digit = c - 0x30
            if _overflow(significand, digit, U64_MAX):
                return self._parse_decimal_overflow(
                    positive, significand, exponent_before + exponent_after
                )
            self.eat()
            significand = significand * 10 + digit
            exponent_after -= 1
        if exponent_after == 0:
            raise JsonError("invalid number")
        return self._exponent_or_end(positive, significand, exponent_before + exponent_after)

    def _parse_exponent(self, positive, significand, starting_exp):
        self.eat()
        positive_exp = True
        c = self.peek()
        if c == 0x2B:
            self.eat()
        elif c == 0x2D:
            self.eat()
            positive_exp = False
        c = self.next_char()
        if c is None:
            raise JsonError("EOF while parsing a value")
        if not _is_digit(c):
            raise JsonError("invalid number")
        exp = c - 0x30
        while True:
            c = self.peek()
            if not _is_digit(c):
                break
            self.eat()
            digit = c - 0x30
            if _overflow(exp, digit, I32_MAX):
                return self._parse_exponent_overflow(positive, significand == 0, positive_exp)
            exp = exp * 10 + digit
        final = starting_exp + exp if positive_exp else starting_exp - exp
        final = max(I32_MIN, min(I32_MAX, final))
        return self._f64_from_parts(positive, significand, final)

    def _parse_exponent_overflow(self, positive, zero_significand, positive_exp):
        if not zero_significand and positive_exp:
            raise JsonError("number out of range")
        while _is_digit(self.peek()):
            self.eat()
        return 0.0 if positive else -0.0

    def _parse_long_integer(self, positive, significand):
        exponent = 0
        while True:
            c = self.peek()
            if _is_digit(c):
                self.eat()
                exponent += 1
            elif c == 0x2E:
                return self._parse_decimal(positive, significand, exponent)
            elif c in (0x65, 0x45):
                return self._parse_exponent(positive, significand, exponent)
            else:
                return self._f64_from_parts(positive, significand, exponent)

    def _parse_decimal_overflow(self, positive, significand, exponent):
        while _is_digit(self.peek()):
            self.eat()
        return self._exponent_or_end(positive, significand, exponent)

    def _exponent_or_end(self, positive, significand, exponent):
        if self.peek() in (0x65, 0x45):
            return self._parse_exponent(positive, significand, exponent)
        return self._f64_from_parts(positive, significand, exponent)

    def _f64_from_parts(self, positive, significand, exponent):
        # The same float operations, in the same order, as serde_json: the
        # result is not always the correctly rounded one.
        f = float(significand)
        while True:
            a = abs(exponent)
            if a <= 308:
                if exponent >= 0:
                    f *= POW10[a]
                    if f == float("inf"):
                        raise JsonError("number out of range")
                else:
                    f /= POW10[a]
                break
            if f == 0.0:
                break
            if exponent >= 0:
                raise JsonError("number out of range")
            f /= 1e308
            exponent += 308
        return f if positive else -f

    def _ignore_integer(self):
        c = self.next_char()
        if c == 0x30:
            if _is_digit(self.peek()):
                raise JsonError("invalid number")
        elif c is not None and 0x31 <= c <= 0x39:
            while _is_digit(self.peek()):
                self.eat()
        else:
            raise JsonError("invalid number")
        c = self.peek()
        if c == 0x2E:
            self._ignore_decimal()
        elif c in (0x65, 0x45):
            self._ignore_exponent()

    def _ignore_decimal(self):
        self.eat()
        any_digit = False
        while _is_digit(self.peek()):
            self.eat()
            any_digit = True
        if not any_digit:
            raise JsonError("invalid number")
        if self.peek() in (0x65, 0x45):
            self._ignore_exponent()

    def _ignore_exponent(self):
        self.eat()
        if self.peek() in (0x2B, 0x2D):
            self.eat()
        if not _is_digit(self.next_char()):
            raise JsonError("invalid number")
        while _is_digit(self.peek()):
            self.eat()

    # -- whole values ------------------------------------------------------

    def ignore_value(self):
        """`ignore_value` (`IgnoredAny`): syntax only. Numbers are not range
        checked, strings not UTF-8 checked, and there is no depth limit."""
        stack = []
        enclosing = None
        while True:
            c = self.ws()
            if c is None:
                raise JsonError("EOF while parsing a value")
            frame = None
            if c in _LITERALS:
                self.literal(c)
            elif c == 0x2D:
                self.eat()
                self._ignore_integer()
            elif _is_digit(c):
                self._ignore_integer()
            elif c == 0x22:
                self.eat()
                self.ignore_str()
            elif c in (0x5B, 0x7B):
                if enclosing is not None:
                    stack.append(enclosing)
                    enclosing = None
                self.eat()
                frame = c
            else:
                raise JsonError("expected value")

            if frame is not None:
                accept_comma = False
            elif enclosing is not None:
                accept_comma, frame, enclosing = True, enclosing, None
            elif stack:
                accept_comma, frame = True, stack.pop()
            else:
                return

            while True:
                c = self.ws()
                if c == 0x2C and accept_comma:
                    self.eat()
                    break
                if (c == 0x5D and frame == 0x5B) or (c == 0x7D and frame == 0x7B):
                    self.eat()
                    if not stack:
                        return
                    frame = stack.pop()
                    accept_comma = True
                    continue
                if c is None:
                    raise JsonError("EOF while parsing a list or object")
                if accept_comma:
                    raise JsonError("expected `,` or end")
                break

            if frame == 0x7B:
                c = self.ws()
                if c != 0x22:
                    raise JsonError("key must be a string")
                self.eat()
                self.ignore_str()
                if self.ws() != 0x3A:
                    raise JsonError("expected `:`")
                self.eat()
            enclosing = frame

    def seq(self):
        """After `[`: an iterator that yields once per element, positioned
        at it (serde_json's `SeqAccess::has_next_element`)."""
        first = True
        while True:
            c = self.ws()
            if c is None:
                raise JsonError("EOF while parsing a list")
            if c == 0x5D:
                return
            if first:
                first = False
            elif c == 0x2C:
                self._after_comma(0x5D)
            else:
                raise JsonError("expected `,` or `]`")
            yield

    def entries(self):
        """After `{`: yields each key, then the caller reads the value with
        `colon()` first (serde_json's `MapAccess`)."""
        first = True
        while True:
            c = self.ws()
            if c is None:
                raise JsonError("EOF while parsing an object")
            if c == 0x7D:
                return
            if first:
                first = False
                if c != 0x22:
                    raise JsonError("key must be a string")
            elif c == 0x2C:
                if self._after_comma(0x7D) != 0x22:
                    raise JsonError("key must be a string")
            else:
                raise JsonError("expected `,` or `}`")
            yield self.parse_key()

    def _after_comma(self, close):
        """Eats a `,` between elements; the byte that starts the next one."""
        self.eat()
        c = self.ws()
        if c == close:
            raise JsonError("trailing comma")
        if c is None:
            raise JsonError("EOF while parsing a value")
        return c

    def colon(self):
        """`parse_object_colon`."""
        if self.ws() != 0x3A:
            raise JsonError("expected `:`")
        self.eat()

    def end_seq(self):
        if self.ws() != 0x5D:
            raise JsonError("expected `]`")
        self.eat()

    def end_map(self):
        if self.ws() != 0x7D:
            raise JsonError("expected `}`")
        self.eat()

    def open(self):
        """Enters the array or object whose opening byte was peeked."""
        self.enter()
        self.eat()

    def close(self, c):
        self.leave()
        if c == 0x5B:
            self.end_seq()
        else:
            self.end_map()

    def parse_value(self):
        """`serde_json::Value` (`deserialize_any`): None, bool, `Num`, str,
        list, or dict (a repeated key keeps its last value, as in
        serde_json's `Map`)."""
        c = self.ws()
        if c is None:
            raise JsonError("EOF while parsing a value")
        if c in _LITERALS:
            return self.literal(c)
        if c == 0x2D or _is_digit(c):
            return self.parse_number()
        if c == 0x22:
            self.eat()
            return self.parse_str()
        if c == 0x5B:
            self.open()
            items = []
            for _ in self.seq():
                items.append(self.parse_value())
            self.close(c)
            return items
        if c == 0x7B:
            return self._map_body(self.parse_value)
        raise JsonError("expected value")

    # -- typed values (serde's impls for Rust types) -------------------------

    def wrong_type(self, expected):
        """The error for a value that is not the `expected` kind. Like
        serde_json, a malformed scalar there is a syntax error first."""
        c = self.ws()
        if c is None:
            return JsonError("EOF while parsing a value")
        if c not in (0x5B, 0x7B):
            self.parse_value()
        return shape_error("invalid type: expected %s" % expected)

    def de_number(self):
        """`deserialize_number`: what f64 and the integer types accept."""
        c = self.ws()
        if c == 0x2D or _is_digit(c):
            return self.parse_number()
        raise self.wrong_type("a number")

    def de_f64(self):
        return self.de_number().as_f64()

    def de_usize(self):
        """`usize` on wasm32: a non-negative integer below 2^32."""
        num = self.de_number()
        if num.kind != "u" or num.value >= 2**32:
            raise shape_error("invalid value: expected usize")
        return num.value

    def de_bool(self):
        c = self.ws()
        if c == ord("t") or c == ord("f"):
            return self.literal(c)
        raise self.wrong_type("a boolean")

    def de_string(self):
        if self.ws() != 0x22:
            raise self.wrong_type("a string")
        self.eat()
        return self.parse_str()

    def de_option(self, inner):
        """`Option<T>`: `null` is None, anything else is read as T."""
        c = self.ws()
        if c is None:
            raise JsonError("EOF while parsing a value")
        if c == ord("n"):
            return self.literal(c)
        return inner()

    def de_map(self, value):
        """`HashMap<String, T>`: a repeated key keeps its last value."""
        c = self.ws()
        if c != 0x7B:
            raise self.wrong_type("a map")
        return self._map_body(value)

    def _map_body(self, value):
        """The object whose `{` was peeked, each value read by `value`."""
        self.open()
        out = {}
        for key in self.entries():
            self.colon()
            out[key] = value()
        self.close(0x7B)
        return out

    def de_array(self, length, item):
        """`[T; N]`: exactly N elements."""
        c = self.ws()
        if c != 0x5B:
            raise self.wrong_type("an array")
        self.open()
        out = []
        elements = self.seq()
        for _ in range(length):
            if next(elements, StopIteration) is StopIteration:
                raise shape_error("invalid length %d, expected %d" % (len(out), length))
            out.append(item())
        self.close(c)
        return out

    def de_struct(self, fields, optional, defaulted):
        """A `#[derive(Deserialize)] #[serde(deny_unknown_fields)]` struct,
        returned as a dict of its fields.

        `fields` maps each field name, in declaration order, to its reader.
        `defaulted` maps the `#[serde(default)]` fields to their default;
        `optional` names the `Option` fields, None when missing. Like
        serde_json, it also takes the fields as an array in declaration
        order, where only `defaulted` fields may be left off the end."""
        c = self.ws()
        if c is None:
            raise JsonError("EOF while parsing a value")
        out = {}
        if c == 0x7B:
            self.open()
            for key in self.entries():
                if key not in fields:
                    raise shape_error(
                        "unknown field `%s`, expected one of %s"
                        % (key, ", ".join("`%s`" % f for f in fields))
                    )
                if key in out:
                    raise shape_error("duplicate field `%s`" % key)
                self.colon()
                out[key] = fields[key]()
            self.close(c)
            for name in fields:
                if name in out:
                    continue
                if name in defaulted:
                    out[name] = defaulted[name]
                elif name in optional:
                    out[name] = None
                else:
                    raise shape_error("missing field `%s`" % name)
            return out
        if c == 0x5B:
            self.open()
            elements = self.seq()
            for index, (name, read) in enumerate(fields.items()):
                if next(elements, StopIteration) is not StopIteration:
                    out[name] = read()
                elif name in defaulted:
                    out[name] = defaulted[name]
                else:
                    raise shape_error("invalid length %d" % index)
            self.close(c)
            return out
        raise self.wrong_type("a struct")


# -- writing -----------------------------------------------------------------

_ESCAPE_OUT = {
    0x22: '\\"',
    0x5C: "\\\\",
    0x08: "\\b",
    0x0C: "\\f",
    0x0A: "\\n",
    0x0D: "\\r",
    0x09: "\\t",
}
for _c in range(0x20):
    _ESCAPE_OUT.setdefault(_c, "\\u%04x" % _c)
del _c


def write_str(s):
    """A JSON string as serde_json writes it (only `"`, `\\` and controls escaped)."""
    return '"' + s.translate(_ESCAPE_OUT) + '"'


def write_f64(f):
    """A finite f64 as serde_json writes it (the `zmij` crate's format):
    shortest round-trip digits, plain notation for decimal exponents -5..=15
    (with `.0` on whole numbers), else `d.ddde±x`."""
    if f == 0.0:
        return "-0.0" if str(f).startswith("-") else "0.0"
    sign = "-" if f < 0 else ""
    # `repr` gives the same shortest round-trip digits; only the layout differs.
    mantissa, _, exp_text = repr(abs(f)).partition("e")
    whole, _, frac = mantissa.partition(".")
    all_digits = whole + frac
    point = len(whole) + (int(exp_text) if exp_text else 0)
    digits = all_digits.lstrip("0")
    point -= len(all_digits) - len(digits)
    digits = digits.rstrip("0")
    e = point - 1
    if -5 <= e <= 15:
        if len(digits) - 1 <= e:
            return sign + digits + "0" * (e + 1 - len(digits)) + ".0"
        if e >= 0:
            return sign + digits[: e + 1] + "." + digits[e + 1 :]
        return sign + "0." + "0" * (-e - 1) + digits
    body = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return sign + body + "e" + ("+" if e >= 0 else "-") + str(abs(e))


def write_value(v):
    """`serde_json::Value::to_string()`: compact, keys in byte order."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, Num):
        return str(v.value) if v.kind != "f" else write_f64(v.value)
    if isinstance(v, str):
        return write_str(v)
    if isinstance(v, list):
        return "[" + ",".join(write_value(x) for x in v) + "]"
    return "{" + ",".join(write_str(k) + ":" + write_value(v[k]) for k in sorted(v)) + "}"
