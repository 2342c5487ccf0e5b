// C++'s new and delete through libpercpu_alloc.so: the library's own
// operators, plain, array, sized (-fsized-deallocation) and over-aligned
// forms, what a failed new does, and the standard containers under churn.
#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "check.h"

struct alignas(64) Line {
    unsigned char bytes[64];
};

struct alignas(4096) Page {
    unsigned char bytes[100];
};

// The twenty replaceable operators, by symbol: each must be the library's.
static const char *const operators[] = {
    "_Znwm", "_Znam", "_ZnwmRKSt9nothrow_t", "_ZnamRKSt9nothrow_t",
    "_ZnwmSt11align_val_t", "_ZnamSt11align_val_t",
    "_ZnwmSt11align_val_tRKSt9nothrow_t", "_ZnamSt11align_val_tRKSt9nothrow_t",
    "_ZdlPv", "_ZdaPv", "_ZdlPvRKSt9nothrow_t", "_ZdaPvRKSt9nothrow_t",
    "_ZdlPvm", "_ZdaPvm", "_ZdlPvSt11align_val_t", "_ZdaPvSt11align_val_t",
    "_ZdlPvSt11align_val_tRKSt9nothrow_t", "_ZdaPvSt11align_val_tRKSt9nothrow_t",
    "_ZdlPvmSt11align_val_t", "_ZdaPvmSt11align_val_t",
};

static int handler_calls;

static void handler() {
    handler_calls++;
    std::set_new_handler(nullptr);  // the next failure throws
}

// A new the library cannot serve goes to libstdc++'s, which calls the
// new_handler while there is one, then throws or (nothrow) returns null.
static void test_failed_new() {
    static volatile std::size_t huge = std::size_t(1) << 62;
    bool thrown = false;
    try {
        char *p = new char[huge];
        p[0] = 1;
    } catch (const std::bad_alloc &) {
        thrown = true;
    }
    CHECK(thrown, "new of 2^62 bytes throws std::bad_alloc");
    CHECK(new (std::nothrow) char[huge] == nullptr, "nothrow new returns null");
    CHECK(::operator new(huge, std::align_val_t(64), std::nothrow) == nullptr,
          "aligned nothrow new returns null");
    thrown = false;
    std::set_new_handler(handler);
    try {
        void *p = ::operator new(huge);
        ::operator delete(p);
    } catch (const std::bad_alloc &) {
        thrown = true;
    }
    CHECK(handler_calls == 1 && thrown, "the new_handler ran once, then new threw (%d calls)",
          handler_calls);
}

int main() {
    check_preloaded();
    for (const char *name : operators) {
        Dl_info info;
        void *sym = dlsym(RTLD_DEFAULT, name);
        CHECK(sym != nullptr && dladdr(sym, &info) && info.dli_fname != nullptr &&
                  std::strstr(info.dli_fname, "libpercpu_alloc") != nullptr,
              "%s is libpercpu_alloc.so's (found in %s)", name,
              sym != nullptr && dladdr(sym, &info) ? info.dli_fname : "nothing");
    }
    test_failed_new();
    percpu_alloc_trim();
    // A freed small object is cached: new and delete reach the library.
    // (Through a volatile pointer: a new/delete pair may be elided.)
    static int *volatile probe;
    probe = new int(7);
    delete probe;
    CHECK(percpu_alloc_cached_bytes() > 0, "delete went to the cache");

    for (int round = 0; round < 20000; round++) {
        auto *one = new std::uint64_t(round);
        auto *many = new std::uint32_t[round % 300 + 1];
        for (int i = 0; i <= round % 300; i++) many[i] = round + i;
        CHECK(*one == (std::uint64_t)round, "new");
        for (int i = 0; i <= round % 300; i++) CHECK(many[i] == (std::uint32_t)(round + i), "new[]");
        delete one;  // sized delete with -fsized-deallocation
        delete[] many;
        auto *line = new Line;
        CHECK(reinterpret_cast<std::uintptr_t>(line) % 64 == 0, "aligned new(64)");
        line->bytes[63] = 1;
        delete line;
        auto *page = new Page;
        CHECK(reinterpret_cast<std::uintptr_t>(page) % 4096 == 0, "aligned new(4096)");
        page->bytes[99] = 1;
        delete page;
        void *raw = ::operator new(round % 2000 + 1, std::align_val_t(128));
        CHECK(reinterpret_cast<std::uintptr_t>(raw) % 128 == 0, "operator new(align 128)");
        ::operator delete(raw, round % 2000 + 1, std::align_val_t(128));
    }
    std::map<std::string, std::vector<int>> m;
    for (int i = 0; i < 50000; i++) {
        m[std::to_string(i % 977) + std::string(i % 50, 'x')].push_back(i);
        if (i % 3 == 0) m.erase(m.begin());
    }
    std::size_t total = 0;
    for (auto &kv : m) total += kv.second.size();
    CHECK(total > 0, "map churn");
    auto shared = std::make_shared<std::vector<std::string>>(1000, std::string(100, 'y'));
    CHECK((*shared)[999].size() == 100, "make_shared");
    shared.reset();
    m.clear();
    std::printf("ok: cxx (%zu entries)\n", total);
    return 0;
}
