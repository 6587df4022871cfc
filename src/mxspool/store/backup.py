"""Backups and restores of the SQLite spool, taken while the server runs.

Backup: SQLite's online backup API copies the live file page by page into a temporary file next
to the destination, which is then fsynced and linked (or, with ``force``, renamed) into place,
and the directory fsynced. The copy is one consistent snapshot: the backup runs in one step
(``pages=-1``), which is one read transaction. In WAL mode (the store's journal mode, see
``store.sqlite._WRITER_PRAGMAS``) a reader never blocks the writer, so intake goes on committing
throughout; it only keeps the checkpointer from recycling the WAL until the copy ends. A backup
in many small steps would be no kinder here and worse: the API restarts the copy whenever
another connection writes between two steps, and under steady intake it would never finish.
Everything committed (hence acknowledged with a ``250``) before the backup starts is in it.

Restore: refuses while a server holds the spool's lock (``store.serverlock``), checks the file
(``PRAGMA integrity_check``, an mxspool schema no newer than this version knows), copies it next
to the spool, fsyncs it, sets the current spool aside (its WAL checkpointed into it first, so the
set-aside file is complete on its own) and renames the copy into place. The backup file itself
is left untouched, so the same backup can be restored again.

PostgreSQL has its own tools, which do this better than we could: ``pg_dump`` and
``pg_restore`` (``POSTGRES_RECIPE``).
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from mxspool.store.base import StoreError
from mxspool.store.schema import migration_scripts
from mxspool.store.serverlock import SpoolLock

POSTGRES_RECIPE = """\
PostgreSQL stores are backed up with PostgreSQL's own tools, online and consistent:

    pg_dump --format=custom --file=mxspool-$(date +%Y%m%d-%H%M).dump "$URL"

and restored (servers stopped) into an empty database:

    createdb mxspool_restored
    pg_restore --exit-on-error --no-owner --dbname=mxspool_restored mxspool-YYYYMMDD-HHMM.dump

then point [store] url at the restored database and start the servers.
"""


class BackupError(StoreError):
    """A backup or restore did not happen; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    messages: int
    bytes: int
    seconds: float


@dataclass(frozen=True, slots=True)
class RestoreResult:
    path: Path
    messages: int
    bytes: int
    schema_version: int
    previous: Path | None
    """Where the replaced spool was set aside; None when there was none."""


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(final: Path, what: str) -> Path:
    return final.with_name(f".{final.name}.{what}-{os.getpid()}")


def _count_messages(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


def backup_sqlite(spool: Path, destination: Path, force: bool = False) -> BackupResult:
    """Copy the live spool to ``destination`` (see the module docstring)."""
    if not spool.exists():
        raise BackupError(f"there is no spool at {spool}; check [store] url in the configuration")
    if destination.exists() and not force:
        raise BackupError(
            f"{destination} exists; choose another name, or add --force to replace it"
        )
    if not destination.parent.is_dir():
        raise BackupError(f"the directory {destination.parent} does not exist; create it first")
    temp = _temp_name(destination, "backup")
    started = time.monotonic()
    try:
        source = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
        try:
            source.execute("PRAGMA busy_timeout = 10000")
            target = sqlite3.connect(temp)
            try:
                source.backup(target, pages=-1)  # one step: one snapshot (module docstring)
            finally:
                target.close()
        finally:
            source.close()
        _fsync_path(temp)
        if force:
            os.replace(temp, destination)
        else:
            # link(2) fails if the name exists: never overwrites, even in a race.
            os.link(temp, destination)
            temp.unlink()
        _fsync_path(destination.parent, directory=True)
    except FileExistsError:
        raise BackupError(
            f"{destination} appeared during the backup; choose another name, or add --force"
        ) from None
    except (OSError, sqlite3.Error) as exc:
        raise BackupError(
            f"the backup to {destination} failed: {exc}; check the free space and permissions "
            "of its directory"
        ) from exc
    finally:
        temp.unlink(missing_ok=True)
    seconds = time.monotonic() - started
    return BackupResult(
        destination, _count_messages(destination), destination.stat().st_size, seconds
    )


def latest_schema_version() -> int:
    """The newest SQLite schema this mxspool knows."""
    return max(version for version, _script in migration_scripts("sqlite"))


def check_backup(path: Path) -> tuple[int, int]:
    """(schema version, messages) of a backup file; BackupError when it is not a sound spool."""
    if not path.is_file():
        raise BackupError(f"there is no file {path}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            verdict = [row[0] for row in conn.execute("PRAGMA integrity_check(20)")]
            if verdict != ["ok"]:
                raise BackupError(
                    f"{path} fails SQLite's integrity check ({'; '.join(verdict)[:500]}); it "
                    "cannot be restored: use another backup"
                )
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            messages = (
                int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
                if "messages" in tables
                else 0
            )
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{path} is not a readable SQLite database ({exc})") from exc
    if version < 1 or not {"messages", "recipients", "bodies", "domains"} <= tables:
        raise BackupError(f"{path} is not an mxspool spool (no mxspool schema in it)")
    newest = latest_schema_version()
    if version > newest:
        raise BackupError(
            f"{path} has schema version {version}, newer than this mxspool knows ({newest}); "
            "restore it with the mxspool version that made it, or a newer one"
        )
    return version, messages


def _set_aside(spool: Path) -> Path | None:
    """Move the current spool (WAL folded in) out of the way; where it went."""
    if not spool.exists():
        return None
    conn = sqlite3.connect(spool)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode = DELETE")  # removes the -wal and -shm files
    finally:
        conn.close()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    aside = spool.with_name(f"{spool.name}.before-restore-{stamp}")
    os.rename(spool, aside)
    for suffix in ("-wal", "-shm", "-journal"):
        Path(f"{spool}{suffix}").unlink(missing_ok=True)
    return aside


def restore_sqlite(backup: Path, spool: Path) -> RestoreResult:
    """Replace the spool with ``backup`` (see the module docstring)."""
    with SpoolLock(spool, "mxspool restore"):
        version, messages = check_backup(backup)
        temp = _temp_name(spool, "restore")
        try:
            spool.parent.mkdir(parents=True, exist_ok=True)
            source = sqlite3.connect(f"file:{backup}?mode=ro", uri=True)
            try:
                target = sqlite3.connect(temp)
                try:
                    source.backup(target, pages=-1)
                    target.execute("PRAGMA journal_mode = WAL")  # as the store runs it
                finally:
                    target.close()
            finally:
                source.close()
            _fsync_path(temp)
            previous = _set_aside(spool)
            os.rename(temp, spool)
            _fsync_path(spool.parent, directory=True)
        except (OSError, sqlite3.Error) as exc:
            raise BackupError(
                f"the restore into {spool} failed: {exc}; the spool was not replaced unless "
                "a file named like it .before-restore-* exists next to it"
            ) from exc
        finally:
            temp.unlink(missing_ok=True)
    return RestoreResult(spool, messages, spool.stat().st_size, version, previous)
