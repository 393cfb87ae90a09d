// JSON telemetry payloads to readings: the same shapes, aliases, timestamp
// rules and errors as the Rust SDK's `telemetry::parse_json`.
#ifndef CLEAN_READINGS_TELEMETRY_H
#define CLEAN_READINGS_TELEMETRY_H

#include "util.h"

typedef enum { VALUE_NUMBER, VALUE_BOOLEAN, VALUE_TEXT } value_kind;

typedef struct {
    value_kind kind;
    double number;
    bool boolean;
    str text;
} value;

typedef struct {
    str device;
    str metric;
    str unit;
    value value;
    int64_t timestamp;
} reading;

typedef VEC(reading) readings;

// Appends the payload's readings to *out (all memory in `a`). On failure
// returns false with a message (in `a`) in *error.
bool parse_json(const void *payload, size_t len, const str *default_device,
                int64_t default_timestamp, arena *a, readings *out, str *error);

// Milliseconds since the Unix epoch for `YYYY-MM-DD[T ]HH:MM[:SS[.fff]][Z|±HH:MM]`.
bool parse_time(str s, int64_t *ms);

#endif
