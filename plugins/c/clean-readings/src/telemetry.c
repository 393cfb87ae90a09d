#include "telemetry.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "json.h"

// Any JSON value, reduced to what a reading can hold.
typedef enum { SC_NULL, SC_NUMBER, SC_BOOL, SC_TEXT, SC_ARRAY, SC_OBJECT } scalar_kind;

typedef struct {
    scalar_kind kind;
    bool boolean;
    double number;
    str text;
} scalar;

typedef struct {
    str key;
    scalar value;
} entry;

typedef struct object object;

// One telemetry object, fields kept until the object ends (the device and
// time may come after the values they apply to).
struct object {
    bool has_device, has_metric, has_time, has_unit, has_value;
    scalar device, metric, time, unit, value;
    const char *time_key;
    VEC(entry) units;
    bool has_readings;
    const char *readings_error; // set when `readings` was not a list of objects
    VEC(object *) readings;
    VEC(entry) fields;
};

typedef struct {
    json j;
    str error; // a data error (the JSON itself was fine)
} parser;

#define data_error(p, ...) json_data_error(&(p)->j, &(p)->error, __VA_ARGS__)

static const char *kind_name(scalar_kind k) {
    switch (k) {
    case SC_NULL: return "null";
    case SC_NUMBER: return "a number";
    case SC_BOOL: return "a boolean";
    case SC_TEXT: return "text";
    case SC_ARRAY: return "an array";
    default: return "an object";
    }
}

static bool read_scalar(parser *p, scalar *out) {
    json *j = &p->j;
    int c = json_peek(j);
    memset(out, 0, sizeof *out);
    switch (c) {
    case -1: return json_fail(j, "EOF while parsing a value");
    case 'n':
        out->kind = SC_NULL;
        return json_literal(j, "null");
    case 't':
        out->kind = SC_BOOL;
        out->boolean = true;
        return json_literal(j, "true");
    case 'f':
        out->kind = SC_BOOL;
        return json_literal(j, "false");
    case '"':
        out->kind = SC_TEXT;
        return json_string(j, &out->text);
    case '[':
        out->kind = SC_ARRAY;
        return json_skip_array(j);
    case '{':
        out->kind = SC_OBJECT;
        return json_skip_object(j);
    default:
        if (c == '-' || (c >= '0' && c <= '9')) {
            jnum n;
            out->kind = SC_NUMBER;
            if (!json_number(j, &n)) return false;
            out->number = n.f;
            return true;
        }
        return json_fail(j, "expected value");
    }
}

// A value of the wrong type where `expected` was due: like serde_json, a
// malformed value is a syntax error first.
static bool invalid_type(parser *p, const char *expected) {
    int c = json_peek(&p->j);
    const char *kind;
    if (c == '[') {
        kind = "a sequence";
    } else if (c == '{') {
        kind = "a map";
    } else {
        scalar s;
        if (!read_scalar(p, &s)) return false;
        kind = kind_name(s.kind);
    }
    return data_error(p, "invalid type: %s, expected %s", kind, expected);
}

// The first non-null value wins: `"device": null` does not hide a later `"id"`.
static void set_first(bool *has, scalar *slot, scalar v) {
    if (!*has || slot->kind == SC_NULL) {
        *has = true;
        *slot = v;
    }
}

static bool read_units(parser *p, object *o) {
    json *j = &p->j;
    int c = json_peek(j);
    o->units.n = 0;
    if (c == 'n') return json_literal(j, "null");
    if (c != '{') return invalid_type(p, "an object of units");
    if (!json_enter(j)) return false;
    bool first = true, more;
    for (;;) {
        entry e;
        if (!json_next_key(j, &first, &more, &e.key)) return false;
        if (!more) break;
        if (!read_scalar(p, &e.value)) return false;
        VEC_PUSH(j->a, o->units, e);
    }
    json_leave(j);
    return json_end_object(j);
}

static bool read_object_body(parser *p, object *o);

// An element of an array of objects: the object, or what else it is.
static bool read_item(parser *p, object **obj, const char **other) {
    json *j = &p->j;
    int c = json_peek(j);
    *obj = NULL;
    if (c == '{') {
        if (!json_enter(j)) return false;
        object *o = arena_alloc(j->a, sizeof *o);
        memset(o, 0, sizeof *o);
        if (!read_object_body(p, o)) return false;
        json_leave(j);
        *obj = o;
        return json_end_object(j);
    }
    if (c == '[') {
        *other = "an array";
        return json_skip_array(j);
    }
    scalar s;
    if (!read_scalar(p, &s)) return false;
    *other = kind_name(s.kind);
    return true;
}

