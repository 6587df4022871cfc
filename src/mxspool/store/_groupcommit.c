/*
 * Group commit for accepted messages, on a thread that never takes the GIL.
 *
 * Why C: the Python writer thread needs the GIL three times per batch (waking up, after the
 * statement, after the reset), and the event loop holds it nearly all the time under load.
 * Each hand-over is a pair of context switches; measured, they cost the loop ~0.13 ms per
 * message and stretched the commit latency to several times the fsync. This thread takes
 * jobs from a queue, runs them in one transaction (one SAVEPOINT each, so one failing row
 * fails alone) and commits with synchronous=FULL; the loop learns of finished jobs through
 * a pipe it watches. The GIL is only taken by the Python side: submit(), collect(), lock().
 *
 * The module knows no schema. It is given the database path, SQL run on each new
 * connection (PRAGMAs), and one INSERT statement; every job is a tuple of values for its
 * parameters (None, int, float, str, bytes). The tuple is kept referenced until the job is
 * collected, so the commit thread can read the str and bytes buffers without the GIL: they
 * are immutable and cannot be freed while referenced.
 *
 * The Python writer thread (for every other write) and this thread share the database
 * through lock()/unlock(), so their transactions never meet in SQLite's busy handler.
 *
 * The thread's connection goes through a VFS that gathers SQLite's many small sequential
 * writes into few large ones (_coalesce.c); that is why it insists on synchronous=FULL.
 *
 * The connection also offers the SQL function mxspool_sha256(blob), the lowercase hex SHA-256
 * of its argument (OpenSSL's EVP_Digest), so that the INSERT can store a body's digest without
 * the event loop computing it: hashing 100 KiB takes ~60 us, 12% of the loop's time per message
 * at that size, and here it runs on the other core, without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "_coalesce.h"

#define ERROR_SIZE 400

typedef struct {
    int type; /* SQLITE_NULL, SQLITE_INTEGER, SQLITE_FLOAT, SQLITE_TEXT or SQLITE_BLOB */
    union {
        sqlite3_int64 i;
        double d;
        struct {
            const char *p;
            Py_ssize_t n;
        } s;
    } v;
} Value;

typedef struct Job {
    struct Job *next;
    PyObject *values; /* the tuple whose buffers the Values point into */
    PyObject *token;  /* handed back by collect() */
    int failed;
    char error[ERROR_SIZE];
    Py_ssize_t count;
    Value vals[];
} Job;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mutex;
    pthread_cond_t work;    /* a job was queued, or closing */
    pthread_cond_t db_free; /* the database changed hands */
    pthread_t thread;
    int ready;   /* the lock and the pipe exist */
    int started; /* the thread runs */
    int closing;
    int busy;    /* the commit thread is in a transaction */
    int held;    /* a Python thread holds the database */
    int waiting; /* Python threads waiting for the database */
    /* Fair turns when both sides have work: a Python thread that gives the database back
     * while the commit thread waits for it hands it the next turn. */
    int thread_waiting;
    int thread_turn;
    Job *queue_head, *queue_tail;
    Job *done_head, *done_tail;
    int pipe_r, pipe_w;
    int max_batch;
    char *path;
    char *setup_sql;
    char *insert_sql;
    int nparams;
    sqlite3 *db;
    sqlite3_stmt *insert;
} Committer;

static char *
copy_string(const char *s)
{
    size_t n = strlen(s) + 1;
    char *out = PyMem_RawMalloc(n);
    if (out != NULL) {
        memcpy(out, s, n);
    }
    return out;
}

static void
close_db(Committer *self)
{
    if (self->insert != NULL) {
        sqlite3_finalize(self->insert);
        self->insert = NULL;
    }
    if (self->db != NULL) {
        sqlite3_close_v2(self->db);
        self->db = NULL;
    }
}

/* mxspool_sha256(X): the SHA-256 of blob (or text) X as 64 lowercase hex digits; NULL for NULL. */
static void
sha256_hex(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
    static const char digits[] = "0123456789abcdef";
    unsigned char md[EVP_MAX_MD_SIZE];
    char hex[2 * EVP_MAX_MD_SIZE];
    unsigned int size = 0;
    (void)argc;
    if (sqlite3_value_type(argv[0]) == SQLITE_NULL) {
        sqlite3_result_null(ctx);
        return;
    }
    const void *data = sqlite3_value_blob(argv[0]);
    int n = sqlite3_value_bytes(argv[0]);
    if (!EVP_Digest(data != NULL ? data : "", (size_t)n, md, &size, EVP_sha256(), NULL)) {
        sqlite3_result_error(ctx, "mxspool_sha256: OpenSSL could not compute the digest", -1);
        return;
    }
    for (unsigned int i = 0; i < size; i++) {
        hex[2 * i] = digits[md[i] >> 4];
        hex[2 * i + 1] = digits[md[i] & 15];
    }
    sqlite3_result_text(ctx, hex, (int)(2 * size), SQLITE_TRANSIENT);
}

