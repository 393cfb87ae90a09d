"""Preprocessor: JSON telemetry to clean readings (Python port of the Rust
plugin plugins/clean-readings, with the SDK's telemetry parser and unit
table; it gives the same readings, in the same order, with the same floats).

Drops readings that are not finite numbers where a number is expected
(NaN, ±inf, "NaN" text), readings outside the configured range of their
metric, and duplicates (same device, metric and timestamp) within a
message; with `drop_stale`, also readings not newer than the last one kept
for that device and metric, using the plugin's persistent state (key
`last/<device>/<metric>`, an i64 little-endian, as the Rust SDK stores it).
Converts units to the configured unit of each metric; a reading whose unit
cannot be converted is dropped and logged.

Settings: device_from_topic (topic level naming the device when the payload
does not), ranges ({metric: [min, max]} in the target unit), units
({metric: unit}), numeric_text (text that reads as a number becomes one,
default true), drop_stale (default false). Unknown settings are a
bad-config error.
"""

import re
import struct

from componentize_py_types import Err
from plugin_settings import RUST_WHITESPACE, cached_settings, read_settings
from serde_json_compat import JsonError, Num, Reader, shape_error
from wit_world import exports
from wit_world.imports import log, state
from wit_world.imports.types import (
    PluginError_BadPayload,
    PluginError_Other,
    Reading,
    ReadingBatch,
    Value_Boolean,
    Value_Number,
    Value_Text,
)

I64_MIN = -(2**63)
I64_MAX = 2**63 - 1

# What Rust's `str::parse::<f64>` accepts; Python's `float` also takes
# `1_000`, surrounding whitespace and non-ASCII digits.
RUST_F64 = re.compile(
    r"[+-]?(?:(?i:inf|infinity|nan)|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\Z",
    re.ASCII,
)


def rust_trim(s):
    return s.strip(RUST_WHITESPACE)


def rust_parse_f64(s):
    """`s.parse::<f64>().ok()`."""
    if RUST_F64.match(s) is None:
        return None
    return float(s)


def f64_as_i64(f):
    """Rust's `f as i64`: toward zero, saturating, NaN to 0."""
    if f != f:
        return 0
    if f >= 9223372036854775807.0:
        return I64_MAX
    if f <= -9223372036854775808.0:
        return I64_MIN
    return int(f)


# -- units (sdk/src/units.rs) --------------------------------------------------


class Unit:
    __slots__ = ("names", "canonical", "quantity", "scale", "offset")

    def __init__(self, names, canonical, quantity, scale, offset):
        self.names = names
        self.canonical = canonical
        self.quantity = quantity
        self.scale = scale
        self.offset = offset


UNITS = [
    Unit(["C", "°C", "degC", "celsius"], "C", "temperature", 1.0, 0.0),
    Unit(["F", "°F", "degF", "fahrenheit"], "F", "temperature", 5.0 / 9.0, -32.0 * 5.0 / 9.0),
    Unit(["K", "kelvin"], "K", "temperature", 1.0, -273.15),
    Unit(["Pa", "pascal"], "Pa", "pressure", 1.0, 0.0),
    Unit(["hPa", "mbar"], "hPa", "pressure", 100.0, 0.0),
    Unit(["kPa"], "kPa", "pressure", 1000.0, 0.0),
    Unit(["bar"], "bar", "pressure", 100000.0, 0.0),
    Unit(["psi"], "psi", "pressure", 6894.757293168, 0.0),
    Unit(["m/s", "mps"], "m/s", "speed", 1.0, 0.0),
    Unit(["km/h", "kph", "kmh"], "km/h", "speed", 1.0 / 3.6, 0.0),
    Unit(["mph"], "mph", "speed", 0.44704, 0.0),
    Unit(["m", "meter", "metre"], "m", "length", 1.0, 0.0),
    Unit(["cm"], "cm", "length", 0.01, 0.0),
    Unit(["mm"], "mm", "length", 0.001, 0.0),
    Unit(["km"], "km", "length", 1000.0, 0.0),
    Unit(["ft", "feet"], "ft", "length", 0.3048, 0.0),
    Unit(["%", "percent"], "%", "ratio", 0.01, 0.0),
    Unit(["ratio", "fraction"], "ratio", "ratio", 1.0, 0.0),
    Unit(["J"], "J", "energy", 1.0, 0.0),
    Unit(["Wh"], "Wh", "energy", 3600.0, 0.0),
    Unit(["kWh"], "kWh", "energy", 3600000.0, 0.0),
    Unit(["W"], "W", "power", 1.0, 0.0),
    Unit(["kW"], "kW", "power", 1000.0, 0.0),
]