static bool read_readings(parser *p, object *o) {
    json *j = &p->j;
    int c = json_peek(j);
    o->has_readings = true;
    o->readings_error = NULL;
    o->readings.v = NULL;
    o->readings.n = o->readings.cap = 0;
    if (c == '{') {
        o->readings_error = "`readings` is not an array";
        return json_skip_object(j);
    }
    if (c != '[') return invalid_type(p, "a list of readings");
    if (!json_enter(j)) return false;
    bool first = true, more;
    for (;;) {
        if (!json_next_element(j, &first, &more)) return false;
        if (!more) break;
        object *item;
        const char *other;
        if (!read_item(p, &item, &other)) return false;
        if (item) {
            VEC_PUSH(j->a, o->readings, item);
            continue;
        }
        char buf[96];
        int n = snprintf(buf, sizeof buf, "readings[%zu] is %s, not an object", o->readings.n, other);
        o->readings_error = arena_str(j->a, buf, (size_t)n + 1).p;
        for (;;) {
            if (!json_next_element(j, &first, &more)) return false;
            if (!more) break;
            if (!json_skip(j)) return false;
        }
        break;
    }
    json_leave(j);
    return json_end_array(j);
}

static bool read_object_body(parser *p, object *o) {
    json *j = &p->j;
    bool first = true, more;
    for (;;) {
        str key;
        if (!json_next_key(j, &first, &more, &key)) return false;
        if (!more) return true;
        scalar v;
        if (str_eq_c(key, "device") || str_eq_c(key, "id")) {
            if (!read_scalar(p, &v)) return false;
            set_first(&o->has_device, &o->device, v);
        } else if (str_eq_c(key, "metric") || str_eq_c(key, "name")) {
            if (!read_scalar(p, &v)) return false;
            set_first(&o->has_metric, &o->metric, v);
        } else if (str_eq_c(key, "ts") || str_eq_c(key, "timestamp") || str_eq_c(key, "time")) {
            if (!read_scalar(p, &v)) return false;
            if (!o->has_time && v.kind != SC_NULL) {
                o->has_time = true;
                o->time = v;
                o->time_key = str_eq_c(key, "ts") ? "ts" : str_eq_c(key, "timestamp") ? "timestamp" : "time";
            }
        } else if (str_eq_c(key, "unit")) {
            if (!read_scalar(p, &o->unit)) return false;
            o->has_unit = true;
        } else if (str_eq_c(key, "value")) {
            o->has_value = true;
            if (!read_scalar(p, &o->value)) return false;
        } else if (str_eq_c(key, "units")) {
            if (!read_units(p, o)) return false;
        } else if (str_eq_c(key, "readings")) {
            if (!read_readings(p, o)) return false;
        } else {
            entry e = {key, {0}};
            if (!read_scalar(p, &e.value)) return false;
            VEC_PUSH(j->a, o->fields, e);
        }
    }
}

// `Some(text)` into *out / *present, None for a missing or null field, or an
// error for any other kind.
static bool text_field(parser *p, bool has, const scalar *slot, const char *key, bool *present,
                       str *out) {
    *present = false;
    if (!has || slot->kind == SC_NULL) return true;
    if (slot->kind != SC_TEXT)
        return data_error(p, "`%s` should be a string, found %s", key, kind_name(slot->kind));
    *present = true;
    *out = slot->text;
    return true;
}

static bool time_of(parser *p, const object *o, bool *present, int64_t *ts) {
    *present = false;
    if (!o->has_time) return true;
    const scalar *v = &o->time;
    if (v->kind == SC_NUMBER) {
        double t = v->number;
        if (!isfinite(t)) return data_error(p, "`%s` is not a finite number", o->time_key);
        *ts = fabs(t) < 1e11 ? f64_to_i64(t * 1000.0) : f64_to_i64(t);
        *present = true;
        return true;
    }
    if (v->kind == SC_TEXT) {
        if (!parse_time(v->text, ts))
            return data_error(p, "`%s`: cannot read time \"%.*s\"", o->time_key,
                              (int)(v->text.n > 64 ? 64 : v->text.n), v->text.p);
        *present = true;
        return true;
    }
    return data_error(p, "`%s` should be a number or text, found %s", o->time_key,
                      kind_name(v->kind));
}