/* Open the connection, run the setup SQL and prepare the INSERT. On failure, 'error' says why
 * and nothing stays open. */
static int
open_db(Committer *self, char *error)
{
    sqlite3_stmt *check = NULL;
    int rc = sqlite3_open_v2(self->path, &self->db, SQLITE_OPEN_READWRITE, COALESCING_VFS_NAME);
    if (rc == SQLITE_OK) {
        rc = sqlite3_exec(self->db, self->setup_sql, NULL, NULL, NULL);
    }
    if (rc == SQLITE_OK) {
        rc = sqlite3_create_function_v2(self->db, "mxspool_sha256", 1,
                                        SQLITE_UTF8 | SQLITE_DETERMINISTIC, NULL, sha256_hex,
                                        NULL, NULL, NULL);
    }
    if (rc == SQLITE_OK) {
        /* The coalescing VFS relies on a sync before frames are published (see _coalesce.c). */
        rc = sqlite3_prepare_v2(self->db, "PRAGMA synchronous", -1, &check, NULL);
        if (rc == SQLITE_OK && sqlite3_step(check) == SQLITE_ROW
            && sqlite3_column_int(check, 0) < 2) {
            snprintf(error, ERROR_SIZE, "cannot open the store: the commit thread needs "
                                        "PRAGMA synchronous = FULL (or EXTRA)");
            sqlite3_finalize(check);
            close_db(self);
            return SQLITE_MISUSE;
        }
        sqlite3_finalize(check);
    }
    if (rc == SQLITE_OK) {
        rc = sqlite3_prepare_v3(self->db, self->insert_sql, -1, SQLITE_PREPARE_PERSISTENT,
                                &self->insert, NULL);
    }
    if (rc != SQLITE_OK) {
        snprintf(error, ERROR_SIZE, "cannot open the store: %s",
                 self->db ? sqlite3_errmsg(self->db) : sqlite3_errstr(rc));
        close_db(self);
        return rc;
    }
    self->nparams = sqlite3_bind_parameter_count(self->insert);
    return SQLITE_OK;
}

static void
fail_job(Job *job, const char *what, const char *why)
{
    if (!job->failed) {
        job->failed = 1;
        snprintf(job->error, ERROR_SIZE, "%s: %s", what, why);
    }
}

static int
exec_sql(Committer *self, const char *sql)
{
    return sqlite3_exec(self->db, sql, NULL, NULL, NULL);
}

static int
bind_job(Committer *self, Job *job)
{
    sqlite3_stmt *st = self->insert;
    int rc = SQLITE_OK;
    for (Py_ssize_t i = 0; i < job->count && rc == SQLITE_OK; i++) {
        Value *value = &job->vals[i];
        int column = (int)i + 1;
        switch (value->type) {
        case SQLITE_INTEGER:
            rc = sqlite3_bind_int64(st, column, value->v.i);
            break;
        case SQLITE_FLOAT:
            rc = sqlite3_bind_double(st, column, value->v.d);
            break;
        case SQLITE_TEXT:
            rc = sqlite3_bind_text64(st, column, value->v.s.p, (sqlite3_uint64)value->v.s.n,
                                     SQLITE_STATIC, SQLITE_UTF8);
            break;
        case SQLITE_BLOB:
            rc = sqlite3_bind_blob64(st, column, value->v.s.p, (sqlite3_uint64)value->v.s.n,
                                     SQLITE_STATIC);
            break;
        default:
            rc = sqlite3_bind_null(st, column);
        }
    }
    return rc;
}

