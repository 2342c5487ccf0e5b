/* A library with initial-exec TLS, as some system libraries have, for
 * dlopen.c to load while libpercpu_alloc.so is preloaded. */
#include <stdlib.h>
#include <string.h>

static __thread char scratch[512] __attribute__((tls_model("initial-exec")));

int tls_lib_work(int n) {
    int sum = 0;
    for (int i = 0; i < n; i++) {
        char *p = malloc((size_t)(i % 700) + 1);
        if (p == NULL) return -1;
        memset(p, i, (size_t)(i % 700) + 1);
        scratch[i % 512] = p[0];
        sum += scratch[i % 512];
        free(p);
    }
    return sum;
}