static bool scalar_value(const scalar *s, value *out) {
    memset(out, 0, sizeof *out);
    switch (s->kind) {
    case SC_NUMBER:
        out->kind = VALUE_NUMBER;
        out->number = s->number;
        return true;
    case SC_BOOL:
        out->kind = VALUE_BOOLEAN;
        out->boolean = s->boolean;
        return true;
    case SC_TEXT:
        out->kind = VALUE_TEXT;
        out->text = s->text;
        return true;
    default: return false;
    }
}

static void push(parser *p, readings *out, str device, str metric, value v, str unit, int64_t ts) {
    reading r = {device, metric, unit, v, ts};
    VEC_PUSH(p->j.a, *out, r);
}

static bool single(parser *p, const object *o, str device, int64_t ts, readings *out) {
    bool present;
    str d, metric, unit = {"", 0};
    if (!text_field(p, o->has_device, &o->device, "device", &present, &d)) return false;
    if (present) device = d;
    if (!text_field(p, o->has_metric, &o->metric, "metric", &present, &metric)) return false;
    if (!present) return data_error(p, "reading has no `metric`");
    int64_t own_ts;
    if (!time_of(p, o, &present, &own_ts)) return false;
    if (present) ts = own_ts;
    if (!text_field(p, o->has_unit, &o->unit, "unit", &present, &unit)) return false;
    if (!present) unit = (str){"", 0};
    if (!o->has_value)
        return data_error(p, "reading `%.*s` has no `value`", (int)metric.n, metric.p);
    if (o->value.kind == SC_NULL) return true;
    value v;
    if (!scalar_value(&o->value, &v))
        return data_error(p, "reading `%.*s`: value is %s", (int)metric.n, metric.p,
                          kind_name(o->value.kind));
    push(p, out, device, metric, v, unit, ts);
    return true;
}

static bool emit(parser *p, const object *o, const str *default_device, int64_t default_ts,
                 readings *out) {
    bool present;
    str device;
    if (!text_field(p, o->has_device, &o->device, "device", &present, &device)) return false;
    if (!present) {
        if (!default_device)
            return data_error(p, "no device: payload has no `device` field and the topic gives none");
        device = *default_device;
    }
    int64_t ts;
    if (!time_of(p, o, &present, &ts)) return false;
    if (!present) ts = default_ts;
    if (o->has_readings) {
        if (o->readings_error) return data_error(p, "%s", o->readings_error);
        for (size_t i = 0; i < o->readings.n; i++) {
            if (!single(p, o->readings.v[i], device, ts, out)) {
                char buf[256];
                int n = snprintf(buf, sizeof buf, "readings[%zu]: %.*s", i, (int)p->error.n,
                                 p->error.p);
                if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
                p->error = arena_str(p->j.a, buf, (size_t)n);
                return false;
            }
        }
        return true;
    }
    if (o->has_value || o->has_metric) return single(p, o, device, ts, out);
    for (size_t i = 0; i < o->fields.n; i++) {
        const entry *f = &o->fields.v[i];
        value v;
        if (!scalar_value(&f->value, &v)) continue;
        str unit = {"", 0};
        for (size_t k = 0; k < o->units.n; k++) {
            if (str_eq(o->units.v[k].key, f->key)) {
                if (o->units.v[k].value.kind == SC_TEXT) unit = o->units.v[k].value.text;
                break;
            }
        }
        push(p, out, device, f->key, v, unit, ts);
    }
    return true;
}

// Line and column of byte `at`, counted as serde_json does.
static void position(const json *j, size_t at, size_t *line, size_t *column) {
    size_t start = 0;
    *line = 1;
    for (size_t k = 0; k < at && k < j->n; k++) {
        if (j->s[k] == '\n') {
            (*line)++;
            start = k + 1;
        }
    }
    *column = at - start + 1;
}