/* One transaction for the whole batch; every job's outcome is in job->failed/error. */
static void
run_batch(Committer *self, Job *batch)
{
    char error[ERROR_SIZE];
    Job *job;
    if (self->db == NULL && open_db(self, error) != SQLITE_OK) {
        goto failed;
    }
    if (exec_sql(self, "BEGIN IMMEDIATE") != SQLITE_OK) {
        goto abort;
    }
    for (job = batch; job != NULL; job = job->next) {
        if (exec_sql(self, "SAVEPOINT job") != SQLITE_OK) {
            goto abort;
        }
        int rc = bind_job(self, job);
        if (rc == SQLITE_OK) {
            rc = sqlite3_step(self->insert);
        }
        if (rc != SQLITE_DONE) {
            snprintf(error, ERROR_SIZE, "%s", sqlite3_errmsg(self->db));
            fail_job(job, "store write failed", error);
        }
        sqlite3_reset(self->insert);
        sqlite3_clear_bindings(self->insert);
        if (job->failed && sqlite3_get_autocommit(self->db)) {
            /* SQLite rolled the whole transaction back itself (I/O error, disk full). */
            goto failed;
        }
        if (job->failed && exec_sql(self, "ROLLBACK TO job") != SQLITE_OK) {
            goto abort;
        }
        if (exec_sql(self, "RELEASE job") != SQLITE_OK) {
            goto abort;
        }
    }
    if (exec_sql(self, "COMMIT") == SQLITE_OK) {
        return;
    }
abort:
    snprintf(error, ERROR_SIZE, "%s", sqlite3_errmsg(self->db));
    if (!sqlite3_get_autocommit(self->db)) {
        exec_sql(self, "ROLLBACK");
    }
failed:
    /* Nothing of the batch is stored. An I/O error can leave the connection unusable, so the
     * next batch starts on a new one. */
    for (job = batch; job != NULL; job = job->next) {
        fail_job(job, "commit failed", error);
    }
    close_db(self);
}

static void
notify(Committer *self)
{
    char byte = 1;
    ssize_t n;
    do {
        n = write(self->pipe_w, &byte, 1);
    } while (n < 0 && errno == EINTR);
    /* EAGAIN: the pipe is full of earlier wake-ups, which is as good as this one. */
}

static void *
commit_thread(void *arg)
{
    Committer *self = arg;
    pthread_mutex_lock(&self->mutex);
    for (;;) {
        while (self->queue_head == NULL && !self->closing) {
            pthread_cond_wait(&self->work, &self->mutex);
        }
        if (self->queue_head == NULL) {
            break; /* closing, and everything queued is done */
        }
        self->thread_waiting = 1;
        while (self->held || (self->waiting && !self->thread_turn)) {
            pthread_cond_wait(&self->db_free, &self->mutex);
        }
        self->thread_waiting = 0;
        self->thread_turn = 0;
        /* Everything waiting now shares this transaction and its fsync. */
        Job *batch = self->queue_head, *last = batch;
        for (int n = 1; last->next != NULL && n < self->max_batch; n++) {
            last = last->next;
        }
        self->queue_head = last->next;
        if (self->queue_head == NULL) {
            self->queue_tail = NULL;
        }
        last->next = NULL;
        self->busy = 1;
        pthread_mutex_unlock(&self->mutex);

        run_batch(self, batch);

        pthread_mutex_lock(&self->mutex);
        self->busy = 0;
        pthread_cond_broadcast(&self->db_free);
        if (self->done_head == NULL) {
            __atomic_store_n(&self->done_head, batch, __ATOMIC_RELEASE);
            notify(self);
        }
        else {
            self->done_tail->next = batch;
        }
        self->done_tail = last;
    }
    pthread_mutex_unlock(&self->mutex);
    close_db(self);
    return NULL;
}

static void
free_job(Job *job)
{
    Py_XDECREF(job->values);
    Py_XDECREF(job->token);
    PyMem_Free(job);
}

/* -- Python methods ------------------------------------------------------------------- */

static PyObject *
Committer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Committer *self = (Committer *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->pipe_r = self->pipe_w = -1;
    }
    return (PyObject *)self;
}

static int
Committer_init(Committer *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"path", "setup_sql", "insert_sql", "max_batch", NULL};
    const char *path, *setup_sql, *insert_sql;
    int max_batch;
    char error[ERROR_SIZE];
    if (self->ready || self->path != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Committer is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sssi", keywords, &path, &setup_sql,
                                     &insert_sql, &max_batch)) {
        return -1;
    }
    if (max_batch < 1) {
        PyErr_SetString(PyExc_ValueError, "max_batch must be at least 1");
        return -1;
    }
    self->path = copy_string(path);
    self->setup_sql = copy_string(setup_sql);
    self->insert_sql = copy_string(insert_sql);
    if (self->path == NULL || self->setup_sql == NULL || self->insert_sql == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->max_batch = max_batch;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = open_db(self, error);
    Py_END_ALLOW_THREADS
    if (rc != SQLITE_OK) {
        PyErr_SetString(PyExc_OSError, error);
        return -1;
    }
    int fds[2];
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->pipe_r = fds[0];
    self->pipe_w = fds[1];
    if (pthread_mutex_init(&self->mutex, NULL) != 0 || pthread_cond_init(&self->work, NULL) != 0
        || pthread_cond_init(&self->db_free, NULL) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "cannot initialise the commit thread's lock");
        return -1;
    }
    self->ready = 1;
    /* The thread starts with every signal blocked, so signals go to the Python threads (the
     * main thread runs the handlers) and never interrupt SQLite's I/O here. */
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &previous);
    int failed = pthread_create(&self->thread, NULL, commit_thread, self);
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    if (failed) {
        PyErr_SetString(PyExc_RuntimeError, "cannot start the commit thread");
        return -1;
    }
