#include "config.h"

#include <stdio.h>
#include <string.h>

#include "json.h"

static const char *const FIELDS[] = {"device_from_topic", "ranges", "units", "numeric_text",
                                     "drop_stale"};
enum { N_FIELDS = 5 };

typedef struct {
    json j;
    str error;
} reader;

#define fail(r, ...) json_data_error(&(r)->j, &(r)->error, __VA_ARGS__)

static const char *found(int c) {
    switch (c) {
    case -1: return "nothing";
    case 'n': return "null";
    case 't':
    case 'f': return "a boolean";
    case '"': return "a string";
    case '[': return "a sequence";
    case '{': return "a map";
    default: return "a number";
    }
}

static bool is_number_start(int c) {
    return c == '-' || (c >= '0' && c <= '9');
}

static bool read_f64(reader *r, double *out) {
    int c = json_peek(&r->j);
    if (c == -1) return json_fail(&r->j, "EOF while parsing a value");
    if (!is_number_start(c)) return fail(r, "invalid type: %s, expected f64", found(c));
    jnum n;
    if (!json_number(&r->j, &n)) return false;
    *out = n.f;
    return true;
}

// `[f64; 2]`: exactly two numbers.
static bool read_pair(reader *r, range_setting *s) {
    json *j = &r->j;
    int c = json_peek(j);
    if (c == -1) return json_fail(j, "EOF while parsing a value");
    if (c != '[') return fail(r, "invalid type: %s, expected an array of length 2", found(c));
    if (!json_enter(j)) return false;
    bool first = true, more;
    double *slots[2] = {&s->min, &s->max};
    for (int k = 0; k < 2; k++) {
        if (!json_next_element(j, &first, &more)) return false;
        if (!more) return fail(r, "invalid length %d, expected an array of length 2", k);
        if (!read_f64(r, slots[k])) return false;
    }
    json_leave(j);
    return json_end_array(j);
}

// The `{` of a `HashMap` setting.
static bool begin_map(reader *r) {
    int p = json_peek(&r->j);
    if (p == -1) return json_fail(&r->j, "EOF while parsing a value");
    if (p != '{') return fail(r, "invalid type: %s, expected a map", found(p));
    return json_enter(&r->j);
}

static bool read_ranges(reader *r, config *c) {
    json *j = &r->j;
    if (!begin_map(r)) return false;
    bool first = true, more;
    for (;;) {
        range_setting s;
        if (!json_next_key(j, &first, &more, &s.metric)) return false;
        if (!more) break;
        if (!read_pair(r, &s)) return false;
        s.metric = arena_str(j->a, s.metric.p, s.metric.n);
        VEC_PUSH(j->a, c->ranges, s);
    }
    json_leave(j);
    return json_end_object(j);
}

static bool read_units(reader *r, config *c) {
    json *j = &r->j;
    if (!begin_map(r)) return false;
    bool first = true, more;
    for (;;) {
        unit_setting s;
        if (!json_next_key(j, &first, &more, &s.metric)) return false;
        if (!more) break;
        int p = json_peek(j);
        if (p == -1) return json_fail(j, "EOF while parsing a value");
        if (p != '"') return fail(r, "invalid type: %s, expected a string", found(p));
        if (!json_string(j, &s.unit)) return false;
        s.metric = arena_str(j->a, s.metric.p, s.metric.n);
        s.unit = arena_str(j->a, s.unit.p, s.unit.n);
        VEC_PUSH(j->a, c->units, s);
    }
    json_leave(j);
    return json_end_object(j);
}

static bool read_bool(reader *r, bool *out) {
    json *j = &r->j;
    int p = json_peek(j);
    if (p == -1) return json_fail(j, "EOF while parsing a value");
    if (p == 't') {
        *out = true;
        return json_literal(j, "true");
    }
    if (p == 'f') {
        *out = false;
        return json_literal(j, "false");
    }
    return fail(r, "invalid type: %s, expected a boolean", found(p));
}

