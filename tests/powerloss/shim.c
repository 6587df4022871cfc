/*
 * Power-loss recorder: an LD_PRELOAD shim for tests (never installed with the package).
 *
 * kill -9 keeps the page cache, so it cannot tell whether a program fsyncs the right things
 * in the right order. This shim records, for files directly inside one watched directory,
 * every change that a power cut could undo, with what it takes to undo it:
 *
 *   WRITE     write/pwrite/pwrite64/writev/pwritev/pwritev2: the offset and length written,
 *             the file size before, and the bytes the range held before (its pre-image)
 *   TRUNCATE  ftruncate/ftruncate64: the new size, the old size, and the bytes cut off
 *   CREATE    open/openat/creat with O_CREAT that made a new file
 *   SYNC      fsync/fdatasync of a file or of the directory (msync: its range), once it
 *             returned: it covers every change recorded before it started
 *   SYNCALL   sync()/syncfs()
 *   POINT     sync_file_range: a sync point that makes nothing durable (no metadata, no
 *             disk cache flush)
 *   CRASH     the process stopped here
 *
 * Sync points (fsync, fdatasync, msync, sync_file_range, sync, syncfs on watched files) are
 * counted; at number MXSPOOL_POWERLOSS_CRASH_AT the shim records CRASH and kills the process
 * with SIGKILL instead of syncing. The page cache still holds every write; the harness
 * (tests/powerloss/powercut.py) then undoes, from the log, what a power cut could have lost.
 *
 * The log is appended with raw system calls, one record per call, under one lock that also
 * covers the recorded change itself, so the log's order is the order the changes reached the
 * kernel, and the process is never killed between recording a change and making it.
 *
 * Environment (read at load; tests/powerloss/zygote.py sets it per child through
 * powerloss_configure instead):
 *   MXSPOOL_POWERLOSS_DIR       the watched directory (absolute, no trailing slash)
 *   MXSPOOL_POWERLOSS_LOG       the log file
 *   MXSPOOL_POWERLOSS_CRASH_AT  the sync point to crash at (1-based; 0 or unset: never)
 *
 * Not seen: writes through mmap (SQLite's -shm; the harness treats it as lost), stdio's
 * internal writes, fallocate, unlink and rename (the store does none of these on the
 * watched files while it runs; SQLite deletes its -wal only when the last connection closes).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum {
    REC_WRITE = 1,
    REC_TRUNCATE = 2,
    REC_SYNC = 3,
    REC_CREATE = 4,
    REC_CRASH = 5,
    REC_SYNCALL = 6,
    REC_POINT = 7,
};

#define MAGIC 0x31524c50u /* "PLR1" */

/* Little-endian on x86-64; tests/powerloss/powercut.py reads it with struct "<IIQqqqQII". */
struct record {
    uint32_t magic;
    uint32_t type;
    uint64_t seq;      /* position in the log; SYNC covers records with a smaller seq */
    int64_t offset;    /* WRITE: where; TRUNCATE: the new size; SYNC: range start */
    int64_t length;    /* WRITE: bytes asked for; SYNC: range length, -1 = whole file */
    int64_t old_size;  /* WRITE, TRUNCATE: the size before */
    uint64_t covers;   /* SYNC, SYNCALL: records with seq < covers are durable */
    uint32_t path_len; /* the path follows the header, then data_len bytes of pre-image */
    uint32_t data_len;
};
_Static_assert(sizeof(struct record) == 56, "the harness reads 56-byte headers");

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static char watched[PATH_MAX];
static size_t watched_len;
static int log_fd = -1;
static long crash_at;
static long sync_points;
static uint64_t next_seq = 1;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev64)(int, const struct iovec *, int, off64_t);
static ssize_t (*real_pwritev2)(int, const struct iovec *, int, off_t, int);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off64_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_sync_file_range)(int, off64_t, off64_t, unsigned int);
static int (*real_msync)(void *, size_t, int);
static void (*real_sync)(void);
static int (*real_syncfs)(int);
static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static int (*real_creat)(const char *, mode_t);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static void *(*real_mmap64)(void *, size_t, int, int, int, off64_t);

#define RESOLVE(name) real_##name = dlsym(RTLD_NEXT, #name)

/* Mappings of watched files, so that msync knows which file it syncs. */
#define MAX_MAPS 64
static struct {
    uintptr_t start, end;
    int64_t file_offset;
    char path[PATH_MAX];
} maps[MAX_MAPS];