#ifdef __linux__
    pthread_setname_np(self->thread, "mxspool-commit"); /* for top -H, ps -L, perf */
#endif
    self->started = 1;
    return 0;
}

static int
convert_value(PyObject *item, Value *value)
{
    if (item == Py_None) {
        value->type = SQLITE_NULL;
    }
    else if (PyLong_Check(item)) {
        value->type = SQLITE_INTEGER;
        value->v.i = PyLong_AsLongLong(item);
        if (value->v.i == -1 && PyErr_Occurred()) {
            return -1;
        }
    }
    else if (PyFloat_Check(item)) {
        value->type = SQLITE_FLOAT;
        value->v.d = PyFloat_AS_DOUBLE(item);
    }
    else if (PyUnicode_Check(item)) {
        value->type = SQLITE_TEXT;
        /* Cached in the str object: valid for as long as the object lives. */
        value->v.s.p = PyUnicode_AsUTF8AndSize(item, &value->v.s.n);
        if (value->v.s.p == NULL) {
            return -1;
        }
    }
    else if (PyBytes_Check(item)) {
        value->type = SQLITE_BLOB;
        value->v.s.p = PyBytes_AS_STRING(item);
        value->v.s.n = PyBytes_GET_SIZE(item);
    }
    else {
        PyErr_Format(PyExc_TypeError, "cannot store a value of type %.100s",
                     Py_TYPE(item)->tp_name);
        return -1;
    }
    return 0;
}

static PyObject *
Committer_submit(Committer *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyTuple_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "submit(values: tuple, token)");
        return NULL;
    }
    if (!self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "the commit thread is not running");
        return NULL;
    }
    PyObject *values = args[0];
    Py_ssize_t count = PyTuple_GET_SIZE(values);
    if (count != self->nparams) {
        PyErr_Format(PyExc_ValueError, "the statement takes %d values, got %zd", self->nparams,
                     count);
        return NULL;
    }
    Job *job = PyMem_Malloc(sizeof(Job) + (size_t)count * sizeof(Value));
    if (job == NULL) {
        return PyErr_NoMemory();
    }
    job->next = NULL;
    job->failed = 0;
    job->error[0] = '\0';
    job->count = count;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (convert_value(PyTuple_GET_ITEM(values, i), &job->vals[i]) < 0) {
            PyMem_Free(job);
            return NULL;
        }
    }
    Py_INCREF(values);
    job->values = values;
    Py_INCREF(args[1]);
    job->token = args[1];

    pthread_mutex_lock(&self->mutex);
    if (self->closing || !self->started) {
        pthread_mutex_unlock(&self->mutex);
        free_job(job);
        PyErr_SetString(PyExc_RuntimeError, "the commit thread is closed");
        return NULL;
    }
    if (self->queue_tail == NULL) {
        self->queue_head = job;
    }
    else {
        self->queue_tail->next = job;
    }
    self->queue_tail = job;
    pthread_cond_signal(&self->work);
    pthread_mutex_unlock(&self->mutex);
    Py_RETURN_NONE;
}

static PyObject *
Committer_collect(Committer *self, PyObject *Py_UNUSED(ignored))
{
    char buf[256];
    Job *done;
    if (!self->ready) {
        return PyList_New(0);
    }
    /* Drained under the lock the thread writes under: an empty list means an empty pipe. */
    pthread_mutex_lock(&self->mutex);
    while (read(self->pipe_r, buf, sizeof buf) > 0) {
    }
    done = self->done_head;
    __atomic_store_n(&self->done_head, NULL, __ATOMIC_RELAXED); /* pending() reads it unlocked */
    self->done_tail = NULL;
    pthread_mutex_unlock(&self->mutex);

    PyObject *result = PyList_New(0);
    while (done != NULL) {
        Job *job = done;
        done = job->next;
        if (result != NULL) {
            PyObject *item;
            if (job->failed) {
                item = Py_BuildValue("(Os)", job->token, job->error);
            }
            else {
                item = PyTuple_Pack(2, job->token, Py_None);
            }
            if (item == NULL || PyList_Append(result, item) < 0) {
                Py_CLEAR(result);
            }
            Py_XDECREF(item);
        }
        free_job(job);
    }
    return result;
}

