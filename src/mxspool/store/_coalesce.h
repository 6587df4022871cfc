/* The commit thread's SQLite VFS: the default one with sequential writes gathered (see
 * _coalesce.c). */
#ifndef MXSPOOL_COALESCE_H
#define MXSPOOL_COALESCE_H

#define COALESCING_VFS_NAME "mxspool-coalesce"

/* Registers the VFS (not as the default); SQLITE_OK, or an error code. Idempotent. */
int coalescing_vfs_register(void);

#endif