bool parse_json(const void *payload, size_t len, const str *default_device,
                int64_t default_timestamp, arena *a, readings *out, str *error) {
    parser p = {0};
    json_init(&p.j, payload, len, a);
    json *j = &p.j;
    object *one = NULL;
    VEC(object *) many = {0};
    int c = json_peek(j);
    bool ok;
    if (c == '{') {
        ok = json_enter(j);
        if (ok) {
            one = arena_alloc(a, sizeof *one);
            memset(one, 0, sizeof *one);
            ok = read_object_body(&p, one);
            json_leave(j);
            ok = ok && json_end_object(j);
        }
    } else if (c == '[') {
        ok = json_enter(j);
        bool first = true, more = true;
        while (ok) {
            ok = json_next_element(j, &first, &more);
            if (!ok || !more) break;
            object *item;
            const char *other;
            ok = read_item(&p, &item, &other);
            if (ok && !item)
                ok = data_error(&p, "item %zu of the array is %s, not an object", many.n, other);
            if (ok) VEC_PUSH(a, many, item);
        }
        if (ok) {
            json_leave(j);
            ok = json_end_array(j);
        }
    } else {
        ok = invalid_type(&p, "a JSON object or array");
    }
    ok = ok && json_end(j);
    if (!ok) {
        if (p.error.p) {
            *error = p.error;
        } else {
            char buf[160];
            size_t line, column;
            position(j, j->err_at, &line, &column);
            int n = snprintf(buf, sizeof buf, "invalid JSON: %s at line %zu column %zu", j->err,
                             line, column);
            *error = arena_str(a, buf, (size_t)n);
        }
        return false;
    }
    if (one) {
        if (!emit(&p, one, default_device, default_timestamp, out)) {
            *error = p.error;
            return false;
        }
    }
    for (size_t i = 0; i < many.n; i++) {
        if (!emit(&p, many.v[i], default_device, default_timestamp, out)) {
            *error = p.error;
            return false;
        }
    }
    return true;
}

// Digits b[from..to) as a number; false when the range is out of the text,
// empty, or not all digits.
static bool num(const unsigned char *b, size_t len, size_t from, size_t to, int64_t *out) {
    if (from > to || to > len || from == to) return false;
    int64_t v = 0;
    for (size_t k = from; k < to; k++) {
        if (b[k] < '0' || b[k] > '9') return false;
        v = v * 10 + (b[k] - '0');
    }
    *out = v;
    return true;
}

static int64_t div_floor(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

// Days since 1970-01-01 in the proleptic Gregorian calendar (H. Hinnant's algorithm).
static int64_t days_from_civil(int64_t y, int64_t m, int64_t d) {
    if (m <= 2) y -= 1;
    int64_t era = div_floor(y, 400);
    int64_t yoe = y - era * 400;
    int64_t mp = (m + 9) % 12;
    int64_t doy = (153 * mp + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

bool parse_time(str s, int64_t *ms) {
    str t = str_trim(s);
    const unsigned char *b = (const unsigned char *)t.p;
    size_t len = t.n;
    if (len < 16 || b[4] != '-' || b[7] != '-' || !(b[10] == 'T' || b[10] == ' ' || b[10] == 't') ||
        b[13] != ':')
        return false;
    int64_t year, month, day, hour, minute, second = 0, millis = 0;
    if (!num(b, len, 0, 4, &year) || !num(b, len, 5, 7, &month) || !num(b, len, 8, 10, &day) ||
        !num(b, len, 11, 13, &hour) || !num(b, len, 14, 16, &minute))
        return false;
    size_t i = 16;
    if (i < len && b[i] == ':') {
        if (!num(b, len, i + 1, i + 3, &second)) return false;
        i += 3;
        if (i < len && b[i] == '.') {
            size_t start = i + 1, end = start;
            while (end < len && b[end] >= '0' && b[end] <= '9') end++;
            if (end == start) return false;
            size_t stop = end < start + 3 ? end : start + 3;
            int64_t digits;
            num(b, len, start, stop, &digits);
            int64_t scale = stop - start == 1 ? 100 : stop - start == 2 ? 10 : 1;
            millis = digits * scale;
            i = end;
        }
    }
    int64_t offset_minutes;
    if (i >= len) {
        offset_minutes = 0;
    } else if ((b[i] == 'Z' || b[i] == 'z') && i + 1 == len) {
        offset_minutes = 0;
    } else if ((b[i] == '+' || b[i] == '-') && len == i + 6 && b[i + 3] == ':') {
        int64_t h, m;
        if (!num(b, len, i + 1, i + 3, &h) || !num(b, len, i + 4, i + 6, &m)) return false;
        offset_minutes = b[i] == '+' ? h * 60 + m : -(h * 60 + m);
    } else {
        return false;
    }
    if (month < 1 || month > 12 || day < 1 || day > 31 || hour > 23 || minute > 59 || second > 60)
        return false;
    int64_t days = days_from_civil(year, month, day);
    *ms = (days * 86400 + hour * 3600 + minute * 60 + second - offset_minutes * 60) * 1000 + millis;
    return true;
}
