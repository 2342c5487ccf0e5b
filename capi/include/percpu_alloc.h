/* percpu-alloc's C interface, beside the malloc family that
 * libpercpu_alloc.so (or a Rust binary built with the `override` feature)
 * exports. */
#ifndef PERCPU_ALLOC_H
#define PERCPU_ALLOC_H

#include <stddef.h>
#include <stdint.h>

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

/* The process-wide figures of the caches. The event counters count only in
 * a library built with the `stats` feature (`counting` is then 1); without
 * it they read 0, and the cached figures are still exact. */
struct percpu_alloc_stats {
    int rseq;                 /* 1: restartable sequences; 0: the fallback */
    int counting;             /* 1: the counters below count */
    size_t cpus;              /* CPUs the caches cover */
    uint64_t cached_blocks;   /* blocks cached now, every CPU and class */
    uint64_t cached_bytes;    /* their bytes */
    uint64_t deferred_blocks; /* blocks waiting on deferred lists */
    uint64_t hits;            /* allocs served from a task list */
    uint64_t splices;         /* allocs that spliced a signal list */
    uint64_t misses;          /* allocs that went to jemalloc */
    uint64_t frees_task;      /* frees in task context */
    uint64_t frees_signal;    /* frees in signal context */
    uint64_t frees_other;     /* frees with no usable CPU: to jemalloc */
    uint64_t overflows;       /* task-context frees past the cap: to jemalloc */
    uint64_t deferred;        /* signal-context frees past the cap: deferred */
    uint64_t no_cpu;          /* operations that found no usable CPU */
};

/* Copies the first `size` bytes (at most the whole struct) of the figures
 * into `*out` and returns the size of the library's struct: pass
 * `sizeof *out`, and a library newer than this header fills the fields the
 * header knows. With `out` NULL it only returns the size. Reads every CPU's
 * records; does not allocate. */
size_t percpu_alloc_stats(struct percpu_alloc_stats *out, size_t size);

#ifdef __cplusplus
}
#endif

#endif
