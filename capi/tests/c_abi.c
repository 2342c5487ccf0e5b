/* Every exported allocation function, its edge cases and errno, as glibc
 * documents them; run under LD_PRELOAD=libpercpu_alloc.so. */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

static int aligned(const void *p, size_t align) { return ((uintptr_t)p & (align - 1)) == 0; }

/* `x`, hidden from the compiler, which would otherwise fold or warn about
 * the impossible sizes these tests ask for. */
static size_t opaque(size_t x) {
    __asm__ volatile("" : "+r"(x));
    return x;
}

/* Sizes across every cached class and past them. */
static const size_t SIZES[] = {0,   1,    7,    8,    9,    15,   16,   17,   24,    31,
                               32,  48,   63,   64,   100,  128,  200,  256,  511,   512,
                               700, 1000, 1024, 1025, 2000, 4096, 8192, 14336, 65536, 1 << 20};
#define NSIZES (sizeof SIZES / sizeof SIZES[0])

static void test_malloc_and_usable_size(void) {
    void *a = malloc(0), *b = malloc(0);
    CHECK(a != NULL && b != NULL && a != b, "malloc(0) gives unique blocks: %p %p", a, b);
    free(a);
    free(b);
    for (size_t i = 0; i < NSIZES; i++) {
        size_t n = SIZES[i];
        unsigned char *p = malloc(n);
        CHECK(p != NULL, "malloc(%zu)", n);
        if (n >= 16) CHECK(aligned(p, 16), "malloc(%zu) = %p is 16-aligned", n, (void *)p);
        size_t usable = malloc_usable_size(p);
        CHECK(usable >= n, "malloc_usable_size %zu >= %zu", usable, n);
        fill(p, usable, (uintptr_t)p); /* the whole usable size is writable */
        CHECK(holds(p, usable, (uintptr_t)p), "pattern of %zu", n);
        free(p);
    }
    CHECK(malloc_usable_size(NULL) == 0, "malloc_usable_size(NULL)");
    free(NULL);
    errno = 0;
    CHECK(malloc(opaque(SIZE_MAX)) == NULL && errno == ENOMEM, "malloc(opaque(SIZE_MAX)): errno %d", errno);
    errno = 0;
    CHECK(malloc(opaque(SIZE_MAX / 2)) == NULL && errno == ENOMEM, "malloc(SIZE_MAX/2)");
}

static void test_calloc(void) {
    for (size_t i = 0; i < NSIZES; i++) {
        size_t n = SIZES[i];
        /* A dirty block of the class first, so a cached one comes back. */
        unsigned char *d = malloc(n);
        CHECK(d != NULL, "malloc");
        memset(d, 0xA5, malloc_usable_size(d));
        free(d);
        unsigned char *p = calloc(1, n);
        CHECK(p != NULL, "calloc(1, %zu)", n);
        for (size_t j = 0; j < n; j++) CHECK(p[j] == 0, "calloc(1, %zu)[%zu] = %d", n, j, p[j]);
        free(p);
    }
    unsigned char *p = calloc(100, 24);
    CHECK(p != NULL, "calloc(100, 24)");
    for (size_t j = 0; j < 2400; j++) CHECK(p[j] == 0, "calloc zeroed");
    free(p);
    errno = 0;
    CHECK(calloc(opaque(SIZE_MAX / 2), 3) == NULL && errno == ENOMEM, "calloc overflow: errno %d", errno);
    errno = 0;
    CHECK(calloc(opaque((size_t)1 << 33), (size_t)1 << 33) == NULL && errno == ENOMEM, "calloc overflow");
    void *z = calloc(0, 10);
    CHECK(z != NULL, "calloc(0, 10) is a unique block");
    free(z);
}

static void test_realloc(void) {
    unsigned char *p = realloc(NULL, 40);
    CHECK(p != NULL, "realloc(NULL, 40) is malloc");
    fill(p, 40, 7);
    /* Grow through every size, then shrink: the kept prefix survives. */
    size_t have = 40;
    for (size_t i = 0; i < NSIZES; i++) {
        size_t n = SIZES[i];
        if (n == 0) continue;
        unsigned char *q = realloc(p, n);
        CHECK(q != NULL, "realloc to %zu", n);
        size_t keep = have < n ? have : n;
        CHECK(holds(q, keep, 7), "realloc to %zu keeps %zu bytes", n, keep);
        fill(q, n, 7);
        p = q;
        have = n;
    }
    for (size_t i = NSIZES; i-- > 1;) {
        size_t n = SIZES[i];
        unsigned char *q = realloc(p, n);
        CHECK(q != NULL && holds(q, n, 7), "shrink to %zu", n);
        p = q;
    }
    errno = 0;
    CHECK(realloc(p, opaque(SIZE_MAX / 2)) == NULL && errno == ENOMEM, "realloc too big: errno %d", errno);
    CHECK(holds(p, 1, 7), "a failed realloc leaves the block");
    /* glibc: realloc(p, 0) frees p and returns NULL. */
    CHECK(realloc(p, 0) == NULL, "realloc(p, 0)");

    p = malloc(10);
    fill(p, 10, 3);
    errno = 0;
    CHECK(reallocarray(p, opaque(SIZE_MAX / 4), 8) == NULL && errno == ENOMEM, "reallocarray overflow");
    CHECK(holds(p, 10, 3), "reallocarray overflow leaves the block");
    unsigned char *q = reallocarray(p, 100, 30);
    CHECK(q != NULL && holds(q, 10, 3) && malloc_usable_size(q) >= 3000, "reallocarray");
    free(q);
}