def find_unit(name):
    """Exact spelling first, then names longer than 3 bytes with ASCII case
    ignored (so `k` is not `K`)."""
    name = rust_trim(name)
    for u in UNITS:
        if name in u.names:
            return u
    folded = name.encode("utf-8").lower()
    for u in UNITS:
        for n in u.names:
            encoded = n.encode("utf-8")
            if len(encoded) > 3 and encoded.lower() == folded:
                return u
    return None


def convert(value, from_unit, to_unit):
    f = find_unit(from_unit)
    if f is None:
        return None
    t = find_unit(to_unit)
    if t is None or f.quantity != t.quantity:
        return None
    if f is t:
        return value
    base = value * f.scale + f.offset
    return (base - t.offset) / t.scale


# -- telemetry (sdk/src/telemetry.rs) ------------------------------------------

# A payload value reduced to what a reading can hold: (tag, data).
NULL = ("null", None)
NUMBER, BOOL, TEXT, NESTED = "number", "bool", "text", "nested"

KIND = {"null": "null", NUMBER: "a number", BOOL: "a boolean", TEXT: "text"}


def kind_of(scalar):
    return scalar[1] if scalar[0] == NESTED else KIND[scalar[0]]


def bad_payload(message):
    return Err(PluginError_BadPayload(message))


def skip_nested(r, c):
    """Skips the array or object whose first byte `c` was peeked. Unlike
    `ignore_value` on the whole, this level counts toward the depth limit."""
    r.open()
    if c == 0x5B:
        for _ in r.seq():
            r.ignore_value()
    else:
        for _ in r.entries():
            r.colon()
            r.ignore_value()
    r.close(c)


def de_scalar(r):
    """`Scalar`: any JSON value; arrays and objects are skipped over."""
    c = r.ws()
    if c == 0x5B:
        skip_nested(r, c)
        return (NESTED, "an array")
    if c == 0x7B:
        skip_nested(r, c)
        return (NESTED, "an object")
    v = r.parse_value()
    if v is None:
        return NULL
    if isinstance(v, bool):
        return (BOOL, v)
    if isinstance(v, Num):
        return (NUMBER, v.as_f64())
    return (TEXT, v)


class Obj:
    """One telemetry object, fields kept until the object ends (the device
    and time may come after the values they apply to)."""

    __slots__ = ("device", "metric", "time", "unit", "value", "has_value", "units", "readings", "fields")

    def __init__(self):
        self.device = None
        self.metric = None
        self.time = None
        self.unit = None
        self.value = None
        self.has_value = False
        self.units = []
        self.readings = None
        self.fields = []


def set_first(current, new):
    """The first non-null value of a repeated key wins."""
    return new if current is None or current[0] == "null" else current


def de_object_fields(r):
    """The entries of a telemetry object, after its `{`."""
    o = Obj()
    for key in r.entries():
        r.colon()
        if key == "device" or key == "id":
            o.device = set_first(o.device, de_scalar(r))
        elif key == "metric" or key == "name":
            o.metric = set_first(o.metric, de_scalar(r))
        elif key == "ts" or key == "timestamp" or key == "time":
            v = de_scalar(r)
            if o.time is None and v[0] != "null":
                o.time = (key, v)
        elif key == "unit":
            o.unit = de_scalar(r)
        elif key == "value":
            o.has_value = True
            o.value = de_scalar(r)
        elif key == "units":
            o.units = de_units(r)
        elif key == "readings":
            o.readings = de_readings(r)
        else:
            o.fields.append((key, de_scalar(r)))
    return o


