/*
 * The DATA scanner's inner loops in C: the one place where per-byte work in Python cost more
 * than everything else the intake does for a large message (~0.5 ms of interpreter time per
 * 100 KiB, against ~0.03 ms here).
 *
 * Both functions are exact equivalents of the pure-Python code in data.py, which stays the
 * reference and the fallback when this module is not built; tests/smtp/test_smtp_scan.py
 * checks the two against each other on generated input. Everything here is sans-IO: bytes
 * in, bytes and flags out.
 *
 * Lines are found with memchr, which the C library vectorises, so the cost is a few
 * nanoseconds per line, not per byte. The input is only copied when something changes
 * (a dot to unstuff, a bare CR or LF to normalise); clean content is returned as is.
 *
 * "normalize" mode with a bare CR or LF in the region (rare) takes its own path,
 * normalize_lines: there every CR, LF and CRLF ends a line, which changes where dots are
 * stuffing and adds the lone-dot rule (see data.py's docstring).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_LINE 998 /* octets before the CRLF, RFC 5321 4.5.3.1.6 */

/* Where a region starts (data.py's MID_LINE, AFTER_CRLF, AFTER_BARE). */
#define SOL_MID_LINE 0
#define SOL_AFTER_CRLF 1
#define SOL_AFTER_BARE 2

/* Index of the first "\r\n.\r\n" in p[0:n], or -1. The same answer as bytes.find. */
static Py_ssize_t
find_marker(const char *p, Py_ssize_t n)
{
    Py_ssize_t j = 0;
    while (j < n) {
        const char *lf = memchr(p + j, '\n', (size_t)(n - j));
        if (lf == NULL) {
            return -1;
        }
        j = lf - p;
        /* The marker's first LF is at j: "\r" at j-1, then ".\r\n" at j+1..j+3. */
        if (j >= 1 && j + 3 < n && p[j - 1] == '\r' && p[j + 1] == '.' && p[j + 2] == '\r'
            && p[j + 3] == '\n') {
            return j - 1;
        }
        j++;
    }
    return -1;
}

static PyObject *
scan_find_end(PyObject *module, PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "find_end() needs bytes");
        return NULL;
    }
    return PyLong_FromSsize_t(find_marker(PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg)));
}

struct scan_result {
    Py_ssize_t dots;  /* stuffed dots to remove (after a CRLF, not the region's first byte) */
    Py_ssize_t bares; /* bare CRs and bare LFs */
    int too_long;     /* some line (with the carried partial line) is over MAX_LINE */
    Py_ssize_t carry; /* length of the output's trailing partial line */
};

/*
 * One pass over p[start:n] that counts what must change and measures output line lengths.
 * A line ends at any CR or LF (a bare one too: a rejected message is refused anyway); with
 * `unstuff`, a dot after a CRLF is counted as stuffing and does not count towards its line.
 * Without it, on CRLF-only text, this measures lines only.
 */
static void
scan_region(const char *p, Py_ssize_t start, Py_ssize_t n, Py_ssize_t carry, int unstuff,
            struct scan_result *res)
{
    Py_ssize_t pos = start, line_start = start, extra = carry, run;
    res->dots = 0;
    res->bares = 0;
    res->too_long = 0;
    for (;;) {
        const char *lf = memchr(p + pos, '\n', (size_t)(n - pos));
        Py_ssize_t j = lf ? lf - p : n;
        Py_ssize_t k = pos;
        while (k < j) { /* every CR before this LF, except the one right before it */
            const char *cr = memchr(p + k, '\r', (size_t)(j - k));
            Py_ssize_t c;
            if (cr == NULL) {
                break;
            }
            c = cr - p;
            if (c == j - 1 && j < n) {
                break;
            }
            res->bares++;
            run = c - line_start + extra;
            extra = 0;
            if (run > MAX_LINE) {
                res->too_long = 1;
            }
            line_start = c + 1;
            k = c + 1;
        }
        if (j >= n) {
            break;
        }
        {
            int crlf = j > 0 && p[j - 1] == '\r';
            run = (crlf ? j - 1 : j) - line_start + extra;
            extra = 0;
            if (run > MAX_LINE) {
                res->too_long = 1;
            }
            line_start = j + 1;
            pos = j + 1;
            if (!crlf) {
                res->bares++;
            }
            else if (unstuff && j + 1 < n && p[j + 1] == '.') {
                res->dots++;
                line_start = j + 2;
                pos = j + 2;
            }
        }
    }
    run = n - line_start + extra;
    if (run > MAX_LINE) {
        res->too_long = 1;
    }
    res->carry = run;
}

/* Copy p[start:n] to o, unstuffing dots after CRLF (bare CR and LF are copied as they are). */
static char *
rewrite_region(const char *p, Py_ssize_t start, Py_ssize_t n, char *o)
{
    Py_ssize_t i = start;
    while (i < n) {
        char c = p[i];
        *o++ = c;
        if (c == '\n' && i > 0 && p[i - 1] == '\r' && i + 1 < n && p[i + 1] == '.') {
            i += 2;
            continue;
        }
        i++;
    }
    return o;
}

/*
 * "normalize" mode's line rules over p[0:n]: every CR, LF or CRLF ends a line and is written
 * as CRLF; a line's first dot is removed (the region's first line only when sol says it starts
 * a line); a line holding only a dot is dropped with its line end when that end is bare or the
 * one before it was (sol == SOL_AFTER_BARE for the first line). A CR at the end of p is bare.
 * Returns the output length, and writes the output to o unless o is NULL, so that one function
 * both sizes and fills the buffer. The next LF is remembered across lines: a run of bare CRs
 * before a far LF stays linear.
 */
