/*
 * A SQLite VFS that coalesces sequential writes, for the commit thread's connection only.
 *
 * Why: SQLite writes each WAL frame as two pwrite calls (a 24-byte header, then the page), so a
 * 100 KiB message is some 50 system calls at commit, and a checkpoint writes the main file a
 * page at a time. Measured under load, those calls were over 40% of the commit thread's time.
 * This shim wraps the default (unix) VFS: writes that continue exactly where the previous
 * one ended are gathered in a buffer and reach the OS as one pwrite.
 *
 * Safety: the buffer is written out before anything that could observe the file or make it
 * durable: xSync, xRead, xTruncate, xFileSize, xLock, xUnlock, xFileControl, xFetch, xClose,
 * and before any write that does not continue it (so writes still land in their order). With
 * synchronous=FULL (enforced by the caller) SQLite syncs the WAL after the commit frame and
 * before it publishes the frames in the wal-index, so other connections only ever read frames
 * that have been written. A failed buffered write surfaces at the next of those calls, which
 * fails the transaction as a failed pwrite would have. Locking is the unix VFS's own (the
 * shim calls it), so this connection and the process's other connections share it.
 */
#include <sqlite3.h>
#include <string.h>

#include "_coalesce.h"

#define BUFFER_SIZE (1 << 20)
/* The unix VFS writes at most 128 KiB - 1 bytes per call (it masks the length), so a flush
 * goes out in pieces of 124 KiB: still one system call per ~30 pages instead of two per page. */
#define MAX_WRITE (124 * 1024)

typedef struct {
    sqlite3_file base;
    sqlite3_file *real; /* the unix VFS's file object, right after this struct */
    char *buffer;       /* NULL: a file that is not buffered */
    sqlite3_int64 start;
    int used;
} CoalescingFile;

static sqlite3_vfs *real_vfs;

#define REAL(file) (((CoalescingFile *)(file))->real)

static int
flush(CoalescingFile *f)
{
    int rc = SQLITE_OK;
    for (int done = 0; done < f->used && rc == SQLITE_OK; done += MAX_WRITE) {
        int amount = f->used - done < MAX_WRITE ? f->used - done : MAX_WRITE;
        rc = f->real->pMethods->xWrite(f->real, f->buffer + done, amount, f->start + done);
    }
    f->used = 0;
    return rc;
}

static int
c_close(sqlite3_file *file)
{
    CoalescingFile *f = (CoalescingFile *)file;
    int rc = flush(f);
    int rc2 = f->real->pMethods->xClose(f->real);
    sqlite3_free(f->buffer);
    f->buffer = NULL;
    return rc != SQLITE_OK ? rc : rc2;
}

static int
c_read(sqlite3_file *file, void *out, int amount, sqlite3_int64 offset)
{
    int rc = flush((CoalescingFile *)file);
    return rc != SQLITE_OK ? rc : REAL(file)->pMethods->xRead(REAL(file), out, amount, offset);
}

static int
c_write(sqlite3_file *file, const void *data, int amount, sqlite3_int64 offset)
{
    CoalescingFile *f = (CoalescingFile *)file;
    if (f->buffer == NULL) {
        return f->real->pMethods->xWrite(f->real, data, amount, offset);
    }
    if (f->used > 0 && offset == f->start + f->used && f->used + amount <= BUFFER_SIZE) {
        memcpy(f->buffer + f->used, data, (size_t)amount);
        f->used += amount;
        return SQLITE_OK;
    }
    int rc = flush(f);
    if (rc != SQLITE_OK) {
        return rc;
    }
    if (amount > MAX_WRITE) {
        return f->real->pMethods->xWrite(f->real, data, amount, offset);
    }
    memcpy(f->buffer, data, (size_t)amount);
    f->start = offset;
    f->used = amount;
    return SQLITE_OK;
}

static int
c_truncate(sqlite3_file *file, sqlite3_int64 size)
{
    int rc = flush((CoalescingFile *)file);
    return rc != SQLITE_OK ? rc : REAL(file)->pMethods->xTruncate(REAL(file), size);
}

