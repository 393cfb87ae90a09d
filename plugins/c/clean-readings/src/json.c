#include "json.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

// 1e0 ..= 1e308, as serde_json's POW10 table.
static const double POW10[309] = {
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5,
    1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17,
    1e18, 1e19, 1e20, 1e21, 1e22, 1e23,
    1e24, 1e25, 1e26, 1e27, 1e28, 1e29,
    1e30, 1e31, 1e32, 1e33, 1e34, 1e35,
    1e36, 1e37, 1e38, 1e39, 1e40, 1e41,
    1e42, 1e43, 1e44, 1e45, 1e46, 1e47,
    1e48, 1e49, 1e50, 1e51, 1e52, 1e53,
    1e54, 1e55, 1e56, 1e57, 1e58, 1e59,
    1e60, 1e61, 1e62, 1e63, 1e64, 1e65,
    1e66, 1e67, 1e68, 1e69, 1e70, 1e71,
    1e72, 1e73, 1e74, 1e75, 1e76, 1e77,
    1e78, 1e79, 1e80, 1e81, 1e82, 1e83,
    1e84, 1e85, 1e86, 1e87, 1e88, 1e89,
    1e90, 1e91, 1e92, 1e93, 1e94, 1e95,
    1e96, 1e97, 1e98, 1e99, 1e100, 1e101,
    1e102, 1e103, 1e104, 1e105, 1e106, 1e107,
    1e108, 1e109, 1e110, 1e111, 1e112, 1e113,
    1e114, 1e115, 1e116, 1e117, 1e118, 1e119,
    1e120, 1e121, 1e122, 1e123, 1e124, 1e125,
    1e126, 1e127, 1e128, 1e129, 1e130, 1e131,
    1e132, 1e133, 1e134, 1e135, 1e136, 1e137,
    1e138, 1e139, 1e140, 1e141, 1e142, 1e143,
    1e144, 1e145, 1e146, 1e147, 1e148, 1e149,
    1e150, 1e151, 1e152, 1e153, 1e154, 1e155,
    1e156, 1e157, 1e158, 1e159, 1e160, 1e161,
    1e162, 1e163, 1e164, 1e165, 1e166, 1e167,
    1e168, 1e169, 1e170, 1e171, 1e172, 1e173,
    1e174, 1e175, 1e176, 1e177, 1e178, 1e179,
    1e180, 1e181, 1e182, 1e183, 1e184, 1e185,
    1e186, 1e187, 1e188, 1e189, 1e190, 1e191,
    1e192, 1e193, 1e194, 1e195, 1e196, 1e197,
    1e198, 1e199, 1e200, 1e201, 1e202, 1e203,
    1e204, 1e205, 1e206, 1e207, 1e208, 1e209,
    1e210, 1e211, 1e212, 1e213, 1e214, 1e215,
    1e216, 1e217, 1e218, 1e219, 1e220, 1e221,
    1e222, 1e223, 1e224, 1e225, 1e226, 1e227,
    1e228, 1e229, 1e230, 1e231, 1e232, 1e233,
    1e234, 1e235, 1e236, 1e237, 1e238, 1e239,
    1e240, 1e241, 1e242, 1e243, 1e244, 1e245,
    1e246, 1e247, 1e248, 1e249, 1e250, 1e251,
    1e252, 1e253, 1e254, 1e255, 1e256, 1e257,
    1e258, 1e259, 1e260, 1e261, 1e262, 1e263,
    1e264, 1e265, 1e266, 1e267, 1e268, 1e269,
    1e270, 1e271, 1e272, 1e273, 1e274, 1e275,
    1e276, 1e277, 1e278, 1e279, 1e280, 1e281,
    1e282, 1e283, 1e284, 1e285, 1e286, 1e287,
    1e288, 1e289, 1e290, 1e291, 1e292, 1e293,
    1e294, 1e295, 1e296, 1e297, 1e298, 1e299,
    1e300, 1e301, 1e302, 1e303, 1e304, 1e305,
    1e306, 1e307, 1e308,
};