static void test_aligned(void) {
    void *p;
    int saved;
    errno = 0;
    CHECK(posix_memalign(&p, 3, 10) == EINVAL, "posix_memalign align 3");
    CHECK(posix_memalign(&p, 4, 10) == EINVAL, "posix_memalign align 4 (< sizeof(void *))");
    CHECK(posix_memalign(&p, 0, 10) == EINVAL, "posix_memalign align 0");
    CHECK(posix_memalign(&p, 24, 10) == EINVAL, "posix_memalign align 24");
    CHECK(errno == 0, "posix_memalign leaves errno alone: %d", errno);
    for (size_t align = sizeof(void *); align <= ((size_t)1 << 22); align <<= 1) {
        for (size_t i = 0; i < NSIZES; i++) {
            size_t n = SIZES[i];
            if (n > 65536 && align > 4096) continue;
            p = NULL;
            CHECK(posix_memalign(&p, align, n) == 0, "posix_memalign(%zu, %zu)", align, n);
            CHECK(p != NULL && aligned(p, align), "posix_memalign(%zu, %zu) = %p", align, n, p);
            CHECK(malloc_usable_size(p) >= n, "usable size");
            fill(p, n, align + n);
            CHECK(holds(p, n, align + n), "pattern");
            free(p);
        }
    }
    void *untouched = (void *)0x1;
    p = untouched;
    CHECK(posix_memalign(&p, 64, opaque(SIZE_MAX / 2)) == ENOMEM && p == untouched,
          "posix_memalign too big: ENOMEM, *out untouched");

    errno = 0;
    CHECK(aligned_alloc(3, 9) == NULL && errno == EINVAL, "aligned_alloc align 3: errno %d", errno);
    for (size_t align = 1; align <= 65536; align <<= 1) {
        unsigned char *a = aligned_alloc(align, 3 * align);
        CHECK(a != NULL && aligned(a, align), "aligned_alloc(%zu)", align);
        fill(a, 3 * align, align);
        if (align % 2 == 0 && free_aligned_sized) {
            free_aligned_sized(a, align, 3 * align);
        } else {
            free(a);
        }
    }

    /* memalign rounds an alignment that is not a power of two up. */
    unsigned char *m = memalign(24, 100);
    CHECK(m != NULL && aligned(m, 32), "memalign(24) = %p", (void *)m);
    free(m);
    m = memalign(16, 8);
    CHECK(m != NULL && aligned(m, 16), "memalign(16, 8) = %p", (void *)m);
    free(m);
    errno = 0;
    CHECK(memalign(opaque(SIZE_MAX), 8) == NULL && errno == EINVAL, "memalign(SIZE_MAX): errno %d", errno);

    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    m = valloc(100);
    CHECK(m != NULL && aligned(m, page), "valloc");
    fill(m, 100, 1);
    free(m);
    m = pvalloc(page + 1);
    CHECK(m != NULL && aligned(m, page) && malloc_usable_size(m) >= 2 * page, "pvalloc rounds up");
    fill(m, 2 * page, 2);
    free(m);
    saved = errno = 0;
    CHECK(pvalloc(opaque(SIZE_MAX - 10)) == NULL && errno == ENOMEM, "pvalloc overflow");
    (void)saved;
}

static void test_sized_frees(void) {
    CHECK(free_sized != NULL && free_aligned_sized != NULL, "the C23 frees are exported");
    for (size_t i = 0; i < NSIZES; i++) {
        size_t n = SIZES[i];
        void *p = malloc(n);
        CHECK(p != NULL, "malloc");
        free_sized(p, n);
        p = calloc(3, n);
        CHECK(p != NULL, "calloc");
        free_sized(p, 3 * n);
    }
    free_sized(NULL, 10);
    free_aligned_sized(NULL, 64, 64);
}

