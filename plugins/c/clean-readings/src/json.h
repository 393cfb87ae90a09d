// A pull reader for JSON text that accepts and rejects exactly what the
// Rust plugin's reader (serde_json 1.x, default features, reading from a
// byte slice) does, so that both agree on which payloads are errors and on
// every number's value:
// - strings read as values or keys must be valid UTF-8 with paired surrogate
//   escapes; strings inside skipped values only need valid escapes;
// - numbers are computed like serde_json's default (not correctly rounded in
//   every case) and a number out of f64 range is an error, except inside
//   skipped values;
// - at most 127 arrays/objects may be open through `json_enter` (serde_json's
//   recursion limit); skipped values may nest without limit.
#ifndef CLEAN_READINGS_JSON_H
#define CLEAN_READINGS_JSON_H

#include "util.h"

typedef struct {
    const unsigned char *s;
    size_t n;
    size_t i;
    int depth;
    arena *a;
    const char *err; // the first error, static text
    size_t err_at;
} json;

// What a number is to serde: a u64 (non-negative integer), an i64
// (negative integer) or an f64 (anything else, incl. -0).
typedef enum { JNUM_U64, JNUM_I64, JNUM_F64 } jnum_kind;
typedef struct {
    jnum_kind kind;
    uint64_t u;
    int64_t i;
    double f; // the value as f64, whatever the kind
} jnum;

void json_init(json *j, const void *text, size_t n, arena *a);
// The next byte after whitespace (not consumed), or -1 at the end.
int json_peek(json *j);
// Records an error (the first one wins) and returns false.
bool json_fail(json *j, const char *msg);
// Stops the parse on well-formed JSON of the wrong shape, keeping the first
// such message (printf-style) in *error for the caller to report.
bool json_data_error(json *j, str *error, const char *fmt, ...);

bool json_literal(json *j, const char *word); // null, true, false
bool json_number(json *j, jnum *out);
// A string as a value or key: at `"`; the text is borrowed from the input
// or, with escapes, allocated in the arena.
bool json_string(json *j, str *out);
// Skips any one value (serde's IgnoredAny).
bool json_skip(json *j);
// The rest of an array or object whose first byte was peeked, its elements
// skipped; unlike `json_skip`, it counts toward the nesting limit.
bool json_skip_array(json *j);
bool json_skip_object(json *j);

// Opens `[` or `{` at the cursor, counting it against the depth limit.
bool json_enter(json *j);
void json_leave(json *j);
// Advances to the next array element; *more is false at `]`. `*first` must
// start true.
bool json_next_element(json *j, bool *first, bool *more);
bool json_end_array(json *j);
// Reads the next key and its colon; *more is false at `}`.
bool json_next_key(json *j, bool *first, bool *more, str *key);
bool json_end_object(json *j);
// Only whitespace may follow the document.
bool json_end(json *j);

#endif
