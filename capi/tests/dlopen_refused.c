/* Without the preload, dlopen of libpercpu_alloc.so into a running
 * program is refused by the loader: jemalloc inside it uses initial-exec
 * TLS, more than the static TLS surplus dlopen may draw on. That is the
 * safe outcome, as a malloc loaded late would be handed blocks of the
 * program's first malloc; the library is for LD_PRELOAD or linking. If a
 * loader ever accepts it, this check fails, so the question is looked at
 * again. */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (h != NULL) {
        fprintf(stderr, "dlopen of %s was accepted\n", argv[1]);
        return 1;
    }
    const char *why = dlerror();
    if (why == NULL || strstr(why, "static TLS") == NULL) {
        fprintf(stderr, "dlopen failed for another reason: %s\n", why ? why : "?");
        return 1;
    }
    printf("ok: dlopen of the library refused (%s)\n", why);
    return 0;
}