enum { DEPTH_LIMIT = 128 };

void json_init(json *j, const void *text, size_t n, arena *a) {
    j->s = text;
    j->n = n;
    j->i = 0;
    j->depth = DEPTH_LIMIT;
    j->a = a;
    j->err = NULL;
    j->err_at = 0;
}

bool json_fail(json *j, const char *msg) {
    if (!j->err) {
        j->err = msg;
        j->err_at = j->i;
    }
    return false;
}

int json_peek(json *j) {
    while (j->i < j->n) {
        unsigned char c = j->s[j->i];
        if (c != ' ' && c != '\n' && c != '\t' && c != '\r') return c;
        j->i++;
    }
    return -1;
}

static int peek_raw(json *j) {
    return j->i < j->n ? j->s[j->i] : -1;
}

static bool is_digit(int c) {
    return c >= '0' && c <= '9';
}

bool json_literal(json *j, const char *word) {
    for (const char *w = word; *w; w++) {
        if (j->i >= j->n) return json_fail(j, "EOF while parsing a value");
        if (j->s[j->i++] != (unsigned char)*w) return json_fail(j, "expected ident");
    }
    return true;
}

// serde_json's overflow! check for `acc * 10 + digit` against u64::MAX.
static bool u64_overflows(uint64_t acc, unsigned digit) {
    return acc >= UINT64_MAX / 10 && (acc > UINT64_MAX / 10 || digit > UINT64_MAX % 10);
}

static bool i32_overflows(int32_t acc, int digit) {
    return acc >= INT32_MAX / 10 && (acc > INT32_MAX / 10 || digit > INT32_MAX % 10);
}

static int32_t sat_add(int32_t a, int32_t b) {
    int64_t r = (int64_t)a + b;
    return r > INT32_MAX ? INT32_MAX : r < INT32_MIN ? INT32_MIN : (int32_t)r;
}

static int32_t sat_sub(int32_t a, int32_t b) {
    int64_t r = (int64_t)a - b;
    return r > INT32_MAX ? INT32_MAX : r < INT32_MIN ? INT32_MIN : (int32_t)r;
}

// The number parse below follows serde_json's de.rs function by function
// (without its float_roundtrip feature), since its results are what the
// Rust plugin sees.
static bool f64_from_parts(json *j, bool positive, uint64_t significand, int32_t exponent,
                           double *out) {
    double f = (double)significand;
    for (;;) {
        uint32_t index = exponent < 0 ? 0u - (uint32_t)exponent : (uint32_t)exponent;
        if (index < 309) {
            if (exponent >= 0) {
                f *= POW10[index];
                if (__builtin_isinf(f)) return json_fail(j, "number out of range");
            } else {
                f /= POW10[index];
            }
            break;
        }
        if (f == 0.0) break;
        if (exponent >= 0) return json_fail(j, "number out of range");
        f /= 1e308;
        exponent += 308;
    }
    *out = positive ? f : -f;
    return true;
}

static bool parse_exponent_overflow(json *j, bool positive, bool zero_significand,
                                    bool positive_exp, double *out) {
    if (!zero_significand && positive_exp) return json_fail(j, "number out of range");
    while (is_digit(peek_raw(j))) j->i++;
    *out = positive ? 0.0 : -0.0;
    return true;
}

static bool parse_exponent(json *j, bool positive, uint64_t significand, int32_t starting_exp,
                           double *out) {
    j->i++;
    bool positive_exp = true;
    if (peek_raw(j) == '+') {
        j->i++;
    } else if (peek_raw(j) == '-') {
        j->i++;
        positive_exp = false;
    }
    if (j->i >= j->n) return json_fail(j, "EOF while parsing a value");
    int c = j->s[j->i++];
    if (!is_digit(c)) return json_fail(j, "invalid number");
    int32_t exp = c - '0';
    while (is_digit(peek_raw(j))) {
        int digit = j->s[j->i++] - '0';
        if (i32_overflows(exp, digit))
            return parse_exponent_overflow(j, positive, significand == 0, positive_exp, out);
        exp = exp * 10 + digit;
    }
    int32_t final_exp = positive_exp ? sat_add(starting_exp, exp) : sat_sub(starting_exp, exp);
    return f64_from_parts(j, positive, significand, final_exp, out);
}