static void
resolve(void)
{
    RESOLVE(write);
    RESOLVE(pwrite);
    RESOLVE(pwrite64);
    RESOLVE(writev);
    RESOLVE(pwritev);
    RESOLVE(pwritev64);
    RESOLVE(pwritev2);
    RESOLVE(ftruncate);
    RESOLVE(ftruncate64);
    RESOLVE(fsync);
    RESOLVE(fdatasync);
    RESOLVE(sync_file_range);
    RESOLVE(msync);
    RESOLVE(sync);
    RESOLVE(syncfs);
    RESOLVE(open);
    RESOLVE(open64);
    RESOLVE(openat);
    RESOLVE(openat64);
    RESOLVE(creat);
    RESOLVE(mmap);
    RESOLVE(mmap64);
}

/* Start (or restart, in a forked child) recording: dir = NULL stops it. */
int
powerloss_configure(const char *dir, const char *log_path, long crash_point)
{
    pthread_mutex_lock(&lock);
    if (log_fd >= 0) {
        syscall(SYS_close, log_fd);
        log_fd = -1;
    }
    watched[0] = '\0';
    watched_len = 0;
    crash_at = crash_point;
    sync_points = 0;
    next_seq = 1;
    memset(maps, 0, sizeof maps);
    int rc = 0;
    if (dir != NULL && log_path != NULL && strlen(dir) < sizeof watched) {
        log_fd = (int)syscall(SYS_openat, AT_FDCWD, log_path,
                              O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_TRUNC, 0644);
        if (log_fd >= 0) {
            strcpy(watched, dir);
            watched_len = strlen(watched);
        }
        else {
            rc = -1;
        }
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

__attribute__((constructor)) static void
setup(void)
{
    resolve();
    const char *dir = getenv("MXSPOOL_POWERLOSS_DIR");
    const char *log_path = getenv("MXSPOOL_POWERLOSS_LOG");
    const char *at = getenv("MXSPOOL_POWERLOSS_CRASH_AT");
    if (dir != NULL && log_path != NULL) {
        powerloss_configure(dir, log_path, at != NULL ? atol(at) : 0);
    }
}

/* The path of fd if it is a file directly inside the watched directory, or the directory
 * itself (*is_dir set); otherwise 0. */
static int
watched_path(int fd, char *out, int *is_dir)
{
    if (watched_len == 0 || fd < 0) {
        return 0;
    }
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, PATH_MAX - 1);
    if (n <= 0) {
        return 0;
    }
    out[n] = '\0';
    if ((size_t)n < watched_len || memcmp(out, watched, watched_len) != 0) {
        return 0;
    }
    *is_dir = 0;
    if ((size_t)n == watched_len) {
        *is_dir = 1;
        return 1;
    }
    const char *rest = out + watched_len;
    if (rest[0] != '/' || strchr(rest + 1, '/') != NULL || strstr(rest, " (deleted)") != NULL) {
        return 0;
    }
    return 1;
}

static void
append(struct record *rec, const char *path, const void *data)
{
    struct iovec iov[3];
    rec->magic = MAGIC;
    rec->seq = next_seq++;
    rec->path_len = path != NULL ? (uint32_t)strlen(path) : 0;
    iov[0].iov_base = rec;
    iov[0].iov_len = sizeof *rec;
    iov[1].iov_base = (void *)path;
    iov[1].iov_len = rec->path_len;
    iov[2].iov_base = (void *)data;
    iov[2].iov_len = rec->data_len;
    size_t total = iov[0].iov_len + iov[1].iov_len + iov[2].iov_len;
    ssize_t done = syscall(SYS_writev, log_fd, iov, 3);
    if (done != (ssize_t)total) {
        /* A log that misses a change would make the harness wrong: stop loudly. */
        static const char msg[] = "powerloss shim: cannot append to the log\n";
        syscall(SYS_write, 2, msg, sizeof msg - 1);
        abort();
    }
}

static int64_t
file_size(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 ? (int64_t)st.st_size : 0;
}

/* Read [offset, offset + length) as it is now (short at the end of the file). */
static char *
pre_image(int fd, const char *path, int64_t offset, int64_t length, int64_t size,
          uint32_t *got)
{
    *got = 0;
    int64_t available = size > offset ? size - offset : 0;
    if (length > available) {
        length = available;
    }
    if (length <= 0) {
        return NULL;
    }
    char *buffer = malloc((size_t)length);
    if (buffer == NULL) {
        abort();
    }
    int reader = fd;
    ssize_t n = pread(fd, buffer, (size_t)length, offset);
    if (n < 0 && errno == EBADF) { /* opened write-only: read through a second descriptor */
        reader = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
        n = reader >= 0 ? pread(reader, buffer, (size_t)length, offset) : -1;
        if (reader >= 0) {
            syscall(SYS_close, reader);
        }
    }
    if (n != length) {
        static const char msg[] = "powerloss shim: cannot read a pre-image\n";
        syscall(SYS_write, 2, msg, sizeof msg - 1);
        abort();
    }
    *got = (uint32_t)length;
    return buffer;
}

/* Under the lock: record a write of length bytes at offset (-1: the file position). */
static void
record_write(int fd, const char *path, int64_t offset, int64_t length)
{
    int64_t size = file_size(fd);
    if (offset < 0) {
        int flags = fcntl(fd, F_GETFL);
        offset = (flags >= 0 && (flags & O_APPEND)) ? size : (int64_t)lseek(fd, 0, SEEK_CUR);
    }
    struct record rec = {0};
    rec.type = REC_WRITE;
    rec.offset = offset;
    rec.length = length;
    rec.old_size = size;
    uint32_t got;
    char *old = pre_image(fd, path, offset, length, size, &got);
    rec.data_len = got;
    append(&rec, path, old);
    free(old);
}

static void
record_truncate(int fd, const char *path, int64_t new_size)
{
    int64_t size = file_size(fd);
    struct record rec = {0};
    rec.type = REC_TRUNCATE;
    rec.offset = new_size;
    rec.old_size = size;
    char *old = NULL;
    if (new_size < size) {
        uint32_t got;
        old = pre_image(fd, path, new_size, size - new_size, size, &got);
        rec.data_len = got;
    }
    append(&rec, path, old);
    free(old);
}

/* Under the lock: count a sync point; at the chosen one, record the crash and die. */
static void
sync_point(void)
{
    sync_points++;
    if (crash_at > 0 && sync_points == crash_at) {
        struct record rec = {0};
        rec.type = REC_CRASH;
        rec.offset = sync_points;
        append(&rec, NULL, NULL);
        syscall(SYS_kill, getpid(), SIGKILL);
        for (;;) {
            pause();
        }
    }
}

#define WRAP_WRITE(fd, offset, length, call)                                                  \
    do {                                                                                     \
        char path_[PATH_MAX];                                                                \
        int is_dir_;                                                                         \
        if (!watched_path((fd), path_, &is_dir_) || is_dir_) {                               \
            return call;                                                                     \
        }                                                                                    \
        pthread_mutex_lock(&lock);                                                           \
        record_write((fd), path_, (offset), (length));                                       \
        ssize_t result_ = call;                                                              \
        int errno_ = errno;                                                                  \
        pthread_mutex_unlock(&lock);                                                         \
        errno = errno_;                                                                      \
        return result_;                                                                      \
    } while (0)

static int64_t
iov_length(const struct iovec *iov, int count)
{
    int64_t total = 0;
    for (int i = 0; i < count; i++) {
        total += (int64_t)iov[i].iov_len;
    }
    return total;
}

ssize_t
write(int fd, const void *buf, size_t count)
{
    WRAP_WRITE(fd, -1, (int64_t)count, real_write(fd, buf, count));
}

ssize_t
pwrite(int fd, const void *buf, size_t count, off_t offset)
{
    WRAP_WRITE(fd, (int64_t)offset, (int64_t)count, real_pwrite(fd, buf, count, offset));
}

ssize_t
pwrite64(int fd, const void *buf, size_t count, off64_t offset)
{
    WRAP_WRITE(fd, (int64_t)offset, (int64_t)count, real_pwrite64(fd, buf, count, offset));
}

ssize_t
writev(int fd, const struct iovec *iov, int iovcnt)
{
    WRAP_WRITE(fd, -1, iov_length(iov, iovcnt), real_writev(fd, iov, iovcnt));
}

ssize_t
pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset)
{
    WRAP_WRITE(fd, (int64_t)offset, iov_length(iov, iovcnt), real_pwritev(fd, iov, iovcnt, offset));
}