// `Option<usize>` on wasm32, where usize is 32 bits.
static bool read_device_level(reader *r, config *c) {
    json *j = &r->j;
    int p = json_peek(j);
    if (p == 'n') {
        c->has_device_level = false;
        return json_literal(j, "null");
    }
    if (p == -1) return json_fail(j, "EOF while parsing a value");
    if (!is_number_start(p)) return fail(r, "invalid type: %s, expected usize", found(p));
    jnum n;
    if (!json_number(j, &n)) return false;
    if (n.kind == JNUM_F64) return fail(r, "invalid type: floating point, expected usize");
    if (n.kind == JNUM_I64 || n.u > UINT32_MAX)
        return fail(r, "invalid value: integer out of range, expected usize");
    c->has_device_level = true;
    c->device_level = (uint32_t)n.u;
    return true;
}

static bool read_numeric_text(reader *r, config *c) {
    if (json_peek(&r->j) == 'n') {
        c->numeric_text = true;
        return json_literal(&r->j, "null");
    }
    return read_bool(r, &c->numeric_text);
}

static bool read_field(reader *r, config *c, int field) {
    switch (field) {
    case 0: return read_device_level(r, c);
    case 1: return read_ranges(r, c);
    case 2: return read_units(r, c);
    case 3: return read_numeric_text(r, c);
    default: return read_bool(r, &c->drop_stale);
    }
}

static bool read_object(reader *r, config *c) {
    json *j = &r->j;
    bool seen[N_FIELDS] = {false};
    bool first = true, more;
    for (;;) {
        str key;
        if (!json_next_key(j, &first, &more, &key)) return false;
        if (!more) return true;
        int field = -1;
        for (int f = 0; f < N_FIELDS; f++)
            if (str_eq_c(key, FIELDS[f])) field = f;
        if (field < 0)
            return fail(r,
                        "unknown field `%.*s`, expected one of `device_from_topic`, `ranges`, "
                        "`units`, `numeric_text`, `drop_stale`",
                        (int)(key.n > 64 ? 64 : key.n), key.p);
        if (seen[field]) return fail(r, "duplicate field `%s`", FIELDS[field]);
        seen[field] = true;
        if (!read_field(r, c, field)) return false;
    }
}

// serde also accepts a struct as an array of its fields in order; a missing
// field without a default is an error there.
static bool read_array(reader *r, config *c) {
    json *j = &r->j;
    bool first = true, more = true;
    for (int field = 0; field < N_FIELDS; field++) {
        if (more && !json_next_element(j, &first, &more)) return false;
        if (more) {
            if (!read_field(r, c, field)) return false;
        } else if (field == 0 || field == 3) {
            return fail(r, "invalid length %d, expected struct Config with 5 elements", field);
        }
    }
    return true;
}

bool config_parse(const char *text, size_t len, arena *a, config *c, str *error) {
    reader r = {0};
    json_init(&r.j, text, len, a);
    memset(c, 0, sizeof *c);
    c->numeric_text = true;
    json *j = &r.j;
    int p = json_peek(j);
    bool ok;
    if (p == '{') {
        ok = json_enter(j) && read_object(&r, c);
        if (ok) {
            json_leave(j);
            ok = json_end_object(j);
        }
    } else if (p == '[') {
        ok = json_enter(j) && read_array(&r, c);
        if (ok) {
            json_leave(j);
            ok = json_end_array(j);
        }
    } else if (p == -1) {
        ok = json_fail(j, "EOF while parsing a value");
    } else {
        ok = fail(&r, "invalid type: %s, expected struct Config", found(p));
    }
    ok = ok && json_end(j);
    if (ok) return true;
    if (r.error.p) {
        *error = r.error;
    } else {
        char buf[128];
        int n = snprintf(buf, sizeof buf, "%s at byte %zu", j->err, j->err_at);
        *error = arena_str(a, buf, (size_t)n);
    }
    return false;
}

const range_setting *config_range(const config *c, str metric) {
    for (size_t i = c->ranges.n; i-- > 0;)
        if (str_eq(c->ranges.v[i].metric, metric)) return &c->ranges.v[i];
    return NULL;
}

const unit_setting *config_unit(const config *c, str metric) {
    for (size_t i = c->units.n; i-- > 0;)
        if (str_eq(c->units.v[i].metric, metric)) return &c->units.v[i];
    return NULL;
}