static Py_ssize_t
normalize_lines(const char *p, Py_ssize_t n, int sol, char *o)
{
    Py_ssize_t i = 0, size = 0, next_lf = -1;
    int at_start = sol != SOL_MID_LINE, bare_before = sol == SOL_AFTER_BARE;
    while (i < n) {
        Py_ssize_t k = (at_start && p[i] == '.') ? i + 1 : i, j, end;
        int bare = 0;
        const char *cr;
        if (next_lf < k) {
            const char *lf = memchr(p + k, '\n', (size_t)(n - k));
            next_lf = lf ? lf - p : n;
        }
        cr = memchr(p + k, '\r', (size_t)(next_lf - k));
        j = cr ? cr - p : next_lf; /* the line's end: its first CR or LF, or n */
        if (j == n) {
            end = n; /* an unterminated last line */
        }
        else if (p[j] == '\r' && j + 1 < n && p[j + 1] == '\n') {
            end = j + 2;
        }
        else {
            end = j + 1;
            bare = 1;
        }
        if (k == i + 1 && j == k && end > j && (bare || bare_before)) {
            /* a lone dot next to a bare line end: neither the end of data nor content */
        }
        else {
            if (o != NULL) {
                memcpy(o + size, p + k, (size_t)(j - k));
            }
            size += j - k;
            if (end > j) {
                if (o != NULL) {
                    o[size] = '\r';
                    o[size + 1] = '\n';
                }
                size += 2;
            }
        }
        at_start = end > j;
        bare_before = bare;
        i = end;
    }
    return size;
}

/*
 * process(region, sol, normalize, check_lines, carry) -> (content, bare, too_long, carry)
 *
 * sol: where the region starts, SOL_MID_LINE, SOL_AFTER_CRLF or SOL_AFTER_BARE (a bool works
 * as the first two); when not mid-line, the region's leading dot is stuffing.
 */
static PyObject *
scan_process(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *region, *out;
    const char *p;
    Py_ssize_t n, start, carry, size;
    int sol, normalize, check_lines;
    struct scan_result res;

    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "process() takes 5 arguments");
        return NULL;
    }
    region = args[0];
    if (!PyBytes_Check(region)) {
        PyErr_SetString(PyExc_TypeError, "process() needs bytes");
        return NULL;
    }
    sol = PyObject_IsTrue(args[1]);
    if (sol > 0) {
        long value = PyLong_AsLong(args[1]);
        if (value == -1 && PyErr_Occurred()) {
            return NULL;
        }
        sol = value == SOL_AFTER_BARE ? SOL_AFTER_BARE : SOL_AFTER_CRLF;
    }
    normalize = PyObject_IsTrue(args[2]);
    check_lines = PyObject_IsTrue(args[3]);
    carry = PyLong_AsSsize_t(args[4]);
    if (sol < 0 || normalize < 0 || check_lines < 0 || (carry == -1 && PyErr_Occurred())) {
        return NULL;
    }
    p = PyBytes_AS_STRING(region);
    n = PyBytes_GET_SIZE(region);
    start = (sol && n > 0 && p[0] == '.') ? 1 : 0;
    scan_region(p, start, n, carry, 1, &res);

    if (normalize && (res.bares > 0 || (sol == SOL_AFTER_BARE && start))) {
        struct scan_result lines;
        size = normalize_lines(p, n, sol, NULL);
        out = PyBytes_FromStringAndSize(NULL, size);
        if (out == NULL) {
            return NULL;
        }
        if (normalize_lines(p, n, sol, PyBytes_AS_STRING(out)) != size) {
            Py_DECREF(out);
            PyErr_SetString(PyExc_AssertionError, "DATA scanner: output size mismatch");
            return NULL;
        }
        /* The output is CRLF text with the dots already removed: measure its lines as is. */
        scan_region(PyBytes_AS_STRING(out), 0, size, carry, 0, &lines);
        res.too_long = lines.too_long;
        res.carry = lines.carry;
    }
    else if (start == 0 && res.dots == 0) {
        Py_INCREF(region);
        out = region;
    }
    else {
        char *end;
        size = n - start - res.dots;
        out = PyBytes_FromStringAndSize(NULL, size);
        if (out == NULL) {
            return NULL;
        }
        end = rewrite_region(p, start, n, PyBytes_AS_STRING(out));
        if (end - PyBytes_AS_STRING(out) != size) {
            Py_DECREF(out);
            PyErr_SetString(PyExc_AssertionError, "DATA scanner: output size mismatch");
            return NULL;
        }
    }
    /* Like the reference, a line over the limit (or no check) leaves the carry as it was: it
     * is only used while no line has been too long. */
    return Py_BuildValue("(NNNn)", out, PyBool_FromLong(res.bares > 0),
                         PyBool_FromLong(check_lines && res.too_long),
                         check_lines && !res.too_long ? res.carry : carry);
}

static PyMethodDef scan_methods[] = {
    {"find_end", (PyCFunction)scan_find_end, METH_O,
     "find_end(buf) -> index of the first CRLF.CRLF, or -1"},
    {"process", (PyCFunction)(void (*)(void))scan_process, METH_FASTCALL,
     "process(region, sol, normalize, check_lines, carry) -> (content, bare, too_long, carry)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT, "mxspool.smtp._scan", "C inner loops of the DATA reader.", 0,
    scan_methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModuleDef_Init(&scan_module);
}
