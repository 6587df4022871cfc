"""Fork `mxspool serve` processes from one interpreter that has already imported everything.

`mxspool serve` spends ~0.7 s importing before it listens; hundreds of crash points would
spend most of their time there. This process is started once, under LD_PRELOAD of the
power-loss shim (inactive until configured), imports the server, and then forks one child
per request read from stdin (one JSON object per line):

    {"config": PATH, "dir": WATCHED_DIR, "log": LOG, "crash_at": N, "stderr": PATH,
     "python_writer": BOOL, "pragmas": [SQL, ...] or null}

The child points the shim at the watched directory, its log and its crash point, and runs
the real command line (`mxspool --config PATH serve`). "python_writer" makes its store commit
everything through the Python writer (as a build without the C commit thread does);
"pragmas" replaces the store's connection PRAGMAs (negative controls only).

A second argument names a build of mxspool.store._groupcommit to use instead of the
installed one (the mutant of the negative control).

For each request this process writes {"pid": PID} when the child is forked and
{"pid": PID, "status": STATUS} when it has exited (STATUS: exit code, or -signal).
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import sys
import traceback


def main() -> None:
    shim_path = sys.argv[1]
    if len(sys.argv) > 2:
        _load_groupcommit(sys.argv[2])
    import mxspool.cli
    import mxspool.service
    import mxspool.store.sqlite as store_module

    # What `serve` imports when it starts, so that each child starts in a fraction of a second.
    for name in (
        "mxspool.admin",
        "uvloop",
        "uvicorn.protocols.http.h11_impl",
        "uvicorn.lifespan.on",
    ):
        try:
            importlib.import_module(name)
        except ImportError:
            pass

    _die_with_parent()
    shim = ctypes.CDLL(shim_path)
    shim.powerloss_configure.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_long]
    out = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 70
            try:
                _die_with_parent()
                fd = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 2)
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)
                if request.get("python_writer"):
                    store_module.ACCELERATED = False
                if request.get("pragmas"):
                    store_module._WRITER_PRAGMAS = tuple(request["pragmas"])
                if shim.powerloss_configure(
                    request["dir"].encode(), request["log"].encode(), int(request["crash_at"])
                ):
                    raise OSError(f"the shim cannot open its log {request['log']}")
                sys.argv = ["mxspool", "--config", request["config"], "serve"]
                mxspool.cli.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:
                traceback.print_exception(exc)
            finally:
                sys.stderr.flush()
                os._exit(code)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out.write(json.dumps({"pid": pid, "status": code}) + "\n")
        out.flush()


def _die_with_parent() -> None:
    """SIGKILL this process when its parent goes (a test killed mid-run leaves nothing)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(1)


def _load_groupcommit(path: str) -> None:
    """Use the commit thread built at path instead of the installed one (a mutant, for the
    harness's negative control)."""
    import importlib.machinery
    import importlib.util

    name = "mxspool.store._groupcommit"
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[name] = module


if __name__ == "__main__":
    main()
