// Preprocessor: JSON telemetry to clean readings; the C twin of the Rust
// plugin plugins/clean-readings, with the same output for the same input.
//
// Drops readings that are not finite numbers where a number is expected
// (NaN, ±inf, "NaN" text), readings outside the configured range of their
// metric, and duplicates (same device, metric and timestamp) within a
// message; with `drop_stale`, also readings not newer than the last one kept
// for that device and metric, using the plugin's persistent state. Converts
// units to the configured unit of each metric; a reading whose unit cannot
// be converted is dropped.
//
// Ownership follows wit-bindgen-c: the exported function owns its
// arguments and frees them; what it returns is freed by the generated
// post-return function, so every returned string and list is malloc'd (and
// empty ones are not allocated at all, since post-return skips them).

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "preprocessor.h"
#include "telemetry.h"
#include "units.h"

typedef ganglion_plugin_types_reading_batch_t batch_t;
typedef ganglion_plugin_types_plugin_error_t plugin_error_t;

static enum { CONFIG_UNREAD, CONFIG_OK, CONFIG_BAD } config_status;
static config settings;
static str config_error;
// Settings are read once and kept for the instance's life (an instance
// serves one rule, whose settings never change).
static arena config_arena;

static void set_error(plugin_error_t *err, uint8_t tag, str message) {
    err->tag = tag;
    preprocessor_string_t *text = tag == GANGLION_PLUGIN_TYPES_PLUGIN_ERROR_BAD_PAYLOAD ? &err->val.bad_payload
                                  : tag == GANGLION_PLUGIN_TYPES_PLUGIN_ERROR_BAD_CONFIG ? &err->val.bad_config
                                                                                          : &err->val.other;
    preprocessor_string_dup_n(text, message.p, message.n);
}

static bool load_config(void) {
    if (config_status != CONFIG_UNREAD) return config_status == CONFIG_OK;
    preprocessor_string_t json;
    ganglion_plugin_config_get_json(&json);
    str error;
    if (config_parse((const char *)json.ptr, json.len, &config_arena, &settings, &error)) {
        config_status = CONFIG_OK;
    } else {
        config_status = CONFIG_BAD;
        config_error = error;
    }
    preprocessor_string_free(&json);
    return config_status == CONFIG_OK;
}

// Rust's `str::parse::<f64>` after `trim`: an optional sign, then `inf`,
// `infinity` or `nan` in any case, or decimal digits with an optional
// fraction and exponent. strtod accepts more (hex, leading space,
// `nan(...)`), so the grammar is checked here and strtod only converts.
static bool parse_f64(str text, double *out) {
    str t = str_trim(text);
    size_t i = 0;
    bool negative = false;
    if (t.n > 0 && (t.p[0] == '+' || t.p[0] == '-')) {
        negative = t.p[0] == '-';
        i = 1;
    }
    if (i == t.n) return false;
    str rest = {t.p + i, t.n - i};
    static const char *const specials[] = {"inf", "infinity", "nan"};
    for (int k = 0; k < 3; k++) {
        size_t n = strlen(specials[k]);
        if (rest.n != n) continue;
        bool same = true;
        for (size_t c = 0; c < n; c++)
            if ((rest.p[c] | 0x20) != specials[k][c]) same = false;
        if (same) {
            double v = k == 2 ? NAN : INFINITY;
            *out = negative ? -v : v;
            return true;
        }
    }
    size_t digits = 0;
    while (i < t.n && t.p[i] >= '0' && t.p[i] <= '9') i++, digits++;
    if (i < t.n && t.p[i] == '.') {
        i++;
        while (i < t.n && t.p[i] >= '0' && t.p[i] <= '9') i++, digits++;
    }
    if (digits == 0) return false;
    if (i < t.n && (t.p[i] == 'e' || t.p[i] == 'E')) {
        i++;
        if (i < t.n && (t.p[i] == '+' || t.p[i] == '-')) i++;
        if (i == t.n || t.p[i] < '0' || t.p[i] > '9') return false;
        while (i < t.n && t.p[i] >= '0' && t.p[i] <= '9') i++;
    }
    if (i != t.n) return false;
    char *buf = xmalloc(t.n + 1);
    memcpy(buf, t.p, t.n);
    buf[t.n] = 0;
    *out = strtod(buf, NULL);
    free(buf);
    return true;
}

// The output batch: names stored once (a hash index over them), readings
// appended in order.
typedef struct {
    batch_t batch;
    size_t names_cap, readings_cap;
    uint32_t *index; // slots hold name index + 1; 0 is empty
    size_t index_cap;
    arena *a;
} builder;