static bool parse_decimal_overflow(json *j, bool positive, uint64_t significand, int32_t exponent,
                                   double *out) {
    while (is_digit(peek_raw(j))) j->i++;
    int c = peek_raw(j);
    if (c == 'e' || c == 'E') return parse_exponent(j, positive, significand, exponent, out);
    return f64_from_parts(j, positive, significand, exponent, out);
}

static bool parse_decimal(json *j, bool positive, uint64_t significand,
                          int32_t exponent_before_decimal_point, double *out) {
    j->i++;
    int32_t exponent_after_decimal_point = 0;
    while (is_digit(peek_raw(j))) {
        unsigned digit = j->s[j->i] - '0';
        if (u64_overflows(significand, digit))
            return parse_decimal_overflow(
                j, positive, significand,
                exponent_before_decimal_point + exponent_after_decimal_point, out);
        j->i++;
        significand = significand * 10 + digit;
        exponent_after_decimal_point -= 1;
    }
    if (exponent_after_decimal_point == 0)
        return json_fail(j, j->i < j->n ? "invalid number" : "EOF while parsing a value");
    int32_t exponent = exponent_before_decimal_point + exponent_after_decimal_point;
    int c = peek_raw(j);
    if (c == 'e' || c == 'E') return parse_exponent(j, positive, significand, exponent, out);
    return f64_from_parts(j, positive, significand, exponent, out);
}

static bool parse_long_integer(json *j, bool positive, uint64_t significand, double *out) {
    int32_t exponent = 0;
    for (;;) {
        int c = peek_raw(j);
        if (is_digit(c)) {
            j->i++;
            exponent += 1;
        } else if (c == '.') {
            return parse_decimal(j, positive, significand, exponent, out);
        } else if (c == 'e' || c == 'E') {
            return parse_exponent(j, positive, significand, exponent, out);
        } else {
            return f64_from_parts(j, positive, significand, exponent, out);
        }
    }
}

static bool parse_number_tail(json *j, bool positive, uint64_t significand, jnum *out) {
    int c = peek_raw(j);
    out->kind = JNUM_F64;
    if (c == '.') return parse_decimal(j, positive, significand, 0, &out->f);
    if (c == 'e' || c == 'E') return parse_exponent(j, positive, significand, 0, &out->f);
    if (positive) {
        out->kind = JNUM_U64;
        out->u = significand;
        out->f = (double)significand;
        return true;
    }
    int64_t neg = (int64_t)(0 - significand);
    if (neg >= 0) {
        out->f = -(double)significand;
    } else {
        out->kind = JNUM_I64;
        out->i = neg;
        out->f = (double)neg;
    }
    return true;
}

bool json_number(json *j, jnum *out) {
    bool positive = true;
    if (peek_raw(j) == '-') {
        j->i++;
        positive = false;
    }
    if (j->i >= j->n) return json_fail(j, "EOF while parsing a value");
    int c = j->s[j->i++];
    if (c == '0') {
        if (is_digit(peek_raw(j))) return json_fail(j, "invalid number");
        return parse_number_tail(j, positive, 0, out);
    }
    if (c < '1' || c > '9') return json_fail(j, "invalid number");
    uint64_t significand = (uint64_t)(c - '0');
    for (;;) {
        int d = peek_raw(j);
        if (!is_digit(d)) return parse_number_tail(j, positive, significand, out);
        unsigned digit = (unsigned)(d - '0');
        if (u64_overflows(significand, digit)) {
            out->kind = JNUM_F64;
            return parse_long_integer(j, positive, significand, &out->f);
        }
        j->i++;
        significand = significand * 10 + digit;
    }
}

