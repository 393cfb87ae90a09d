#include "util.h"

#include <stdlib.h>
#include <string.h>

struct arena_block {
    arena_block *next;
    size_t cap;
    size_t used;
    _Alignas(max_align_t) unsigned char data[];
};

enum { ARENA_BLOCK = 64 * 1024 };

void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) __builtin_trap();
    return p;
}

void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) __builtin_trap();
    return q;
}

void *arena_alloc(arena *a, size_t n) {
    n = (n + 15) & ~(size_t)15;
    arena_block *b = a->head;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > ARENA_BLOCK ? n : ARENA_BLOCK;
        b = xmalloc(sizeof(arena_block) + cap);
        b->cap = cap;
        b->used = 0;
        b->next = a->head;
        a->head = b;
    }
    void *p = b->data + b->used;
    b->used += n;
    return p;
}

void arena_free(arena *a) {
    arena_block *b = a->head;
    while (b) {
        arena_block *next = b->next;
        free(b);
        b = next;
    }
    a->head = NULL;
}

str arena_str(arena *a, const char *p, size_t n) {
    char *q = arena_alloc(a, n);
    if (n) memcpy(q, p, n);
    return (str){q, n};
}

void *arena_grow(arena *a, void *items, size_t *cap, size_t len, size_t elem) {
    size_t new_cap = *cap ? *cap * 2 : 8;
    void *p = arena_alloc(a, new_cap * elem);
    if (len) memcpy(p, items, len * elem);
    *cap = new_cap;
    return p;
}

bool str_eq(str a, str b) {
    return a.n == b.n && (a.n == 0 || memcmp(a.p, b.p, a.n) == 0);
}

bool str_eq_c(str a, const char *c) {
    return str_eq(a, (str){c, strlen(c)});
}

uint64_t hash_bytes(const void *p, size_t n, uint64_t seed) {
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ull ^ seed;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static bool is_white_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0d) || c == 0x20 || c == 0x85 || c == 0xa0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 ||
           c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

// Decodes the character that starts at p[i] of valid UTF-8; sets its length.
static uint32_t decode_at(const unsigned char *p, size_t i, size_t *len) {
    unsigned char c = p[i];
    if (c < 0x80) {
        *len = 1;
        return c;
    }
    if (c < 0xe0) {
        *len = 2;
        return ((uint32_t)(c & 0x1f) << 6) | (p[i + 1] & 0x3f);
    }
    if (c < 0xf0) {
        *len = 3;
        return ((uint32_t)(c & 0x0f) << 12) | ((uint32_t)(p[i + 1] & 0x3f) << 6) |
               (p[i + 2] & 0x3f);
    }
    *len = 4;
    return ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(p[i + 1] & 0x3f) << 12) |
           ((uint32_t)(p[i + 2] & 0x3f) << 6) | (p[i + 3] & 0x3f);
}

str str_trim(str s) {
    const unsigned char *p = (const unsigned char *)s.p;
    size_t start = 0, end = s.n;
    while (start < end) {
        size_t len;
        if (!is_white_space(decode_at(p, start, &len))) break;
        start += len;
    }
    while (end > start) {
        size_t i = end - 1;
        while (i > start && (p[i] & 0xc0) == 0x80) i--;
        size_t len;
        if (!is_white_space(decode_at(p, i, &len))) break;
        end = i;
    }
    return (str){s.p + start, end - start};
}

bool utf8_valid(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        unsigned char c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        unsigned char lo = 0x80, hi = 0xbf;
        if (c >= 0xc2 && c <= 0xdf) {
            need = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            need = 2;
            if (c == 0xe0) lo = 0xa0;
            if (c == 0xed) hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            need = 3;
            if (c == 0xf0) lo = 0x90;
            if (c == 0xf4) hi = 0x8f;
        } else {
            return false;
        }
        if (n - i - 1 < need) return false;
        if (p[i + 1] < lo || p[i + 1] > hi) return false;
        for (size_t k = 2; k <= need; k++)
            if ((p[i + k] & 0xc0) != 0x80) return false;
        i += need + 1;
    }
    return true;
}

int64_t f64_to_i64(double f) {
    if (f != f) return 0;
    if (f >= 9223372036854775808.0) return INT64_MAX;
    if (f <= -9223372036854775808.0) return INT64_MIN;
    return (int64_t)f;
}
