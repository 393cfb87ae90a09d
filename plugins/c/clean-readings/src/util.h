// Memory, strings and small containers shared by the plugin's modules.
#ifndef CLEAN_READINGS_UTIL_H
#define CLEAN_READINGS_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

// Borrowed bytes (UTF-8 text unless said otherwise), not NUL-terminated.
typedef struct {
    const char *p;
    size_t n;
} str;

#define STR_LIT(s) ((str){(s), sizeof(s) - 1})

// Everything one call allocates for its own use goes into an arena, freed in
// one go when the call returns: the parse keeps many small pieces whose
// lifetimes all end together.
typedef struct arena_block arena_block;
typedef struct {
    arena_block *head;
} arena;

void *arena_alloc(arena *a, size_t n);
void arena_free(arena *a);
str arena_str(arena *a, const char *p, size_t n);

// Growable array in an arena: old storage stays in the arena until it is freed.
void *arena_grow(arena *a, void *items, size_t *cap, size_t len, size_t elem);
#define VEC(T)      \
    struct {        \
        T *v;       \
        size_t n;   \
        size_t cap; \
    }
#define VEC_PUSH(a, vec, item)                                                  \
    do {                                                                        \
        if ((vec).n == (vec).cap)                                               \
            (vec).v = arena_grow((a), (vec).v, &(vec).cap, (vec).n, sizeof(*(vec).v)); \
        (vec).v[(vec).n++] = (item);                                            \
    } while (0)

// malloc that traps instead of returning NULL: the plugin cannot continue
// without the memory, and the host reports a trap as a fault.
void *xmalloc(size_t n);
void *xrealloc(void *p, size_t n);

bool str_eq(str a, str b);
bool str_eq_c(str a, const char *c);
uint64_t hash_bytes(const void *p, size_t n, uint64_t seed);

// Rust's `str::trim`: strips Unicode White_Space from both ends of valid UTF-8.
str str_trim(str s);

// Rust's `str::from_utf8` acceptance: well-formed UTF-8, no surrogates or
// overlong forms.
bool utf8_valid(const char *p, size_t n);

// Rust's saturating `f64 as i64`.
int64_t f64_to_i64(double f);

#endif
