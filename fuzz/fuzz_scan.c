/*
 * libFuzzer harness for the DATA scanner (src/mxspool/smtp/_scan.c), built with ASan + UBSan.
 *
 * Each input goes two ways:
 *  1. straight into the scanner's C functions on the exact bytes libFuzzer hands over (no
 *     Python object around them, so a one-byte over-read or overwrite is caught), with the
 *     rewritten output in a buffer of exactly the size the scan announced;
 *  2. into scan_target.py's one(), which checks the C module (this instrumented copy) against
 *     the pure-Python reference in mxspool.smtp.data and a naive byte-by-byte oracle, for the
 *     functions and for DataReader under two chunkings of the input.
 */
#include "_scan.c" /* first: Python.h sets the feature macros */
#include <stdint.h>
#include "pyembed.h"

static PyObject *
make_scan_module(void)
{
    PyObject *module = PyModule_New("mxspool.smtp._scan");
    if (module != NULL && PyModule_AddFunctions(module, scan_methods) < 0) {
        Py_CLEAR(module);
    }
    return module;
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    start_python("scan_target", "mxspool.smtp._scan", make_scan_module);
    return 0;
}

static Py_ssize_t
naive_find(const char *p, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i + 5 <= n; i++) {
        if (memcmp(p + i, "\r\n.\r\n", 5) == 0) {
            return i;
        }
    }
    return -1;
}

static void
check_direct(const char *p, Py_ssize_t n)
{
    if (find_marker(p, n) != naive_find(p, n)) {
        fprintf(stderr, "==fuzz== find_marker disagrees with a naive search\n");
        abort();
    }
    for (int sol = 0; sol < 2; sol++) {
        Py_ssize_t start = (sol && n > 0 && p[0] == '.') ? 1 : 0;
        struct scan_result res;
        scan_region(p, start, n, 0, 1, &res);
        Py_ssize_t size = n - start - res.dots;
        if (size < 0) {
            fprintf(stderr, "==fuzz== negative output size %zd\n", size);
            abort();
        }
        char *out = malloc(size ? (size_t)size : 1);
        char *end = rewrite_region(p, start, n, out);
        if (end - out != size) {
            fprintf(stderr, "==fuzz== rewrite wrote %zd bytes, scan announced %zd\n",
                    (Py_ssize_t)(end - out), size);
            abort();
        }
        free(out);
    }
    for (int sol = SOL_MID_LINE; sol <= SOL_AFTER_BARE; sol++) {
        /* The sizing pass and the writing pass agree, into a buffer of exactly that size. */
        Py_ssize_t size = normalize_lines(p, n, sol, NULL);
        if (size < 0 || size > 2 * n) {
            fprintf(stderr, "==fuzz== normalize_lines sized %zd for %zd bytes\n", size, n);
            abort();
        }
        char *out = malloc(size ? (size_t)size : 1);
        Py_ssize_t wrote = normalize_lines(p, n, sol, out);
        if (wrote != size) {
            fprintf(stderr, "==fuzz== normalize_lines wrote %zd bytes, sized %zd\n", wrote, size);
            abort();
        }
        struct scan_result lines;
        scan_region(out, 0, size, 0, 0, &lines);
        free(out);
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    check_direct((const char *)data, (Py_ssize_t)size);
    run_python_target(data, size);
    return 0;
}