def de_units(r):
    """`units`: an object of unit names (null is none)."""
    c = r.ws()
    if c == 0x7B:
        r.open()
        units = []
        for key in r.entries():
            r.colon()
            units.append((key, de_scalar(r)))
        r.close(c)
        return units
    if c == ord("n"):
        r.literal(c)
        return []
    raise r.wrong_type("an object of units")


def de_object(r):
    """A telemetry object whose `{` was peeked."""
    r.open()
    o = de_object_fields(r)
    r.close(0x7B)
    return o


def de_item(r):
    """An array element: ("object", Obj) or ("other", what it is)."""
    c = r.ws()
    if c == 0x7B:
        return ("object", de_object(r))
    if c == 0x5B:
        skip_nested(r, c)
        return ("other", "an array")
    scalar = de_scalar(r)
    return ("other", kind_of(scalar))


def de_readings(r):
    """`readings`: a list of objects, or the error text for what it holds
    (reported only if the object is used)."""
    c = r.ws()
    if c == 0x5B:
        r.open()
        items = []
        result = items
        elements = r.seq()
        for _ in elements:
            what, item = de_item(r)
            if what == "object":
                items.append(item)
            else:
                result = "readings[%d] is %s, not an object" % (len(items), item)
                for _ in elements:
                    r.ignore_value()
                break
        r.close(c)
        return result
    if c == 0x7B:
        skip_nested(r, c)
        return "`readings` is not an array"
    raise r.wrong_type("a list of readings")


def de_doc(r):
    """The whole payload: one object, or an array of them."""
    c = r.ws()
    if c == 0x7B:
        return [de_object(r)]
    if c == 0x5B:
        r.open()
        objects = []
        for _ in r.seq():
            what, item = de_item(r)
            if what != "object":
                raise shape_error("item %d of the array is %s, not an object" % (len(objects), item))
            objects.append(item)
        r.close(c)
        return objects
    raise r.wrong_type("a JSON object or array")


def text_field(scalar, key):
    if scalar is None or scalar[0] == "null":
        return None
    if scalar[0] == TEXT:
        return scalar[1]
    raise bad_payload("`%s` should be a string, found %s" % (key, kind_of(scalar)))


def days_from_civil(y, m, d):
    """Days since 1970-01-01 in the proleptic Gregorian calendar (H. Hinnant's algorithm)."""
    y = y - 1 if m <= 2 else y
    era = y // 400
    yoe = y - era * 400
    mp = (m + 9) % 12
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def parse_time(s):
    """Milliseconds since the Unix epoch for
    `YYYY-MM-DD[T ]HH:MM[:SS[.fff]][Z|±HH:MM]` (UTC when no offset is
    given), or None. Positions are in bytes, as in Rust."""
    b = rust_trim(s).encode("utf-8")

    def num(lo, hi):
        part = b[lo:hi]
        if hi > len(b) or not part or not all(0x30 <= c <= 0x39 for c in part):
            return None
        return int(part)

    if len(b) < 16 or b[4] != 0x2D or b[7] != 0x2D or b[10] not in b"T t" or b[13] != 0x3A:
        return None
    parts = [num(0, 4), num(5, 7), num(8, 10), num(11, 13), num(14, 16)]
    if None in parts:
        return None
    year, month, day, hour, minute = parts
    i = 16
    second = 0
    millis = 0
    if i < len(b) and b[i] == 0x3A:
        second = num(i + 1, i + 3)
        if second is None:
            return None
        i += 3
        if i < len(b) and b[i] == 0x2E:
            start = i + 1
            end = start
            while end < len(b) and 0x30 <= b[end] <= 0x39:
                end += 1
            if end == start:
                return None
            digits = b[start : min(end, start + 3)]
            millis = int(digits) * 10 ** (3 - len(digits))
            i = end
    if i >= len(b):
        offset_minutes = 0
    elif b[i] in b"Zz" and i + 1 == len(b):
        offset_minutes = 0
    elif b[i] in b"+-" and len(b) == i + 6 and b[i + 3] == 0x3A:
        oh = num(i + 1, i + 3)
        om = num(i + 4, i + 6)
        if oh is None or om is None:
            return None
        offset_minutes = oh * 60 + om
        if b[i] == 0x2D:
            offset_minutes = -offset_minutes
    else:
        return None
    if not 1 <= month <= 12 or not 1 <= day <= 31 or hour > 23 or minute > 59 or second > 60:
        return None
    days = days_from_civil(year, month, day)
    return (days * 86400 + hour * 3600 + minute * 60 + second - offset_minutes * 60) * 1000 + millis