ssize_t
pwritev64(int fd, const struct iovec *iov, int iovcnt, off64_t offset)
{
    WRAP_WRITE(fd, (int64_t)offset, iov_length(iov, iovcnt),
               real_pwritev64(fd, iov, iovcnt, offset));
}

ssize_t
pwritev2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags)
{
    WRAP_WRITE(fd, (int64_t)offset, iov_length(iov, iovcnt),
               real_pwritev2(fd, iov, iovcnt, offset, flags));
}

static int
wrap_truncate(int fd, int64_t length, int use64)
{
    char path[PATH_MAX];
    int is_dir;
    if (!watched_path(fd, path, &is_dir) || is_dir) {
        return use64 ? real_ftruncate64(fd, length) : real_ftruncate(fd, (off_t)length);
    }
    pthread_mutex_lock(&lock);
    record_truncate(fd, path, length);
    int rc = use64 ? real_ftruncate64(fd, length) : real_ftruncate(fd, (off_t)length);
    int saved = errno;
    pthread_mutex_unlock(&lock);
    errno = saved;
    return rc;
}

int
ftruncate(int fd, off_t length)
{
    return wrap_truncate(fd, (int64_t)length, 0);
}

int
ftruncate64(int fd, off64_t length)
{
    return wrap_truncate(fd, (int64_t)length, 1);
}

