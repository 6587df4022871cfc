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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_LINE 998 /* octets before the CRLF, RFC 5321 4.5.3.1.6 */

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
 * A line ends at any CR or LF (a bare one too: it becomes a line end when normalised, and a
 * rejected message is refused anyway); a removed dot does not count towards its line.
 */
static void
scan_region(const char *p, Py_ssize_t start, Py_ssize_t n, Py_ssize_t carry,
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
            else if (j + 1 < n && p[j + 1] == '.') {
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

/* Copy p[start:n] to o, unstuffing dots after CRLF and, if asked, turning bare CR/LF into CRLF. */
static char *
rewrite_region(const char *p, Py_ssize_t start, Py_ssize_t n, int normalize, char *o)
{
    Py_ssize_t i = start;
    while (i < n) {
        char c = p[i];
        if (c == '\n') {
            if (i > 0 && p[i - 1] == '\r') {
                *o++ = '\n';
                if (i + 1 < n && p[i + 1] == '.') {
                    i += 2;
                    continue;
                }
            }
            else {
                if (normalize) {
                    *o++ = '\r';
                }
                *o++ = '\n';
            }
        }
        else if (c == '\r') {
            *o++ = '\r';
            if (normalize && !(i + 1 < n && p[i + 1] == '\n')) {
                *o++ = '\n';
            }
        }
        else {
            *o++ = c;
        }
        i++;
    }
    return o;
}

/*
 * process(region, sol, normalize, check_lines, carry) -> (content, bare, too_long, carry)
 *
 * sol: the region's first byte starts a line (its leading dot is stuffing).
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
    normalize = PyObject_IsTrue(args[2]);
    check_lines = PyObject_IsTrue(args[3]);
    carry = PyLong_AsSsize_t(args[4]);
    if (sol < 0 || normalize < 0 || check_lines < 0 || (carry == -1 && PyErr_Occurred())) {
        return NULL;
    }
    p = PyBytes_AS_STRING(region);
    n = PyBytes_GET_SIZE(region);
    start = (sol && n > 0 && p[0] == '.') ? 1 : 0;
    scan_region(p, start, n, carry, &res);

    if (start == 0 && res.dots == 0 && !(normalize && res.bares > 0)) {
        Py_INCREF(region);
        out = region;
    }
    else {
        char *end;
        size = n - start - res.dots + (normalize ? res.bares : 0);
        out = PyBytes_FromStringAndSize(NULL, size);
        if (out == NULL) {
            return NULL;
        }
        end = rewrite_region(p, start, n, normalize, PyBytes_AS_STRING(out));
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
