/* malloc+free pairs of one size, the cost a preloaded allocator's free
 * pays for finding a block's size, and (where the allocator exports C23's
 * free_sized) the same pairs freed with their size.
 *
 *   pairs SIZE MILLIONS    prints: pair_ns=.. sized_ns=..  (sized_ns=- without free_sized) */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

void free_sized(void *ptr, size_t size) __attribute__((weak));

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    size_t size = strtoul(argv[1], NULL, 10);
    long n = atol(argv[2]) * 1000000L;
    /* Each block is written, so neither the call nor the block is dead. */
    double t0 = now();
    for (long i = 0; i < n; i++) {
        char *volatile p = malloc(size);
        p[0] = (char)i;
        free(p);
    }
    double pair = (now() - t0) / n * 1e9;
    if (free_sized == NULL) {
        printf("pair_ns=%.2f sized_ns=-\n", pair);
        return 0;
    }
    t0 = now();
    for (long i = 0; i < n; i++) {
        char *volatile p = malloc(size);
        p[0] = (char)i;
        free_sized(p, size);
    }
    printf("pair_ns=%.2f sized_ns=%.2f\n", pair, (now() - t0) / n * 1e9);
    return 0;
}