/* A sync of one file (or the directory): count the point, sync, then record what it covers.
 * kind: REC_SYNC or REC_POINT (a point that makes nothing durable). */
static int
wrap_sync(const char *path, int64_t start, int64_t length, int kind, int (*call)(void *),
          void *arg)
{
    pthread_mutex_lock(&lock);
    sync_point();
    uint64_t covers = next_seq;
    pthread_mutex_unlock(&lock);
    int rc = call(arg);
    int saved = errno;
    if (rc == 0) {
        pthread_mutex_lock(&lock);
        struct record rec = {0};
        rec.type = (uint32_t)kind;
        rec.offset = start;
        rec.length = length;
        rec.covers = covers;
        append(&rec, path, NULL);
        pthread_mutex_unlock(&lock);
    }
    errno = saved;
    return rc;
}

struct fd_call {
    int fd;
    int (*fn)(int);
};

static int
call_fd(void *arg)
{
    struct fd_call *c = arg;
    return c->fn(c->fd);
}

int
fsync(int fd)
{
    char path[PATH_MAX];
    int is_dir;
    if (!watched_path(fd, path, &is_dir)) {
        return real_fsync(fd);
    }
    struct fd_call c = {fd, real_fsync};
    return wrap_sync(path, 0, -1, REC_SYNC, call_fd, &c);
}

int
fdatasync(int fd)
{
    char path[PATH_MAX];
    int is_dir;
    if (!watched_path(fd, path, &is_dir)) {
        return real_fdatasync(fd);
    }
    struct fd_call c = {fd, real_fdatasync};
    return wrap_sync(path, 0, -1, REC_SYNC, call_fd, &c);
}

struct range_call {
    int fd;
    off64_t offset, nbytes;
    unsigned int flags;
};

static int
call_range(void *arg)
{
    struct range_call *c = arg;
    return real_sync_file_range(c->fd, c->offset, c->nbytes, c->flags);
}

int
sync_file_range(int fd, off64_t offset, off64_t nbytes, unsigned int flags)
{
    char path[PATH_MAX];
    int is_dir;
    if (!watched_path(fd, path, &is_dir)) {
        return real_sync_file_range(fd, offset, nbytes, flags);
    }
    struct range_call c = {fd, offset, nbytes, flags};
    return wrap_sync(path, offset, nbytes, REC_POINT, call_range, &c);
}

static void
remember_map(void *addr, size_t length, int fd, int64_t offset)
{
    char path[PATH_MAX];
    int is_dir;
    if (addr == MAP_FAILED || !watched_path(fd, path, &is_dir) || is_dir) {
        return;
    }
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_MAPS; i++) {
        if (maps[i].end == 0 || maps[i].start == (uintptr_t)addr) {
            maps[i].start = (uintptr_t)addr;
            maps[i].end = (uintptr_t)addr + length;
            maps[i].file_offset = offset;
            strcpy(maps[i].path, path);
            break;
        }
    }
    pthread_mutex_unlock(&lock);
}

void *
mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
    void *out = real_mmap(addr, length, prot, flags, fd, offset);
    if (fd >= 0 && (flags & MAP_SHARED)) {
        remember_map(out, length, fd, (int64_t)offset);
    }
    return out;
}

