/*
 * libFuzzer harness for the SQLite store's commit thread (src/mxspool/store/_groupcommit.c)
 * and its coalescing VFS (_coalesce.c, compiled alongside), built with ASan + UBSan.
 *
 * The module is compiled into this executable, instrumented, and installed in sys.modules as
 * mxspool.store._groupcommit; commit_target.py's one() then drives it through its Python API
 * (the Committer directly, and the store's accept path) and checks the rows read back.
 * Coverage comes from the C code: value types and sizes, batch splits, failing rows, the
 * database held by Python while jobs queue, and the VFS's write gathering for small and large
 * bodies.
 */
#include "_groupcommit.c" /* first: Python.h sets the feature macros */
#include <stdint.h>
#include "pyembed.h"

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    start_python("commit_target", "mxspool.store._groupcommit", PyInit__groupcommit);
    return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    run_python_target(data, size);
    return 0;
}