def time_of(o):
    if o.time is None:
        return None
    key, v = o.time
    if v[0] == NUMBER:
        t = v[1]
        if t != t or t in (float("inf"), float("-inf")):
            raise bad_payload("`%s` is not a finite number" % key)
        return f64_as_i64(t * 1000.0) if abs(t) < 1e11 else f64_as_i64(t)
    if v[0] == TEXT:
        ms = parse_time(v[1])
        if ms is None:
            raise bad_payload("`%s`: cannot read time %s" % (key, rust_debug_str(v[1])))
        return ms
    raise bad_payload("`%s` should be a number or text, found %s" % (key, kind_of(v)))


def to_value(scalar):
    tag, data = scalar
    if tag == NUMBER:
        return Value_Number(data)
    if tag == BOOL:
        return Value_Boolean(data)
    if tag == TEXT:
        return Value_Text(data)
    return None


def single(o, device, ts, out):
    own = text_field(o.device, "device")
    device = device if own is None else own
    metric = text_field(o.metric, "metric")
    if metric is None:
        raise bad_payload("reading has no `metric`")
    t = time_of(o)
    ts = ts if t is None else t
    unit = text_field(o.unit, "unit")
    if o.value is None:
        raise bad_payload("reading `%s` has no `value`" % metric)
    if o.value[0] == "null":
        return
    value = to_value(o.value)
    if value is None:
        raise bad_payload("reading `%s`: value is %s" % (metric, kind_of(o.value)))
    out.append((device, metric, value, "" if unit is None else unit, ts))


def emit(o, default_device, default_timestamp, out):
    device = text_field(o.device, "device")
    if device is None:
        device = default_device
        if device is None:
            raise bad_payload("no device: payload has no `device` field and the topic gives none")
    t = time_of(o)
    ts = default_timestamp if t is None else t
    if o.readings is not None:
        if isinstance(o.readings, str):
            raise bad_payload(o.readings)
        for i, r in enumerate(o.readings):
            try:
                single(r, device, ts, out)
            except Err as e:
                raise bad_payload("readings[%d]: %s" % (i, e.value.value))
        return
    if o.has_value or o.metric is not None:
        single(o, device, ts, out)
        return
    for key, v in o.fields:
        value = to_value(v)
        if value is None:
            continue
        unit = ""
        for k, u in o.units:
            if k == key:
                if u[0] == TEXT:
                    unit = u[1]
                break
        out.append((device, key, value, unit, ts))


def parse_json(payload, default_device, default_timestamp):
    """The readings of a JSON telemetry payload: (device, metric, value, unit, timestamp)."""
    r = Reader(payload)
    try:
        objects = de_doc(r)
        r.end()
    except JsonError as e:
        # serde_json's wording: only syntax errors say "invalid JSON".
        prefix = "" if e.data else "invalid JSON: "
        raise bad_payload("%s%s at byte %d" % (prefix, e, r.i)) from None
    out = []
    for o in objects:
        emit(o, default_device, default_timestamp, out)
    return out


# -- the plugin (plugins/clean-readings/src/lib.rs) ----------------------------


class Config:
    def __init__(self, fields):
        self.device_from_topic = fields["device_from_topic"]
        self.ranges = fields["ranges"]
        self.units = fields["units"]
        self.numeric_text = fields["numeric_text"]
        self.drop_stale = fields["drop_stale"]


def parse_config(text):
    fields = read_settings(
        text,
        lambda r: {
            "device_from_topic": lambda: r.de_option(r.de_usize),
            "ranges": lambda: r.de_map(lambda: r.de_array(2, r.de_f64)),
            "units": lambda: r.de_map(r.de_string),
            "numeric_text": lambda: r.de_option(r.de_bool),
            "drop_stale": r.de_bool,
        },
        optional={"device_from_topic", "numeric_text"},
        defaulted={"ranges": {}, "units": {}, "drop_stale": False},
    )
    return Config(fields)