/* Whether finished jobs wait for collect(): one load, no lock and no system call, so that the
 * event loop can look at every event it handles (a stale answer only defers the jobs to the
 * pipe's wake-up, which is always written). */
static PyObject *
Committer_pending(Committer *self, PyObject *Py_UNUSED(ignored))
{
    if (self->ready && __atomic_load_n(&self->done_head, __ATOMIC_ACQUIRE) != NULL) {
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static PyObject *
Committer_fileno(Committer *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(self->pipe_r);
}

static PyObject *
Committer_lock(Committer *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "the commit thread is closed");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->mutex);
    self->waiting++;
    while (self->busy || self->held || self->thread_turn) {
        pthread_cond_wait(&self->db_free, &self->mutex);
    }
    self->waiting--;
    self->held = 1;
    pthread_mutex_unlock(&self->mutex);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *
Committer_unlock(Committer *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->ready) {
        Py_RETURN_NONE;
    }
    pthread_mutex_lock(&self->mutex);
    self->held = 0;
    if (self->thread_waiting) {
        self->thread_turn = 1;
    }
    pthread_cond_broadcast(&self->db_free);
    pthread_mutex_unlock(&self->mutex);
    Py_RETURN_NONE;
}

static void
stop_thread(Committer *self)
{
    if (!self->started) {
        return;
    }
    pthread_mutex_lock(&self->mutex);
    self->closing = 1;
    pthread_cond_signal(&self->work);
    pthread_mutex_unlock(&self->mutex);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(self->thread, NULL);
    Py_END_ALLOW_THREADS
    self->started = 0;
}

static PyObject *
Committer_close(Committer *self, PyObject *Py_UNUSED(ignored))
{
    /* Commits everything queued first; collect() still returns the outcomes afterwards. */
    stop_thread(self);
    Py_RETURN_NONE;
}

static void
Committer_dealloc(Committer *self)
{
    stop_thread(self);
    close_db(self);
    for (Job *job = self->done_head; job != NULL;) {
        Job *next = job->next;
        free_job(job);
        job = next;
    }
    if (self->pipe_r >= 0) {
        close(self->pipe_r);
        close(self->pipe_w);
    }
    PyMem_RawFree(self->path);
    PyMem_RawFree(self->setup_sql);
    PyMem_RawFree(self->insert_sql);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Committer_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))Committer_submit, METH_FASTCALL,
     "submit(values, token): queue one INSERT; its outcome comes back from collect()"},
    {"collect", (PyCFunction)Committer_collect, METH_NOARGS,
     "collect() -> [(token, error or None)] of committed (or failed) jobs, in order"},
    {"pending", (PyCFunction)Committer_pending, METH_NOARGS,
     "pending() -> whether collect() has something (no lock, no system call)"},
    {"fileno", (PyCFunction)Committer_fileno, METH_NOARGS,
     "fileno() -> a descriptor that becomes readable when collect() has something"},
    {"lock", (PyCFunction)Committer_lock, METH_NOARGS,
     "lock(): wait for, and hold, the database (the GIL is released while waiting)"},
    {"unlock", (PyCFunction)Committer_unlock, METH_NOARGS, "unlock(): give the database back"},
    {"close", (PyCFunction)Committer_close, METH_NOARGS,
     "close(): commit what is queued, stop the thread"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CommitterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mxspool.store._groupcommit.Committer",
    .tp_basicsize = sizeof(Committer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Group commit of INSERTs on a thread that never takes the GIL.",
    .tp_new = Committer_new,
    .tp_init = (initproc)Committer_init,
    .tp_dealloc = (destructor)Committer_dealloc,
    .tp_methods = Committer_methods,
};

static struct PyModuleDef groupcommit_module = {
    PyModuleDef_HEAD_INIT, "mxspool.store._groupcommit",
    "Group commit of accepted messages without the GIL.", -1, NULL,
};

PyMODINIT_FUNC
PyInit__groupcommit(void)
{
    if (coalescing_vfs_register() != SQLITE_OK) {
        PyErr_SetString(PyExc_ImportError, "cannot register the coalescing SQLite VFS");
        return NULL;
    }
    if (PyType_Ready(&CommitterType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&groupcommit_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&CommitterType);
    if (PyModule_AddObject(module, "Committer", (PyObject *)&CommitterType) < 0) {
        Py_DECREF(&CommitterType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
