// Unit names and conversions, as the Rust SDK's `units` module.
#ifndef CLEAN_READINGS_UNITS_H
#define CLEAN_READINGS_UNITS_H

#include "util.h"

// `value` in `from` expressed in `to`; false when either unit is unknown or
// they measure different quantities.
bool units_convert(double value, str from, str to, double *out);

#endif
