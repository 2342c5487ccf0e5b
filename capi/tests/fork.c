/* fork() while other threads churn through malloc and free: each child
 * must find its copy of the parent's blocks intact, allocate, free, trim
 * and exit, in time. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/wait.h>

#include "check.h"

#define CHURNERS 3
#define FORKS 40
#define KEEP 200

static atomic_int stop;

static void *churn(void *arg) {
    uint64_t rng = 99 + (uintptr_t)arg;
    unsigned char *held[64] = {0};
    size_t sizes[64] = {0};
    while (!atomic_load(&stop)) {
        uint64_t x = next_random(&rng);
        size_t i = x % 64;
        if (held[i]) {
            CHECK(holds(held[i], sizes[i], (uintptr_t)held[i]), "churn block");
            free(held[i]);
        }
        sizes[i] = (x >> 8) % 3000;
        held[i] = malloc(sizes[i]);
        CHECK(held[i] != NULL, "churn malloc");
        fill(held[i], sizes[i], (uintptr_t)held[i]);
    }
    for (size_t i = 0; i < 64; i++) free(held[i]);
    return NULL;
}

int main(void) {
    check_preloaded();
    unsigned char *keep[KEEP];
    for (size_t i = 0; i < KEEP; i++) {
        keep[i] = malloc(i * 13);
        fill(keep[i], i * 13, i);
    }
    pthread_t t[CHURNERS];
    for (size_t i = 0; i < CHURNERS; i++) pthread_create(&t[i], NULL, churn, (void *)i);
    for (int f = 0; f < FORKS; f++) {
        usleep(2000 + f * 100);
        pid_t pid = fork();
        CHECK(pid >= 0, "fork");
        if (pid == 0) {
            alarm(10); /* a child that deadlocks dies of SIGALRM */
            for (size_t i = 0; i < KEEP; i++) {
                CHECK(holds(keep[i], i * 13, i), "the child's copy of block %zu", i);
                free(keep[i]);
            }
            void *mine[500];
            for (int i = 0; i < 500; i++) {
                mine[i] = malloc((size_t)i * 7);
                CHECK(mine[i] != NULL, "child malloc");
                fill(mine[i], (size_t)i * 7, (uintptr_t)i);
            }
            for (int i = 0; i < 500; i++) {
                CHECK(holds(mine[i], (size_t)i * 7, (uintptr_t)i), "child block");
                free(mine[i]);
            }
            percpu_alloc_trim();
            CHECK(percpu_alloc_cached_bytes() == 0, "the child trims everything");
            _exit(0);
        }
        int status;
        CHECK(waitpid(pid, &status, 0) == pid, "waitpid");
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child %d: status %#x", f, status);
    }
    atomic_store(&stop, 1);
    for (size_t i = 0; i < CHURNERS; i++) pthread_join(t[i], NULL);
    for (size_t i = 0; i < KEEP; i++) {
        CHECK(holds(keep[i], i * 13, i), "the parent's block %zu", i);
        free(keep[i]);
    }
    printf("ok: fork (%d children)\n", FORKS);
    return 0;
}