static uint32_t intern(builder *b, str name) {
    if (b->batch.names.len * 2 >= b->index_cap) {
        size_t cap = b->index_cap ? b->index_cap * 2 : 64;
        uint32_t *index = arena_alloc(b->a, cap * sizeof *index);
        memset(index, 0, cap * sizeof *index);
        for (size_t i = 0; i < b->batch.names.len; i++) {
            preprocessor_string_t *s = &b->batch.names.ptr[i];
            size_t slot = hash_bytes(s->ptr, s->len, 0) & (cap - 1);
            while (index[slot]) slot = (slot + 1) & (cap - 1);
            index[slot] = (uint32_t)i + 1;
        }
        b->index = index;
        b->index_cap = cap;
    }
    size_t slot = hash_bytes(name.p, name.n, 0) & (b->index_cap - 1);
    while (b->index[slot]) {
        preprocessor_string_t *s = &b->batch.names.ptr[b->index[slot] - 1];
        if (str_eq((str){(const char *)s->ptr, s->len}, name)) return b->index[slot] - 1;
        slot = (slot + 1) & (b->index_cap - 1);
    }
    if (b->batch.names.len == b->names_cap) {
        b->names_cap = b->names_cap ? b->names_cap * 2 : 8;
        b->batch.names.ptr = xrealloc(b->batch.names.ptr, b->names_cap * sizeof(preprocessor_string_t));
    }
    uint32_t i = (uint32_t)b->batch.names.len++;
    preprocessor_string_t *s = &b->batch.names.ptr[i];
    s->len = name.n;
    s->ptr = NULL;
    if (name.n) {
        s->ptr = xmalloc(name.n);
        memcpy(s->ptr, name.p, name.n);
    }
    b->index[slot] = i + 1;
    return i;
}

static void builder_push(builder *b, const reading *r) {
    ganglion_plugin_types_reading_t out = {0};
    out.device = intern(b, r->device);
    out.metric = intern(b, r->metric);
    out.unit = intern(b, r->unit);
    out.timestamp = r->timestamp;
    switch (r->value.kind) {
    case VALUE_NUMBER:
        out.value.tag = GANGLION_PLUGIN_TYPES_VALUE_NUMBER;
        out.value.val.number = r->value.number;
        break;
    case VALUE_BOOLEAN:
        out.value.tag = GANGLION_PLUGIN_TYPES_VALUE_BOOLEAN;
        out.value.val.boolean = r->value.boolean;
        break;
    case VALUE_TEXT:
        out.value.tag = GANGLION_PLUGIN_TYPES_VALUE_TEXT;
        out.value.val.text.len = r->value.text.n;
        if (r->value.text.n) {
            out.value.val.text.ptr = xmalloc(r->value.text.n);
            memcpy(out.value.val.text.ptr, r->value.text.p, r->value.text.n);
        }
        break;
    }
    if (b->batch.readings.len == b->readings_cap) {
        b->readings_cap = b->readings_cap ? b->readings_cap * 2 : 8;
        b->batch.readings.ptr =
            xrealloc(b->batch.readings.ptr, b->readings_cap * sizeof(ganglion_plugin_types_reading_t));
    }
    b->batch.readings.ptr[b->batch.readings.len++] = out;
}

static batch_t builder_finish(builder *b) {
    if (b->batch.names.len == 0) {
        free(b->batch.names.ptr);
        b->batch.names.ptr = NULL;
    }
    if (b->batch.readings.len == 0) {
        free(b->batch.readings.ptr);
        b->batch.readings.ptr = NULL;
    }
    return b->batch;
}

// (device, metric, timestamp) keys seen in this message.
typedef struct {
    uint32_t device, metric;
    int64_t timestamp;
    bool used;
} seen_key;

typedef struct {
    seen_key *slots;
    size_t cap, len;
    arena *a;
} seen_set;

static size_t seen_slot(const seen_set *s, seen_key k) {
    uint64_t h = hash_bytes(&k.device, sizeof k.device, 0);
    h = hash_bytes(&k.metric, sizeof k.metric, h);
    h = hash_bytes(&k.timestamp, sizeof k.timestamp, h);
    size_t slot = h & (s->cap - 1);
    while (s->slots[slot].used &&
           !(s->slots[slot].device == k.device && s->slots[slot].metric == k.metric &&
             s->slots[slot].timestamp == k.timestamp))
        slot = (slot + 1) & (s->cap - 1);
    return slot;
}

