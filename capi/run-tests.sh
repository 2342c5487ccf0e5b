#!/usr/bin/env bash
# The C ABI's tests: builds libpercpu_alloc.so (plain and `hardened`) and
# the C and C++ test programs, runs each under LD_PRELOAD on both per-CPU
# paths, then runs programs nobody here wrote, whose output must be the
# same as without the preload.
#
#   capi/run-tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

for tool in gcc g++; do
    if ! command -v "$tool" > /dev/null; then
        echo "capi tests: $tool is missing; they need gcc and g++ (Debian: apt-get install gcc g++)" >&2
        exit 1
    fi
done

# The `capi` profile: release with fat LTO (see Cargo.toml).
cargo build --profile capi --quiet -p percpu-alloc-capi
cargo build --profile capi --quiet -p percpu-alloc-capi --features hardened --target-dir target/capi-hardened
plain=$PWD/target/capi/libpercpu_alloc.so
hardened=$PWD/target/capi-hardened/capi/libpercpu_alloc.so

out=target/capi-tests
mkdir -p "$out"
cflags=(-O2 -Wall -Wextra -Werror -pthread)
for t in c_abi threads fork signals dlopen dlopen_refused; do
    gcc "${cflags[@]}" -o "$out/$t" "capi/tests/$t.c" -ldl
done
g++ "${cflags[@]}" -std=c++17 -fsized-deallocation -o "$out/cxx" capi/tests/cxx.cpp -ldl
gcc -O2 -fPIC -shared -o "$out/libtls_lib.so" capi/tests/tls_lib.c

# run LIB PATH PROGRAM [ARGS...]: PROGRAM under LD_PRELOAD=LIB on PATH.
run() {
    local lib=$1 path=$2
    shift 2
    if [ "$path" = fallback ]; then
        env GLIBC_TUNABLES=glibc.pthread.rseq=0 PERCPU_EXPECT_PATH=fallback LD_PRELOAD="$lib" timeout 300 "$@"
    else
        env PERCPU_EXPECT_PATH=rseq LD_PRELOAD="$lib" timeout 300 "$@"
    fi
}

for lib in "$plain" "$hardened"; do
    for path in rseq fallback; do
        if [ "$lib" = "$plain" ]; then build=plain; else build=hardened; fi
        echo "-- libpercpu_alloc.so ($build), $path path"
        for t in c_abi threads fork signals cxx; do
            run "$lib" "$path" "$out/$t"
        done
        run "$lib" "$path" "$out/dlopen" "$PWD/$out/libtls_lib.so" "$lib"
    done
done
"$out/dlopen_refused" "$plain"

# Programs nobody here wrote: their output under the preload must match
# their output without it, byte for byte.
echo "-- other programs, output compared with a run without the preload"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
awk 'BEGIN { for (i = 1; i <= 300000; i++) printf "%d %s line %d\n", (i * 7919) % 1000003, substr("abcdefghijklmnopqrstuvwxyz", i % 26 + 1), i }' > "$work/input"
cat > "$work/script.py" << 'PY'
import hashlib, json, random
random.seed(7)
docs = [{"id": i, "name": "n" * (i % 40), "tags": [str(j) for j in range(i % 17)],
         "score": random.random()} for i in range(60000)]
text = json.dumps(docs, sort_keys=True)
back = json.loads(text)
words = sorted(set(w for d in back for w in d["tags"] + [d["name"]]))
blob = "".join(str(d["score"]) for d in sorted(back, key=lambda d: d["score"]))
print(len(text), len(words), hashlib.sha256((text + blob).encode()).hexdigest())
PY
compare() {
    local name=$1
    shift
    "$@" > "$work/want" 2>&1
    for lib in "$plain" "$hardened"; do
        for path in rseq fallback; do
            run "$lib" "$path" "$@" > "$work/got" 2>&1
            if ! cmp -s "$work/want" "$work/got"; then
                echo "capi tests: $name differs under $lib on the $path path" >&2
                diff "$work/want" "$work/got" | head -20 >&2
                exit 1
            fi
        done
    done
    echo "ok: $name"
}
if [ -x /usr/bin/python3 ]; then
    compare "python3 (json, sorting, hashing)" /usr/bin/python3 "$work/script.py"
else
    echo "capi tests: no /usr/bin/python3; skipped the Python program"
fi
compare "sort of 300000 lines" sort "$work/input"
compare "sort -n, unique" sort -n -u "$work/input"
compare "gzip" gzip -9 -n -c "$work/input"
compare "gzip round trip" sh -c "gzip -n -c '$work/input' | gzip -d -c | md5sum"
if command -v xz > /dev/null; then
    compare "xz" xz -6 -c "$work/input"
    compare "xz round trip" sh -c "xz -c '$work/input' | xz -d -c | md5sum"
else
    echo "capi tests: no xz; skipped"
fi
echo "capi tests: all passed"
