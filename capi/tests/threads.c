/* Threads that allocate, fill and hand blocks to each other through a
 * queue: every block is freed by another thread than the one that made
 * it, after its pattern is checked. Then a trim must leave nothing. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#include "check.h"

#define THREADS 8
#define ROUNDS 200000
#define SLOTS 1024

struct queue {
    pthread_mutex_t lock;
    unsigned char *block[SLOTS];
    size_t size[SLOTS];
    uintptr_t seed[SLOTS];
};

static struct queue queues[THREADS];

/* Thread exit: a thread-specific value freed by its destructor, after the
 * thread's own code is done, while glibc tears the thread down. */
static pthread_key_t at_exit_key;

static void free_at_exit(void *p) {
    CHECK(holds(p, 300, 11), "the thread-exit block");
    free(p);
}

static void *worker(void *arg) {
    size_t me = (size_t)arg;
    unsigned char *last = malloc(300);
    CHECK(last != NULL, "malloc");
    fill(last, 300, 11);
    pthread_setspecific(at_exit_key, last);
    uint64_t rng = 0x1234567 + me * 7919;
    for (size_t r = 0; r < ROUNDS; r++) {
        uint64_t x = next_random(&rng);
        size_t size = (x & 7) ? (x >> 8) % 512 : (x >> 8) % 20000;
        unsigned char *p = (x & 16) ? calloc(1, size) : malloc(size);
        CHECK(p != NULL, "alloc %zu", size);
        if (x & 16)
            for (size_t i = 0; i < size; i++) CHECK(p[i] == 0, "calloc zeroed");
        uintptr_t seed = (uintptr_t)p ^ r;
        fill(p, size, seed);
        /* Swap it into a random slot of a random other thread's queue and
         * free what was there. */
        struct queue *q = &queues[(me + 1 + (x >> 40) % (THREADS - 1)) % THREADS];
        size_t slot = (x >> 20) % SLOTS;
        pthread_mutex_lock(&q->lock);
        unsigned char *old = q->block[slot];
        size_t old_size = q->size[slot];
        uintptr_t old_seed = q->seed[slot];
        q->block[slot] = p;
        q->size[slot] = size;
        q->seed[slot] = seed;
        pthread_mutex_unlock(&q->lock);
        if (old != NULL) {
            CHECK(holds(old, old_size, old_seed), "a block of %zu bytes changed in flight", old_size);
            if (x & 32) {
                unsigned char *grown = realloc(old, old_size + 100);
                CHECK(grown != NULL && holds(grown, old_size, old_seed), "realloc keeps content");
                old = grown;
            }
            free(old);
        }
    }
    return NULL;
}

int main(void) {
    check_preloaded();
    pthread_t t[THREADS];
    CHECK(pthread_key_create(&at_exit_key, free_at_exit) == 0, "pthread_key_create");
    for (size_t i = 0; i < THREADS; i++) pthread_mutex_init(&queues[i].lock, NULL);
    for (size_t i = 0; i < THREADS; i++)
        CHECK(pthread_create(&t[i], NULL, worker, (void *)i) == 0, "pthread_create");
    for (size_t i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    for (size_t i = 0; i < THREADS; i++)
        for (size_t s = 0; s < SLOTS; s++)
            if (queues[i].block[s] != NULL) {
                CHECK(holds(queues[i].block[s], queues[i].size[s], queues[i].seed[s]), "left block");
                free(queues[i].block[s]);
            }
    percpu_alloc_trim();
    CHECK(percpu_alloc_cached_bytes() == 0, "a trim after the threads leaves nothing: %zu",
          percpu_alloc_cached_bytes());
    printf("ok: threads\n");
    return 0;
}
