#include "units.h"

#include <string.h>

// The results must equal the Rust plugin's bit for bit: no fused multiply-add.
#pragma STDC FP_CONTRACT OFF

typedef enum { TEMPERATURE, PRESSURE, SPEED, LENGTH, RATIO, ENERGY, POWER } quantity;

typedef struct {
    const char *names[5];
    quantity quantity;
    // Into the base unit: base = value * scale + offset.
    double scale;
    double offset;
} unit;

static const unit UNITS[] = {
    {{"C", "°C", "degC", "celsius"}, TEMPERATURE, 1.0, 0.0},
    {{"F", "°F", "degF", "fahrenheit"}, TEMPERATURE, 5.0 / 9.0, -32.0 * 5.0 / 9.0},
    {{"K", "kelvin"}, TEMPERATURE, 1.0, -273.15},
    {{"Pa", "pascal"}, PRESSURE, 1.0, 0.0},
    {{"hPa", "mbar"}, PRESSURE, 100.0, 0.0},
    {{"kPa"}, PRESSURE, 1000.0, 0.0},
    {{"bar"}, PRESSURE, 100000.0, 0.0},
    {{"psi"}, PRESSURE, 6894.757293168, 0.0},
    {{"m/s", "mps"}, SPEED, 1.0, 0.0},
    {{"km/h", "kph", "kmh"}, SPEED, 1.0 / 3.6, 0.0},
    {{"mph"}, SPEED, 0.44704, 0.0},
    {{"m", "meter", "metre"}, LENGTH, 1.0, 0.0},
    {{"cm"}, LENGTH, 0.01, 0.0},
    {{"mm"}, LENGTH, 0.001, 0.0},
    {{"km"}, LENGTH, 1000.0, 0.0},
    {{"ft", "feet"}, LENGTH, 0.3048, 0.0},
    {{"%", "percent"}, RATIO, 0.01, 0.0},
    {{"ratio", "fraction"}, RATIO, 1.0, 0.0},
    {{"J"}, ENERGY, 1.0, 0.0},
    {{"Wh"}, ENERGY, 3600.0, 0.0},
    {{"kWh"}, ENERGY, 3600000.0, 0.0},
    {{"W"}, POWER, 1.0, 0.0},
    {{"kW"}, POWER, 1000.0, 0.0},
};

enum { N_UNITS = sizeof UNITS / sizeof UNITS[0] };

static bool eq_ignore_ascii_case(const char *a, str b) {
    size_t n = strlen(a);
    if (n != b.n) return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char x = (unsigned char)a[i], y = (unsigned char)b.p[i];
        if (x >= 'A' && x <= 'Z') x += 32;
        if (y >= 'A' && y <= 'Z') y += 32;
        if (x != y) return false;
    }
    return true;
}

// Symbols match exactly (`K` is not `k`); only names longer than three
// bytes also match case-insensitively.
static const unit *find(str name) {
    name = str_trim(name);
    for (int u = 0; u < N_UNITS; u++)
        for (int k = 0; k < 5 && UNITS[u].names[k]; k++)
            if (str_eq_c(name, UNITS[u].names[k])) return &UNITS[u];
    for (int u = 0; u < N_UNITS; u++)
        for (int k = 0; k < 5 && UNITS[u].names[k]; k++)
            if (strlen(UNITS[u].names[k]) > 3 && eq_ignore_ascii_case(UNITS[u].names[k], name))
                return &UNITS[u];
    return NULL;
}

bool units_convert(double value, str from, str to, double *out) {
    const unit *f = find(from), *t = find(to);
    if (!f || !t || f->quantity != t->quantity) return false;
    if (f == t) {
        *out = value;
        return true;
    }
    double base = value * f->scale + f->offset;
    *out = (base - t->offset) / t->scale;
    return true;
}