// Adds the key; false when it was already there.
static bool seen_insert(seen_set *s, uint32_t device, uint32_t metric, int64_t timestamp) {
    seen_key k = {device, metric, timestamp, true};
    if (s->len * 2 >= s->cap) {
        seen_set grown = {NULL, s->cap ? s->cap * 2 : 64, s->len, s->a};
        grown.slots = arena_alloc(s->a, grown.cap * sizeof(seen_key));
        memset(grown.slots, 0, grown.cap * sizeof(seen_key));
        for (size_t i = 0; i < s->cap; i++)
            if (s->slots[i].used) grown.slots[seen_slot(&grown, s->slots[i])] = s->slots[i];
        *s = grown;
    }
    size_t slot = seen_slot(s, k);
    if (s->slots[slot].used) return false;
    s->slots[slot] = k;
    s->len++;
    return true;
}

typedef struct {
    bool failed;
    ganglion_plugin_state_state_error_t error;
} state_status;

// Whether the reading is newer than the last one kept for its device and
// metric, recording it when it is. After a state error every reading counts
// as fresh and the state is left alone; the call then fails.
static bool is_fresh(state_status *st, str device, str metric, int64_t timestamp) {
    if (!settings.drop_stale || st->failed) return true;
    size_t len = 5 + device.n + 1 + metric.n;
    char *key_text = xmalloc(len);
    memcpy(key_text, "last/", 5);
    memcpy(key_text + 5, device.p, device.n);
    key_text[5 + device.n] = '/';
    memcpy(key_text + 6 + device.n, metric.p, metric.n);
    preprocessor_string_t key = {(uint8_t *)key_text, len};

    bool fresh = true;
    preprocessor_option_list_u8_t stored;
    if (!ganglion_plugin_state_get(&key, &stored, &st->error)) {
        st->failed = true;
    } else {
        bool stale = false;
        if (stored.is_some && stored.val.len == 8) {
            int64_t last;
            memcpy(&last, stored.val.ptr, 8);
            stale = timestamp <= last;
        }
        preprocessor_option_list_u8_free(&stored);
        if (stale) {
            fresh = false;
        } else {
            uint8_t bytes[8];
            memcpy(bytes, &timestamp, 8);
            preprocessor_list_u8_t value = {bytes, 8};
            if (!ganglion_plugin_state_set(&key, &value, &st->error)) st->failed = true;
        }
    }
    free(key_text);
    return fresh;
}

static str state_error_text(arena *a, const ganglion_plugin_state_state_error_t *e) {
    char buf[256];
    int n;
    switch (e->tag) {
    case GANGLION_PLUGIN_STATE_STATE_ERROR_TOO_LARGE:
        n = snprintf(buf, sizeof buf, "state: StateError::TooLarge");
        break;
    case GANGLION_PLUGIN_STATE_STATE_ERROR_QUOTA_EXCEEDED:
        n = snprintf(buf, sizeof buf, "state: StateError::QuotaExceeded");
        break;
    default:
        n = snprintf(buf, sizeof buf, "state: StateError::Io(\"%.*s\")",
                     (int)(e->val.io.len > 200 ? 200 : e->val.io.len), (const char *)e->val.io.ptr);
        break;
    }
    if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
    return arena_str(a, buf, (size_t)n);
}

typedef struct {
    size_t not_finite, out_of_range, duplicate, bad_unit, stale;
} dropped;

static str name_at(const batch_t *b, uint32_t index) {
    if (index >= b->names.len) return (str){"", 0};
    return (str){(const char *)b->names.ptr[index].ptr, b->names.ptr[index].len};
}

// The readings to clean: the previous preprocessor's, else the payload's.
static bool gather(const ganglion_plugin_types_message_t *message, const batch_t *input, arena *a,
                   readings *out, str *error) {
    if (input->readings.len > 0) {
        for (size_t i = 0; i < input->readings.len; i++) {
            const ganglion_plugin_types_reading_t *in = &input->readings.ptr[i];
            reading r = {name_at(input, in->device), name_at(input, in->metric),
                         name_at(input, in->unit), {0}, in->timestamp};
            switch (in->value.tag) {
            case GANGLION_PLUGIN_TYPES_VALUE_NUMBER:
                r.value.kind = VALUE_NUMBER;
                r.value.number = in->value.val.number;
                break;
            case GANGLION_PLUGIN_TYPES_VALUE_BOOLEAN:
                r.value.kind = VALUE_BOOLEAN;
                r.value.boolean = in->value.val.boolean;
                break;
            default:
                r.value.kind = VALUE_TEXT;
                r.value.text = (str){(const char *)in->value.val.text.ptr, in->value.val.text.len};
                break;
            }
            VEC_PUSH(a, *out, r);
        }
        return true;
    }
    str topic = {(const char *)message->topic.ptr, message->topic.len};
    str device;
    bool has_device = false;
    if (settings.has_device_level) {
        uint32_t level = 0;
        size_t start = 0;
        for (size_t i = 0; i <= topic.n; i++) {
            if (i < topic.n && topic.p[i] != '/') continue;
            if (level == settings.device_level) {
                device = (str){topic.p + start, i - start};
                has_device = device.n > 0;
                break;
            }
            level++;
            start = i + 1;
        }
    }
    return parse_json(message->payload.ptr, message->payload.len, has_device ? &device : NULL,
                      message->timestamp, a, out, error);
}

