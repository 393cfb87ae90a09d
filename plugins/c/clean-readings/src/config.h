// The plugin's settings, read from the rule file's JSON like the Rust
// plugin's `#[serde(deny_unknown_fields)] struct Config`.
#ifndef CLEAN_READINGS_CONFIG_H
#define CLEAN_READINGS_CONFIG_H

#include "util.h"

typedef struct {
    str metric;
    double min, max;
} range_setting;

typedef struct {
    str metric;
    str unit;
} unit_setting;

typedef struct {
    // Topic level (0-based) that names the device when the payload does not.
    bool has_device_level;
    uint32_t device_level;
    // Inclusive [min, max] per metric, in the metric's target unit.
    VEC(range_setting) ranges;
    // Target unit per metric.
    VEC(unit_setting) units;
    // Text values that read as numbers become numbers.
    bool numeric_text;
    // Drop readings not newer than the last kept one (uses plugin state).
    bool drop_stale;
} config;

// Parses settings JSON into *c (strings in `a`); on failure a message in *error.
bool config_parse(const char *text, size_t len, arena *a, config *c, str *error);

// The setting for `metric`, or NULL; a later duplicate key wins, as in a map.
const range_setting *config_range(const config *c, str metric);
const unit_setting *config_unit(const config *c, str metric);

#endif