static void test_cache_is_ours(void) {
    /* Pinned, so the block freed is on this CPU's list when it allocates. */
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(sched_getcpu(), &one);
    CHECK(sched_setaffinity(0, sizeof one, &one) == 0, "pin");
    CHECK(percpu_alloc_trim != NULL, "trim exported");
    percpu_alloc_trim();
    CHECK(percpu_alloc_cached_bytes() == 0, "nothing cached after a trim");
    void *p = malloc(64);
    uintptr_t was = (uintptr_t)p;
    free(p);
    CHECK(percpu_alloc_cached_bytes() >= 64, "a freed 64-byte block is cached: %zu",
          percpu_alloc_cached_bytes());
    p = malloc(64);
    CHECK((uintptr_t)p == was, "and handed out again");
    free(p);
    CHECK(percpu_alloc_trim() >= 64, "trim releases it");
}

/* Before main, and before anything else in the program has allocated:
 * the first malloc makes the per-CPU table. */
static void *early;

__attribute__((constructor(101))) static void allocate_early(void) {
    early = malloc(100);
    if (early != NULL) fill(early, 100, 100);
}

/* Pages move between jemalloc's extents: once small blocks are back with
 * jemalloc, their pages may start large blocks. The library knows a
 * block's class by its page, so a large block freed there must not be
 * taken for one of the old class: nothing may be cached after large
 * blocks alone were freed. */
static void test_pages_change_hands(void) {
    enum { SMALL = 20000, LARGE = 200 };
    static void *blocks[SMALL];
    for (int round = 0; round < 5; round++) {
        for (int i = 0; i < SMALL; i++) blocks[i] = malloc(48 + (size_t)(round % 3) * 16);
        for (int i = 0; i < SMALL; i++) free(blocks[i]);
        percpu_alloc_trim();
        for (int i = 0; i < LARGE; i++) {
            size_t n = 16384 + (size_t)i * 512;
            blocks[i] = malloc(n);
            CHECK(blocks[i] != NULL, "large malloc");
            fill(blocks[i], n, (uintptr_t)i);
            CHECK(malloc_usable_size(blocks[i]) >= n, "large usable size");
        }
        for (int i = 0; i < LARGE; i++) {
            CHECK(holds(blocks[i], 16384 + (size_t)i * 512, (uintptr_t)i), "large block");
            free(blocks[i]);
        }
        CHECK(percpu_alloc_cached_bytes() == 0,
              "large frees were taken for cached blocks: %zu bytes cached",
              percpu_alloc_cached_bytes());
    }
}

/* After test_cache_is_ours: pinned, and the caches empty. */
static void test_stats(void) {
    CHECK(percpu_alloc_stats != NULL, "stats exported");
    struct percpu_alloc_stats s;
    CHECK(percpu_alloc_stats(NULL, 0) == sizeof s, "the library's struct is this header's");
    void *p[100];
    for (int i = 0; i < 100; i++) p[i] = malloc(64);
    for (int i = 0; i < 100; i++) free(p[i]);
    memset(&s, 0xab, sizeof s);
    CHECK(percpu_alloc_stats(&s, sizeof s) == sizeof s, "filled");
    CHECK(s.rseq == percpu_alloc_rseq(), "rseq %d", s.rseq);
    CHECK(s.cpus >= 1 && s.cpus < 65536, "cpus %zu", s.cpus);
    CHECK(s.cached_blocks >= 100 && s.cached_bytes >= 6400,
          "100 freed 64-byte blocks are cached: %llu blocks, %llu bytes",
          (unsigned long long)s.cached_blocks, (unsigned long long)s.cached_bytes);
    CHECK(s.cached_bytes == percpu_alloc_cached_bytes(), "cached bytes agree");
    if (s.counting) {
        CHECK(s.frees_task >= 100, "frees counted: %llu", (unsigned long long)s.frees_task);
    } else {
        CHECK(s.counting == 0 && s.hits == 0 && s.misses == 0 && s.frees_task == 0,
              "no `stats` feature: the counters read 0");
    }
    /* A caller with room for the first two fields gets only those. */
    memset(&s, 0xab, sizeof s);
    percpu_alloc_stats(&s, offsetof(struct percpu_alloc_stats, cpus));
    CHECK(s.rseq == percpu_alloc_rseq(), "a short copy still has rseq");
    unsigned char *rest = (unsigned char *)&s + offsetof(struct percpu_alloc_stats, cpus);
    for (size_t i = 0; i < sizeof s - offsetof(struct percpu_alloc_stats, cpus); i++)
        CHECK(rest[i] == 0xab, "byte %zu past the size asked for was written", i);
    percpu_alloc_trim();
}

int main(void) {
    check_preloaded();
    CHECK(early != NULL && holds(early, 100, 100), "a block allocated before main");
    free(early);
    test_malloc_and_usable_size();
    test_calloc();
    test_realloc();
    test_aligned();
    test_sized_frees();
    test_pages_change_hands();
    test_cache_is_ours();
    test_stats();
    printf("ok: c_abi (%s path)\n", percpu_alloc_rseq() ? "rseq" : "fallback");
    return 0;
}