void *
mmap64(void *addr, size_t length, int prot, int flags, int fd, off64_t offset)
{
    void *out = real_mmap64(addr, length, prot, flags, fd, offset);
    if (fd >= 0 && (flags & MAP_SHARED)) {
        remember_map(out, length, fd, (int64_t)offset);
    }
    return out;
}

struct msync_call {
    void *addr;
    size_t length;
    int flags;
};

static int
call_msync(void *arg)
{
    struct msync_call *c = arg;
    return real_msync(c->addr, c->length, c->flags);
}

int
msync(void *addr, size_t length, int flags)
{
    char path[PATH_MAX];
    int64_t start = -1;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_MAPS; i++) {
        if (maps[i].end != 0 && (uintptr_t)addr >= maps[i].start
            && (uintptr_t)addr < maps[i].end) {
            strcpy(path, maps[i].path);
            start = maps[i].file_offset + (int64_t)((uintptr_t)addr - maps[i].start);
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    if (start < 0) {
        return real_msync(addr, length, flags);
    }
    struct msync_call c = {addr, length, flags};
    return wrap_sync(path, start, (int64_t)length, (flags & MS_SYNC) ? REC_SYNC : REC_POINT,
                     call_msync, &c);
}

static int
call_sync(void *arg)
{
    (void)arg;
    real_sync();
    return 0;
}

void
sync(void)
{
    if (watched_len == 0) {
        real_sync();
        return;
    }
    wrap_sync(NULL, 0, -1, REC_SYNCALL, call_sync, NULL);
}

struct syncfs_call {
    int fd;
};

static int
call_syncfs(void *arg)
{
    return real_syncfs(((struct syncfs_call *)arg)->fd);
}

int
syncfs(int fd)
{
    if (watched_len == 0) {
        return real_syncfs(fd);
    }
    struct syncfs_call c = {fd};
    return wrap_sync(NULL, 0, -1, REC_SYNCALL, call_syncfs, &c);
}

/* open with O_CREAT: note files that did not exist before. O_TRUNC becomes an ftruncate the
 * log can undo. */
static int
wrap_open(int dirfd, const char *name, int flags, mode_t mode, int which)
{
    int creating = watched_len > 0 && (flags & (O_CREAT | O_TRUNC));
    int truncating = creating && (flags & O_TRUNC) && (flags & O_ACCMODE) != O_RDONLY;
    struct stat st;
    int existed = 1;
    if (creating) {
        pthread_mutex_lock(&lock);
        existed = fstatat(dirfd, name, &st, 0) == 0;
        flags &= ~O_TRUNC;
    }
    int fd;
    switch (which) {
    case 0:
        fd = real_open(name, flags, mode);
        break;
    case 1:
        fd = real_open64(name, flags, mode);
        break;
    case 2:
        fd = real_openat(dirfd, name, flags, mode);
        break;
    default:
        fd = real_openat64(dirfd, name, flags, mode);
    }
    int saved = errno;
    if (creating) {
        char path[PATH_MAX];
        int is_dir;
        int watched_file = fd >= 0 && watched_path(fd, path, &is_dir) && !is_dir;
        if (watched_file && !existed) {
            struct record rec = {0};
            rec.type = REC_CREATE;
            append(&rec, path, NULL);
        }
        if (fd >= 0 && truncating) {
            if (watched_file) {
                record_truncate(fd, path, 0);
            }
            real_ftruncate(fd, 0);
        }
        pthread_mutex_unlock(&lock);
    }
    errno = saved;
    return fd;
}

static mode_t
mode_arg(int flags, va_list ap)
{
    return ((flags & O_CREAT) || (flags & __O_TMPFILE) == __O_TMPFILE) ? (mode_t)va_arg(ap, int)
                                                                     : 0;
}

int
open(const char *name, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return wrap_open(AT_FDCWD, name, flags, mode, 0);
}

int
open64(const char *name, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return wrap_open(AT_FDCWD, name, flags, mode, 1);
}

int
openat(int dirfd, const char *name, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return wrap_open(dirfd, name, flags, mode, 2);
}

int
openat64(int dirfd, const char *name, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return wrap_open(dirfd, name, flags, mode, 3);
}

int
creat(const char *name, mode_t mode)
{
    return wrap_open(AT_FDCWD, name, O_CREAT | O_WRONLY | O_TRUNC, mode, 0);
}
