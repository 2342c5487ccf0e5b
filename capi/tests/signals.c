/* Signal handlers that free: a timer interrupts the main thread inside
 * malloc and free many thousand times, and each handler frees prepared
 * blocks inside percpu_alloc_signal_enter/leave (past the cap, so some are
 * deferred). Patterns are checked throughout; at the end a trim must leave
 * nothing cached. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/time.h>

#include "check.h"

#define PREPARED 400
#define WANT 3000

static unsigned char *prepared[PREPARED];
static volatile sig_atomic_t next_prepared;
static atomic_int handled;

static void on_alarm(int sig) {
    (void)sig;
    percpu_alloc_signal_enter();
    /* Free a batch with the plain free (no size): in signal context the
     * library must not ask jemalloc for the block's size. */
    for (int i = 0; i < 8 && next_prepared > 0; i++) {
        unsigned char *p = prepared[--next_prepared];
        free(p);
    }
    percpu_alloc_signal_leave();
    atomic_fetch_add(&handled, 1);
}

static void prepare(void) {
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGALRM);
    sigprocmask(SIG_BLOCK, &block, &old);
    while (next_prepared < PREPARED) {
        unsigned char *p = malloc(64);
        CHECK(p != NULL, "malloc");
        fill(p, 64, 5);
        prepared[next_prepared++] = p;
    }
    sigprocmask(SIG_SETMASK, &old, NULL);
}

int main(void) {
    check_preloaded();
    struct sigaction sa = {0};
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval every = {{0, 200}, {0, 200}};
    setitimer(ITIMER_REAL, &every, NULL);
    uint64_t rng = 42;
    unsigned char *ring[256] = {0};
    size_t sizes[256] = {0};
    long rounds = 0;
    while (atomic_load(&handled) < WANT) {
        if (next_prepared < 16) prepare();
        uint64_t x = next_random(&rng);
        size_t i = x % 256;
        if (ring[i]) {
            CHECK(holds(ring[i], sizes[i], (uintptr_t)ring[i]), "main-loop block");
            free(ring[i]);
        }
        sizes[i] = 8 + (x >> 8) % 200;
        ring[i] = malloc(sizes[i]);
        CHECK(ring[i] != NULL, "malloc");
        fill(ring[i], sizes[i], (uintptr_t)ring[i]);
        rounds++;
        CHECK(rounds < 2000000000L, "too few signals");
    }
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    for (size_t i = 0; i < 256; i++) free(ring[i]);
    while (next_prepared > 0) free(prepared[--next_prepared]);
    percpu_alloc_trim();
    CHECK(percpu_alloc_cached_bytes() == 0, "a trim leaves nothing: %zu", percpu_alloc_cached_bytes());
    printf("ok: signals (%d handled over %ld allocations)\n", atomic_load(&handled), rounds);
    return 0;
}
