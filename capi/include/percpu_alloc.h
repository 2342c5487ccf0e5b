/* percpu-alloc's C interface, beside the malloc family that
 * libpercpu_alloc.so (or a Rust binary built with the `override` feature)
 * exports. */
#ifndef PERCPU_ALLOC_H
#define PERCPU_ALLOC_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* C23's sized frees, which glibc before 2.41 does not declare. `size` is
 * what malloc, calloc (the product) or realloc was asked for; `align` and
 * `size` those of aligned_alloc. */
void free_sized(void *ptr, size_t size);
void free_aligned_sized(void *ptr, size_t align, size_t size);

/* Marks the calling thread as in signal context until the matching leave:
 * a signal handler that frees memory brackets its body with them, and its
 * frees then never call into jemalloc (which is not async-signal-safe).
 * Async-signal-safe; pairs nest. A malloc inside a handler that misses the
 * cache calls jemalloc, as any malloc would. */
void percpu_alloc_signal_enter(void);
void percpu_alloc_signal_leave(void);

/* Gives every cached block back to jemalloc, from every CPU; returns the
 * bytes released. Safe while other threads allocate. */
size_t percpu_alloc_trim(void);

/* The bytes the per-CPU caches hold now. */
size_t percpu_alloc_cached_bytes(void);

/* 1 when the caches run on restartable sequences, 0 on the try-lock
 * fallback. */
int percpu_alloc_rseq(void);

/* Writes the statistics table to standard error, without allocating. */
void percpu_alloc_print_stats(void);

#ifdef __cplusplus
}
#endif

#endif
