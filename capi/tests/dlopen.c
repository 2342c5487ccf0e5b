/* Under LD_PRELOAD=libpercpu_alloc.so, a program dlopens a library that
 * needs static TLS (initial-exec) and allocates through it: the preloaded
 * library's own TLS was placed at start-up, so it takes nothing from the
 * surplus that dlopen draws on. Then it dlopens libpercpu_alloc.so by its
 * path, which must give back the preloaded copy, not a second one. */
#define _GNU_SOURCE
#include <dlfcn.h>

#include "check.h"

int main(int argc, char **argv) {
    check_preloaded();
    CHECK(argc == 3, "usage: dlopen TLS_LIB LIBPERCPU_ALLOC");
    void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    CHECK(h != NULL, "dlopen %s: %s", argv[1], dlerror());
    int (*work)(int) = (int (*)(int))dlsym(h, "tls_lib_work");
    CHECK(work != NULL, "dlsym");
    CHECK(work(10000) != -1, "the library allocates");
    CHECK(dlclose(h) == 0, "dlclose");
    void *self = dlopen(argv[2], RTLD_NOW | RTLD_NOLOAD);
    CHECK(self != NULL, "libpercpu_alloc.so is the loaded one: %s", dlerror());
    int (*rseq)(void) = (int (*)(void))dlsym(self, "percpu_alloc_rseq");
    CHECK(rseq == percpu_alloc_rseq, "one copy of the library");
    printf("ok: dlopen\n");
    return 0;
}