static bool clean(const ganglion_plugin_types_message_t *message, const batch_t *input, arena *a,
                  batch_t *ret, plugin_error_t *err) {
    readings parsed = {0};
    str error;
    if (!gather(message, input, a, &parsed, &error)) {
        set_error(err, GANGLION_PLUGIN_TYPES_PLUGIN_ERROR_BAD_PAYLOAD, error);
        return false;
    }
    builder out = {.a = a};
    seen_set seen = {.a = a};
    state_status st = {0};
    dropped d = {0};
    for (size_t i = 0; i < parsed.n; i++) {
        reading r = parsed.v[i];
        if (settings.numeric_text && r.value.kind == VALUE_TEXT) {
            double n;
            if (parse_f64(r.value.text, &n)) {
                r.value.kind = VALUE_NUMBER;
                r.value.number = n;
            }
        }
        if (r.value.kind == VALUE_NUMBER) {
            if (!isfinite(r.value.number)) {
                d.not_finite++;
                continue;
            }
            const unit_setting *target = config_unit(&settings, r.metric);
            if (target) {
                double converted;
                if (r.unit.n == 0) {
                    r.unit = target->unit;
                } else if (units_convert(r.value.number, r.unit, target->unit, &converted)) {
                    r.value.number = converted;
                    r.unit = target->unit;
                } else {
                    d.bad_unit++;
                    continue;
                }
            }
            const range_setting *range = config_range(&settings, r.metric);
            if (range && !(range->min <= r.value.number && r.value.number <= range->max)) {
                d.out_of_range++;
                continue;
            }
        }
        uint32_t device = intern(&out, r.device);
        uint32_t metric = intern(&out, r.metric);
        if (!seen_insert(&seen, device, metric, r.timestamp)) {
            d.duplicate++;
            continue;
        }
        if (!is_fresh(&st, r.device, r.metric, r.timestamp)) {
            d.stale++;
            continue;
        }
        builder_push(&out, &r);
    }
    batch_t batch = builder_finish(&out);
    if (st.failed) {
        ganglion_plugin_types_reading_batch_free(&batch);
        set_error(err, GANGLION_PLUGIN_TYPES_PLUGIN_ERROR_OTHER, state_error_text(a, &st.error));
        ganglion_plugin_state_state_error_free(&st.error);
        return false;
    }
    size_t total = d.not_finite + d.out_of_range + d.duplicate + d.bad_unit + d.stale;
    if (total > 0) {
        char buf[400];
        int n = snprintf(buf, sizeof buf,
                         "%zu readings dropped from %.*s: Dropped { not_finite: %zu, out_of_range: "
                         "%zu, duplicate: %zu, bad_unit: %zu, stale: %zu }",
                         total, (int)(message->topic.len > 200 ? 200 : message->topic.len),
                         (const char *)message->topic.ptr, d.not_finite, d.out_of_range,
                         d.duplicate, d.bad_unit, d.stale);
        if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
        preprocessor_string_t text = {(uint8_t *)buf, (size_t)n};
        ganglion_plugin_log_log(GANGLION_PLUGIN_LOG_LEVEL_DEBUG, &text);
    }
    *ret = batch;
    return true;
}

bool exports_ganglion_plugin_preprocess_preprocess(ganglion_plugin_types_message_t *message,
                                                   batch_t *readings, batch_t *ret,
                                                   plugin_error_t *err) {
    bool ok;
    if (!load_config()) {
        set_error(err, GANGLION_PLUGIN_TYPES_PLUGIN_ERROR_BAD_CONFIG, config_error);
        ok = false;
    } else {
        arena a = {0};
        ok = clean(message, readings, &a, ret, err);
        arena_free(&a);
    }
    ganglion_plugin_types_message_free(message);
    ganglion_plugin_types_reading_batch_free(readings);
    return ok;
}