cached_config = cached_settings(parse_config)


def state_error_text(e):
    # Mirrors the Rust SDK's `PluginError::Other(format!("state: {e:?}"))`.
    if isinstance(e, state.StateError_TooLarge):
        return "TooLarge"
    if isinstance(e, state.StateError_QuotaExceeded):
        return "QuotaExceeded"
    if isinstance(e, state.StateError_Io):
        return "Io(%s)" % rust_debug_str(e.value)
    return repr(e)


def rust_debug_str(s):
    out = ['"']
    for ch in s:
        if ch in "\"\\":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\0":
            out.append("\\0")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\u{%x}" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


class Names:
    """A batch's string table, each distinct name stored once in first-use order."""

    def __init__(self):
        self.names = []
        self.index = {}

    def intern(self, name):
        i = self.index.get(name)
        if i is None:
            i = len(self.names)
            self.names.append(name)
            self.index[name] = i
        return i


def clean(message, batch, cfg, is_fresh):
    """The readings to keep, as a batch, and the drop counts."""
    if not batch.readings:
        default_device = None
        if cfg.device_from_topic is not None:
            levels = message.topic.split("/")
            if cfg.device_from_topic < len(levels) and levels[cfg.device_from_topic]:
                default_device = levels[cfg.device_from_topic]
        parsed = parse_json(message.payload, default_device, message.timestamp)
    else:
        names = batch.names

        def name(i):
            return names[i] if i < len(names) else ""

        parsed = [(name(r.device), name(r.metric), r.value, name(r.unit), r.timestamp) for r in batch.readings]
    numeric_text = True if cfg.numeric_text is None else cfg.numeric_text
    out = Names()
    readings = []
    seen = set()
    dropped = {"not_finite": 0, "out_of_range": 0, "duplicate": 0, "bad_unit": 0, "stale": 0}
    for device, metric, value, unit, timestamp in parsed:
        if numeric_text and isinstance(value, Value_Text):
            n = rust_parse_f64(rust_trim(value.value))
            if n is not None:
                value = Value_Number(n)
        if isinstance(value, Value_Number):
            n = value.value
            if n != n or n in (float("inf"), float("-inf")):
                dropped["not_finite"] += 1
                continue
            target = cfg.units.get(metric)
            if target is not None:
                if not unit:
                    unit = target
                else:
                    converted = convert(n, unit, target)
                    if converted is None:
                        dropped["bad_unit"] += 1
                        continue
                    n = converted
                    unit = target
            bounds = cfg.ranges.get(metric)
            if bounds is not None and not (bounds[0] <= n and n <= bounds[1]):
                dropped["out_of_range"] += 1
                continue
            value = Value_Number(n)
        key = (out.intern(device), out.intern(metric), timestamp)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        if not is_fresh(device, metric, timestamp):
            dropped["stale"] += 1
            continue
        readings.append(
            Reading(
                device=out.intern(device),
                metric=out.intern(metric),
                unit=out.intern(unit),
                value=value,
                timestamp=timestamp,
            )
        )
    return ReadingBatch(names=out.names, readings=readings), dropped


class Preprocess(exports.Preprocess):
    def preprocess(self, message, readings):
        cfg = cached_config()
        state_error = []

        def is_fresh(device, metric, timestamp):
            if not cfg.drop_stale or state_error:
                return True
            key = "last/%s/%s" % (device, metric)
            try:
                stored = state.get(key)
                last = struct.unpack("<q", stored)[0] if stored is not None and len(stored) == 8 else None
                if last is not None and timestamp <= last:
                    return False
                state.set(key, struct.pack("<q", timestamp))
                return True
            except Err as e:
                state_error.append(e.value)
                return True

        batch, dropped = clean(message, readings, cfg, is_fresh)
        if state_error:
            raise Err(PluginError_Other("state: StateError::%s" % state_error_text(state_error[0])))
        total = sum(dropped.values())
        if total > 0:
            log.log(
                log.Level.DEBUG,
                "%d readings dropped from %s: Dropped { %s }"
                % (total, message.topic, ", ".join("%s: %d" % kv for kv in dropped.items())),
            )
        return batch