static int hex_value(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static bool hex_escape(json *j, uint32_t *out) {
    if (j->n - j->i < 4) {
        j->i = j->n;
        return json_fail(j, "EOF while parsing a string");
    }
    uint32_t v = 0;
    for (int k = 0; k < 4; k++) {
        int h = hex_value(j->s[j->i + k]);
        if (h < 0) {
            j->i += 4;
            return json_fail(j, "invalid escape");
        }
        v = v * 16 + (uint32_t)h;
    }
    j->i += 4;
    *out = v;
    return true;
}

typedef VEC(char) bytes;

static void push_utf8(arena *a, bytes *b, uint32_t c) {
    if (c < 0x80) {
        VEC_PUSH(a, *b, (char)c);
    } else if (c < 0x800) {
        VEC_PUSH(a, *b, (char)(0xc0 | (c >> 6)));
        VEC_PUSH(a, *b, (char)(0x80 | (c & 0x3f)));
    } else if (c < 0x10000) {
        VEC_PUSH(a, *b, (char)(0xe0 | (c >> 12)));
        VEC_PUSH(a, *b, (char)(0x80 | ((c >> 6) & 0x3f)));
        VEC_PUSH(a, *b, (char)(0x80 | (c & 0x3f)));
    } else {
        VEC_PUSH(a, *b, (char)(0xf0 | (c >> 18)));
        VEC_PUSH(a, *b, (char)(0x80 | ((c >> 12) & 0x3f)));
        VEC_PUSH(a, *b, (char)(0x80 | ((c >> 6) & 0x3f)));
        VEC_PUSH(a, *b, (char)(0x80 | (c & 0x3f)));
    }
}

static bool next_byte(json *j, int *c) {
    if (j->i >= j->n) return json_fail(j, "EOF while parsing a string");
    *c = j->s[j->i++];
    return true;
}

static bool unicode_escape(json *j, bytes *b) {
    uint32_t n;
    if (!hex_escape(j, &n)) return false;
    if (n >= 0xdc00 && n <= 0xdfff) return json_fail(j, "lone leading surrogate in hex escape");
    if (n < 0xd800 || n > 0xdbff) {
        push_utf8(j->a, b, n);
        return true;
    }
    int c;
    if (!next_byte(j, &c)) return false;
    if (c != '\\') return json_fail(j, "unexpected end of hex escape");
    if (!next_byte(j, &c)) return false;
    if (c != 'u') return json_fail(j, "unexpected end of hex escape");
    uint32_t n2;
    if (!hex_escape(j, &n2)) return false;
    if (n2 < 0xdc00 || n2 > 0xdfff) return json_fail(j, "lone leading surrogate in hex escape");
    push_utf8(j->a, b, (((n - 0xd800) << 10) | (n2 - 0xdc00)) + 0x10000);
    return true;
}

bool json_string(json *j, str *out) {
    j->i++;
    size_t start = j->i;
    bytes b = {0};
    bool escaped = false;
    for (;;) {
        if (j->i >= j->n) return json_fail(j, "EOF while parsing a string");
        unsigned char c = j->s[j->i];
        if (c == '"') {
            const char *text = (const char *)j->s + start;
            size_t len = j->i - start;
            if (escaped) {
                for (size_t k = 0; k < len; k++) VEC_PUSH(j->a, b, text[k]);
                text = b.v;
                len = b.n;
            }
            j->i++;
            if (!utf8_valid(text, len)) return json_fail(j, "invalid unicode code point");
            *out = (str){text, len};
            return true;
        }
        if (c < 0x20) {
            j->i++;
            return json_fail(j, "control character (\\u0000-\\u001F) found while parsing a string");
        }
        if (c != '\\') {
            j->i++;
            continue;
        }
        for (size_t k = start; k < j->i; k++) VEC_PUSH(j->a, b, (char)j->s[k]);
        escaped = true;
        j->i++;
        int e;
        if (!next_byte(j, &e)) return false;
        switch (e) {
        case '"': VEC_PUSH(j->a, b, '"'); break;
        case '\\': VEC_PUSH(j->a, b, '\\'); break;
        case '/': VEC_PUSH(j->a, b, '/'); break;
        case 'b': VEC_PUSH(j->a, b, '\b'); break;
        case 'f': VEC_PUSH(j->a, b, '\f'); break;
        case 'n': VEC_PUSH(j->a, b, '\n'); break;
        case 'r': VEC_PUSH(j->a, b, '\r'); break;
        case 't': VEC_PUSH(j->a, b, '\t'); break;
        case 'u':
            if (!unicode_escape(j, &b)) return false;
            break;
        default: return json_fail(j, "invalid escape");
        }
        start = j->i;
    }
}

// A string inside a skipped value: serde_json checks only control
// characters and the form of escapes there, not UTF-8 or surrogates.
static bool skip_string(json *j) {
    j->i++;
    for (;;) {
        if (j->i >= j->n) return json_fail(j, "EOF while parsing a string");
        unsigned char c = j->s[j->i];
        if (c == '"') {
            j->i++;
            return true;
        }
        if (c < 0x20) return json_fail(j, "control character (\\u0000-\\u001F) found while parsing a string");
        j->i++;
        if (c != '\\') continue;
        int e;
        if (!next_byte(j, &e)) return false;
        if (e == 'u') {
            uint32_t ignored;
            if (!hex_escape(j, &ignored)) return false;
        } else if (!strchr("\"\\/bfnrt", e) || e == 0) {
            return json_fail(j, "invalid escape");
        }
    }
}

static bool skip_number(json *j) {
    if (peek_raw(j) == '-') j->i++;
    if (j->i >= j->n) return json_fail(j, "invalid number");
    int c = j->s[j->i++];
    if (c == '0') {
        if (is_digit(peek_raw(j))) return json_fail(j, "invalid number");
    } else if (c >= '1' && c <= '9') {
        while (is_digit(peek_raw(j))) j->i++;
    } else {
        return json_fail(j, "invalid number");
    }
    if (peek_raw(j) == '.') {
        j->i++;
        if (!is_digit(peek_raw(j))) return json_fail(j, "invalid number");
        while (is_digit(peek_raw(j))) j->i++;
    }
    if (peek_raw(j) == 'e' || peek_raw(j) == 'E') {
        j->i++;
        if (peek_raw(j) == '+' || peek_raw(j) == '-') j->i++;
        if (!is_digit(peek_raw(j))) {
            if (j->i < j->n) j->i++;
            return json_fail(j, "invalid number");
        }
        while (is_digit(peek_raw(j))) j->i++;
    }
    return true;
}

// Iterative, like serde_json's ignore_value: skipped values have no depth
// limit, so recursion could exhaust the stack.
bool json_skip(json *j) {
    bytes stack = {0};
    for (;;) {
        int c = json_peek(j);
        bool opened = false;
        switch (c) {
        case -1: return json_fail(j, "EOF while parsing a value");
        case 'n':
            j->i++;
            if (!json_literal(j, "ull")) return false;
            break;
        case 't':
            j->i++;
            if (!json_literal(j, "rue")) return false;
            break;
        case 'f':
            j->i++;
            if (!json_literal(j, "alse")) return false;
            break;
        case '"':
            if (!skip_string(j)) return false;
            break;
        case '[':
        case '{':
            j->i++;
            VEC_PUSH(j->a, stack, (char)c);
            opened = true;
            break;
        default:
            if (c == '-' || is_digit(c)) {
                if (!skip_number(j)) return false;
                break;
            }
            return json_fail(j, "expected value");
        }
        // After a value (or an opening bracket): close what ends here, then
        // find where the next value starts.
        bool after_value = !opened;
        for (;;) {
            if (stack.n == 0) return true;
            char frame = stack.v[stack.n - 1];
            int p = json_peek(j);
            if (p == -1) return json_fail(j, frame == '[' ? "EOF while parsing a list" : "EOF while parsing an object");
            if ((p == ']' && frame == '[') || (p == '}' && frame == '{')) {
                j->i++;
                stack.n--;
                after_value = true;
                continue;
            }
            if (after_value) {
                if (p != ',') return json_fail(j, frame == '[' ? "expected `,` or `]`" : "expected `,` or `}`");
                j->i++;
            }
            break;
        }
        if (stack.v[stack.n - 1] == '{') {
            int p = json_peek(j);
            if (p == -1) return json_fail(j, "EOF while parsing an object");
            if (p != '"') return json_fail(j, "key must be a string");
            if (!skip_string(j)) return false;
            p = json_peek(j);
            if (p == -1) return json_fail(j, "EOF while parsing an object");
            if (p != ':') return json_fail(j, "expected `:`");
            j->i++;
        }
    }
}

bool json_enter(json *j) {
    j->depth -= 1;
    if (j->depth == 0) return json_fail(j, "recursion limit exceeded");
    j->i++;
    return true;
}

void json_leave(json *j) {
    j->depth += 1;
}

bool json_next_element(json *j, bool *first, bool *more) {
    int c = json_peek(j);
    if (c == -1) return json_fail(j, "EOF while parsing a list");
    if (c == ']') {
        *more = false;
        return true;
    }
    if (*first) {
        *first = false;
        *more = true;
        return true;
    }
    if (c != ',') return json_fail(j, "expected `,` or `]`");
    j->i++;
    c = json_peek(j);
    if (c == ']') return json_fail(j, "trailing comma");
    if (c == -1) return json_fail(j, "EOF while parsing a value");
    *more = true;
    return true;
}

bool json_end_array(json *j) {
    int c = json_peek(j);
    if (c == ']') {
        j->i++;
        return true;
    }
    return json_fail(j, c == -1 ? "EOF while parsing a list" : "trailing characters");
}

bool json_next_key(json *j, bool *first, bool *more, str *key) {
    int c = json_peek(j);
    if (c == -1) return json_fail(j, "EOF while parsing an object");
    if (c == '}') {
        *more = false;
        return true;
    }
    if (*first) {
        *first = false;
    } else {
        if (c != ',') return json_fail(j, "expected `,` or `}`");
        j->i++;
        c = json_peek(j);
        if (c == '}') return json_fail(j, "trailing comma");
        if (c == -1) return json_fail(j, "EOF while parsing a value");
    }
    if (c != '"') return json_fail(j, "key must be a string");
    if (!json_string(j, key)) return false;
    c = json_peek(j);
    if (c == -1) return json_fail(j, "EOF while parsing an object");
    if (c != ':') return json_fail(j, "expected `:`");
    j->i++;
    *more = true;
    return true;
}

bool json_end_object(json *j) {
    int c = json_peek(j);
    if (c == '}') {
        j->i++;
        return true;
    }
    return json_fail(j, c == -1 ? "EOF while parsing an object" : "trailing characters");
}

bool json_end(json *j) {
    if (json_peek(j) != -1) return json_fail(j, "trailing characters");
    return true;
}

bool json_data_error(json *j, str *error, const char *fmt, ...) {
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
    if (!error->p) *error = arena_str(j->a, buf, (size_t)n);
    return json_fail(j, "data error");
}

bool json_skip_array(json *j) {
    if (!json_enter(j)) return false;
    bool first = true, more;
    for (;;) {
        if (!json_next_element(j, &first, &more)) return false;
        if (!more) break;
        if (!json_skip(j)) return false;
    }
    json_leave(j);
    return json_end_array(j);
}

bool json_skip_object(json *j) {
    if (!json_enter(j)) return false;
    bool first = true, more;
    str key;
    for (;;) {
        if (!json_next_key(j, &first, &more, &key)) return false;
        if (!more) break;
        if (!json_skip(j)) return false;
    }
    json_leave(j);
    return json_end_object(j);
}
