/* Shared by the C tests of libpercpu_alloc.so: checks that stop the
 * program with a message, block patterns, and the library's calls as weak
 * symbols, so a test run without the preload says so instead of linking
 * against nothing. */
#ifndef CHECK_H
#define CHECK_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond, ...)                                                    \
    do {                                                                    \
        if (!(cond)) {                                                      \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__,          \
                    __LINE__, #cond);                                       \
            fprintf(stderr, __VA_ARGS__);                                   \
            fputc('\n', stderr);                                            \
            _exit(1);                                                       \
        }                                                                   \
    } while (0)

#include <unistd.h>

#include "../include/percpu_alloc.h"

#ifdef __cplusplus
extern "C" {
#endif
void free_sized(void *ptr, size_t size) __attribute__((weak));
void free_aligned_sized(void *ptr, size_t align, size_t size) __attribute__((weak));
void percpu_alloc_signal_enter(void) __attribute__((weak));
void percpu_alloc_signal_leave(void) __attribute__((weak));
size_t percpu_alloc_trim(void) __attribute__((weak));
size_t percpu_alloc_cached_bytes(void) __attribute__((weak));
int percpu_alloc_rseq(void) __attribute__((weak));
void percpu_alloc_print_stats(void) __attribute__((weak));
size_t percpu_alloc_stats(struct percpu_alloc_stats *out, size_t size) __attribute__((weak));
#ifdef __cplusplus
}
#endif

/* Stops unless libpercpu_alloc.so serves this process on the path that
 * PERCPU_EXPECT_PATH (rseq or fallback) names, if set. */
static void check_preloaded(void) {
    CHECK(percpu_alloc_rseq != NULL, "libpercpu_alloc.so is not loaded (LD_PRELOAD?)");
    const char *want = getenv("PERCPU_EXPECT_PATH");
    if (want != NULL && *want != '\0') {
        const char *have = percpu_alloc_rseq() ? "rseq" : "fallback";
        CHECK(strcmp(want, have) == 0, "expected the %s path, running on %s", want, have);
    }
}

/* The byte a block of `seed` holds at `i`. */
static inline unsigned char pattern(uintptr_t seed, size_t i) {
    return (unsigned char)((seed * 0x9E3779B97F4A7C15ull + i * 131u) >> 24);
}

static inline void fill(unsigned char *p, size_t n, uintptr_t seed) {
    for (size_t i = 0; i < n; i++) p[i] = pattern(seed, i);
}

static inline int holds(const unsigned char *p, size_t n, uintptr_t seed) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != pattern(seed, i)) return 0;
    return 1;
}

/* A small xorshift generator, one per thread. */
static inline uint64_t next_random(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

#endif
