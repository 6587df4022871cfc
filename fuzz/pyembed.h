/*
 * An embedded CPython for the libFuzzer harnesses (fuzz_scan.c, fuzz_commit.c).
 *
 * The harness executable carries the sanitizer runtimes itself (it is linked with
 * -fsanitize=fuzzer,address,undefined), so no LD_PRELOAD of libasan is needed: the
 * interpreter (libpython, not instrumented) runs inside an instrumented process, and the C
 * module under test is compiled into the executable with instrumentation and installed in
 * sys.modules under its real name before the Python code that uses it is imported. The
 * in-tree .so files are never loaded or replaced.
 *
 * Python objects are allocated with plain malloc (PYMEM_ALLOCATOR_MALLOC): with pymalloc's
 * arenas an overflow from one small bytes object into the next would be invisible to ASan.
 *
 * Paths come from the build (run.sh): SRC_DIR (the package's src/), FUZZ_DIR (this folder,
 * for the *_target.py modules) and VENV_PYTHON (the venv's interpreter, so that the venv's
 * site-packages are on sys.path).
 */
#ifndef MXSPOOL_PYEMBED_H
#define MXSPOOL_PYEMBED_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdio.h>
#include <stdlib.h>

/* Leaks: the interpreter keeps caches and interned objects for good, which LeakSanitizer
 * would report on every run. Everything else (overflows, use after free, UB) aborts. */
const char *
__asan_default_options(void)
{
    return "detect_leaks=0:abort_on_error=1:print_summary=1";
}

const char *
__ubsan_default_options(void)
{
    return "print_stacktrace=1:halt_on_error=1";
}

static PyObject *fuzz_one; /* the target module's one(data: bytes) -> None */

static void
die_with_python_error(const char *what)
{
    fprintf(stderr, "==fuzz== %s\n", what);
    if (PyErr_Occurred()) {
        PyErr_Print();
    }
    fflush(stderr);
    abort(); /* libFuzzer saves the input as a crash-* file */
}

/* Start the interpreter, put `name` in sys.modules (built by init), import the target. */
static void
start_python(const char *target, const char *module_name, PyObject *(*init)(void))
{
    PyPreConfig pre;
    PyPreConfig_InitPythonConfig(&pre);
    pre.allocator = PYMEM_ALLOCATOR_MALLOC;
    if (PyStatus_Exception(Py_PreInitialize(&pre))) {
        die_with_python_error("cannot pre-initialise Python");
    }
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.install_signal_handlers = 0; /* libFuzzer handles SIGINT, timeouts, crashes */
    config.parse_argv = 0;
    PyStatus status = PyConfig_SetBytesString(&config, &config.program_name, VENV_PYTHON);
    if (!PyStatus_Exception(status)) {
        status = Py_InitializeFromConfig(&config);
    }
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) {
        die_with_python_error("cannot initialise Python");
    }
    PyObject *path = PySys_GetObject("path"); /* borrowed */
    PyObject *src = PyUnicode_FromString(SRC_DIR), *fuzz = PyUnicode_FromString(FUZZ_DIR);
    if (path == NULL || src == NULL || fuzz == NULL || PyList_Insert(path, 0, src) < 0
        || PyList_Insert(path, 0, fuzz) < 0) {
        die_with_python_error("cannot set sys.path");
    }
    Py_DECREF(src);
    Py_DECREF(fuzz);
    PyObject *module = init();
    if (module == NULL) {
        die_with_python_error("cannot build the instrumented module");
    }
    PyObject *modules = PyImport_GetModuleDict(); /* borrowed */
    if (PyDict_SetItemString(modules, module_name, module) < 0) {
        die_with_python_error("cannot install the instrumented module");
    }
    Py_DECREF(module);
    PyObject *target_module = PyImport_ImportModule(target);
    if (target_module == NULL) {
        die_with_python_error("cannot import the fuzz target");
    }
    fuzz_one = PyObject_GetAttrString(target_module, "one");
    Py_DECREF(target_module);
    if (fuzz_one == NULL) {
        die_with_python_error("the fuzz target has no one()");
    }
}

/* Run one(data); any exception (a mismatch is an AssertionError) is a crash. */
static void
run_python_target(const uint8_t *data, size_t size)
{
    PyObject *arg = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)size);
    if (arg == NULL) {
        die_with_python_error("cannot build the input");
    }
    PyObject *result = PyObject_CallOneArg(fuzz_one, arg);
    Py_DECREF(arg);
    if (result == NULL) {
        die_with_python_error("the Python target failed on this input");
    }
    Py_DECREF(result);
}

#endif