static int
c_sync(sqlite3_file *file, int flags)
{
    int rc = flush((CoalescingFile *)file);
    return rc != SQLITE_OK ? rc : REAL(file)->pMethods->xSync(REAL(file), flags);
}

static int
c_file_size(sqlite3_file *file, sqlite3_int64 *size)
{
    int rc = flush((CoalescingFile *)file);
    return rc != SQLITE_OK ? rc : REAL(file)->pMethods->xFileSize(REAL(file), size);
}

static int
c_lock(sqlite3_file *file, int level)
{
    int rc = flush((CoalescingFile *)file);
    return rc != SQLITE_OK ? rc : REAL(file)->pMethods->xLock(REAL(file), level);
}

static int
c_unlock(sqlite3_file *file, int level)
{
    int rc = flush((CoalescingFile *)file);
    return rc != SQLITE_OK ? rc : REAL(file)->pMethods->xUnlock(REAL(file), level);
}

static int
c_check_reserved_lock(sqlite3_file *file, int *out)
{
    return REAL(file)->pMethods->xCheckReservedLock(REAL(file), out);
}

static int
c_file_control(sqlite3_file *file, int op, void *arg)
{
    int rc = flush((CoalescingFile *)file);
    return rc != SQLITE_OK ? rc : REAL(file)->pMethods->xFileControl(REAL(file), op, arg);
}

static int
c_sector_size(sqlite3_file *file)
{
    return REAL(file)->pMethods->xSectorSize(REAL(file));
}

static int
c_device_characteristics(sqlite3_file *file)
{
    return REAL(file)->pMethods->xDeviceCharacteristics(REAL(file));
}

static int
c_shm_map(sqlite3_file *file, int region, int size, int extend, void volatile **out)
{
    return REAL(file)->pMethods->xShmMap(REAL(file), region, size, extend, out);
}

static int
c_shm_lock(sqlite3_file *file, int offset, int n, int flags)
{
    return REAL(file)->pMethods->xShmLock(REAL(file), offset, n, flags);
}

static void
c_shm_barrier(sqlite3_file *file)
{
    REAL(file)->pMethods->xShmBarrier(REAL(file));
}

static int
c_shm_unmap(sqlite3_file *file, int delete_flag)
{
    return REAL(file)->pMethods->xShmUnmap(REAL(file), delete_flag);
}

static int
c_fetch(sqlite3_file *file, sqlite3_int64 offset, int amount, void **out)
{
    int rc = flush((CoalescingFile *)file);
    return rc != SQLITE_OK ? rc : REAL(file)->pMethods->xFetch(REAL(file), offset, amount, out);
}

static int
c_unfetch(sqlite3_file *file, sqlite3_int64 offset, void *page)
{
    return REAL(file)->pMethods->xUnfetch(REAL(file), offset, page);
}

static const sqlite3_io_methods coalescing_methods = {
    3,
    c_close,
    c_read,
    c_write,
    c_truncate,
    c_sync,
    c_file_size,
    c_lock,
    c_unlock,
    c_check_reserved_lock,
    c_file_control,
    c_sector_size,
    c_device_characteristics,
    c_shm_map,
    c_shm_lock,
    c_shm_barrier,
    c_shm_unmap,
    c_fetch,
    c_unfetch,
};

