#!/usr/bin/env bash
# Fuzz the C modules with libFuzzer, AddressSanitizer and UBSan: the DATA scanner
# (src/mxspool/smtp/_scan.c, differential against the Python reference) and the SQLite commit
# thread with its coalescing VFS (src/mxspool/store/_groupcommit.c, _coalesce.c: rows read
# back byte-exact).
#
#   fuzz/run.sh [seconds]     build into fuzz/build/, then run every target for `seconds`
#                             (default 30), the targets side by side
#   FUZZ_TARGETS="scan" fuzz/run.sh 600    one target only
#
# Needs clang with the sanitizer and libFuzzer runtimes (Debian: apt-get install clang
# libclang-rt-14-dev), SQLite's and OpenSSL's headers (libsqlite3-dev, libssl-dev) and the
# project's venv (make test or pip install -e '.[test]'). Exits non-zero on any crash,
# sanitizer report or mismatch; the input that caused it is in fuzz/build/artifacts/<target>/
# and replays with
#   fuzz/build/fuzz_<target> fuzz/build/artifacts/<target>/crash-...
# The corpus grows in fuzz/build/corpus/<target>/ and is reused by later runs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
seconds="${1:-30}"
targets="${FUZZ_TARGETS:-scan commit}"
CC="${CC:-clang}"
PYTHON="${PYTHON:-$root/.venv/bin/python}"
build="$here/build"

if ! command -v "$CC" >/dev/null 2>&1; then
    echo "fuzz/run.sh: $CC not found; install it (Debian: apt-get install clang libclang-rt-14-dev)" >&2
    exit 2
fi
if [ ! -x "$PYTHON" ]; then
    echo "fuzz/run.sh: no Python at $PYTHON; run 'make test' once (it creates .venv) or set PYTHON" >&2
    exit 2
fi
mkdir -p "$build"

# Embedding flags for the venv's interpreter (its libpython in LIBDIR).
read -r py_include py_libdir py_version py_libs < <("$PYTHON" - <<'PY'
import sysconfig as s
v = s.get_config_var
print(s.get_paths()["include"], v("LIBDIR"), v("LDVERSION") or v("VERSION"),
      " ".join(x for x in (v("LIBS") or "").split() + (v("SYSLIBS") or "").split() if x.startswith("-l")))
PY
)
sanitize="-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined"
cflags=(-g -O1 -fno-omit-frame-pointer $sanitize -I"$py_include" -I"$here"
        -DSRC_DIR="\"$root/src\"" -DFUZZ_DIR="\"$here\"" -DVENV_PYTHON="\"$PYTHON\"")
ldflags=(-L"$py_libdir" -Wl,-rpath,"$py_libdir" "-lpython$py_version" $py_libs -lpthread -rdynamic)

build_one() { # name, sources...
    local name="$1" out="$build/fuzz_$1" newer=0
    shift
    for src in "$here"/*.c "$here"/*.h "$0" "$root"/src/mxspool/smtp/_scan.c \
        "$root"/src/mxspool/store/_groupcommit.c "$root"/src/mxspool/store/_coalesce.[ch]; do
        [ "$out" -nt "$src" ] || newer=1
    done
    if [ "$newer" = 1 ] || [ ! -x "$out" ]; then
        echo "fuzz/run.sh: building $out"
        "$CC" "${cflags[@]}" "$@" -o "$out" "${ldflags[@]}" -lsqlite3 -lcrypto
    fi
}
for target in $targets; do
    case "$target" in
        scan) build_one scan "$here/fuzz_scan.c" -I"$root/src/mxspool/smtp" ;;
        commit) build_one commit "$here/fuzz_commit.c" "$root/src/mxspool/store/_coalesce.c" \
                    -I"$root/src/mxspool/store" ;;
        *) echo "fuzz/run.sh: unknown target $target (scan, commit)" >&2; exit 2 ;;
    esac
done

# The commit target's databases: on tmpfs when there is one (fsync is then cheap), removed
# when this script ends.
db_dir="$(mktemp -d /dev/shm/mxspool-fuzz.XXXXXX 2>/dev/null || mktemp -d)"
trap 'rm -rf "$db_dir"' EXIT
export FUZZ_DB_DIR="$db_dir"

pids=()
for target in $targets; do
    corpus="$build/corpus/$target" artifacts="$build/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    "$PYTHON" "$here/seeds.py" "$target" "$corpus"
    case "$target" in
        scan) options=(-max_len=8192) ;;
        commit) options=(-max_len=65536 -timeout=60) ;;
    esac
    (
        cd "$build"
        "$build/fuzz_$target" "${options[@]}" -max_total_time="$seconds" -rss_limit_mb=4096 \
            -print_final_stats=1 -artifact_prefix="$artifacts/" "$corpus" \
            >"$build/$target.log" 2>&1
    ) &
    pids+=("$!:$target")
done
status=0
for entry in "${pids[@]}"; do
    pid="${entry%%:*}" target="${entry#*:}"
    if wait "$pid"; then
        echo "fuzz/run.sh: $target: no crash, no sanitizer report, no mismatch ($(grep -Eo '^stat::number_of_executed_units: *[0-9]+' "$build/$target.log" | grep -Eo '[0-9]+$' || echo '?') inputs in ${seconds}s)"
    else
        status=1
        echo "fuzz/run.sh: $target FAILED; its log ($build/$target.log) ends with:" >&2
        tail -n 60 "$build/$target.log" >&2
    fi
done
exit "$status"