static int
c_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *file, int flags, int *out_flags)
{
    CoalescingFile *f = (CoalescingFile *)file;
    memset(f, 0, sizeof *f);
    f->real = (sqlite3_file *)&f[1];
    int rc = real_vfs->xOpen(real_vfs, name, f->real, flags, out_flags);
    if (rc != SQLITE_OK || f->real->pMethods == NULL) {
        /* SQLite closes a file only if its pMethods is set. */
        if (f->real->pMethods != NULL) {
            f->real->pMethods->xClose(f->real);
        }
        f->base.pMethods = NULL;
        return rc != SQLITE_OK ? rc : SQLITE_CANTOPEN;
    }
    if (f->real->pMethods->iVersion < 3) {
        /* Our methods forward version-3 calls (shared memory, mmap): a VFS without them is not
         * the unix VFS this shim was written for. */
        f->real->pMethods->xClose(f->real);
        f->base.pMethods = NULL;
        return SQLITE_CANTOPEN;
    }
    if (flags & (SQLITE_OPEN_WAL | SQLITE_OPEN_MAIN_DB)) {
        f->buffer = sqlite3_malloc(BUFFER_SIZE);
        if (f->buffer == NULL) {
            f->real->pMethods->xClose(f->real);
            f->base.pMethods = NULL;
            return SQLITE_NOMEM;
        }
    }
    f->base.pMethods = &coalescing_methods;
    return SQLITE_OK;
}

/* Everything else about files and the system is the real VFS's. */
static int
c_delete(sqlite3_vfs *vfs, const char *name, int sync_dir)
{
    return real_vfs->xDelete(real_vfs, name, sync_dir);
}

static int
c_access(sqlite3_vfs *vfs, const char *name, int flags, int *out)
{
    return real_vfs->xAccess(real_vfs, name, flags, out);
}

static int
c_full_pathname(sqlite3_vfs *vfs, const char *name, int size, char *out)
{
    return real_vfs->xFullPathname(real_vfs, name, size, out);
}

static void *
c_dl_open(sqlite3_vfs *vfs, const char *name)
{
    return real_vfs->xDlOpen(real_vfs, name);
}

static void
c_dl_error(sqlite3_vfs *vfs, int size, char *out)
{
    real_vfs->xDlError(real_vfs, size, out);
}

static void (*c_dl_sym(sqlite3_vfs *vfs, void *handle, const char *symbol))(void)
{
    return real_vfs->xDlSym(real_vfs, handle, symbol);
}

static void
c_dl_close(sqlite3_vfs *vfs, void *handle)
{
    real_vfs->xDlClose(real_vfs, handle);
}

static int
c_randomness(sqlite3_vfs *vfs, int size, char *out)
{
    return real_vfs->xRandomness(real_vfs, size, out);
}

static int
c_sleep(sqlite3_vfs *vfs, int microseconds)
{
    return real_vfs->xSleep(real_vfs, microseconds);
}

static int
c_current_time(sqlite3_vfs *vfs, double *out)
{
    return real_vfs->xCurrentTime(real_vfs, out);
}

static int
c_get_last_error(sqlite3_vfs *vfs, int size, char *out)
{
    return real_vfs->xGetLastError(real_vfs, size, out);
}

static int
c_current_time_int64(sqlite3_vfs *vfs, sqlite3_int64 *out)
{
    return real_vfs->xCurrentTimeInt64(real_vfs, out);
}

static sqlite3_vfs coalescing_vfs = {
    2,    /* iVersion */
    0,    /* szOsFile: set at registration */
    0,    /* mxPathname: set at registration */
    NULL, /* pNext */
    COALESCING_VFS_NAME,
    NULL, /* pAppData */
    c_open,
    c_delete,
    c_access,
    c_full_pathname,
    c_dl_open,
    c_dl_error,
    c_dl_sym,
    c_dl_close,
    c_randomness,
    c_sleep,
    c_current_time,
    c_get_last_error,
    c_current_time_int64,
};

int
coalescing_vfs_register(void)
{
    if (real_vfs != NULL) {
        return SQLITE_OK;
    }
    sqlite3_vfs *found = sqlite3_vfs_find(NULL);
    if (found == NULL || found->iVersion < 2) {
        return SQLITE_ERROR;
    }
    real_vfs = found;
    coalescing_vfs.szOsFile = (int)sizeof(CoalescingFile) + found->szOsFile;
    coalescing_vfs.mxPathname = found->mxPathname;
    return sqlite3_vfs_register(&coalescing_vfs, 0);
}
