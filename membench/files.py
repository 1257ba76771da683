"""Writing files safely: atomic replacement with ordinary permissions, and a writable-folder check.

Every file membench writes for others to read (result JSON, report tables, maxfit files)
goes through :func:`write_atomic`, so an interrupted write never leaves half a file and
the file gets the permissions a plain ``open(path, "w")`` would give it.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
import threading
from pathlib import Path

from membench.errors import ConfigError

#: ``os.umask`` can only be read by setting it; the lock keeps two membench threads from
#: both seeing the temporary 0 (threads creating files elsewhere meanwhile are not covered,
#: which is why /proc is read first where it exists).
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's file-creation mask, e.g. ``0o022``.

    Returns:
        The umask, read from ``/proc/self/status`` on Linux (no side effect), else by
        setting it to 0 and back under a lock.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Replace ``path`` with ``data`` in one step: a reader sees the old file or the new one.

    The data goes to a temporary file in the same folder (so the rename never crosses
    file systems), is flushed to disk, then renamed over ``path``. ``tempfile`` creates
    private (0600) files; the result is given ``0666 & ~umask`` (0644 under umask 022),
    the mode ``open()`` gives a new file, so other users and tools can read it.

    Args:
        path: The file to write; its folder must exist.
        data: Text (written as UTF-8, newlines unchanged) or bytes.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: The write or the rename failed; no temporary file is left behind.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    # Not ending in path's suffix: a process killed before the rename leaves a file no "*.json" glob reads.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


def check_writable_dir(path: str | Path, key: str = "results_dir") -> Path:
    """Prove that the folder ``path`` can be created (if missing) and written, and leave no trace.

    The proof is a real (unnamed, immediately deleted) temporary file rather than
    ``os.access``: root passes every permission-bit check, yet a read-only mount or a
    path running through a regular file still fails for root too. Folders the probe had
    to create are removed again, so a dry run or a sweep stopped by bad input leaves the
    tree as it found it; the first result written creates them for real.

    Args:
        path: The folder results will be written to.
        key: The config key that gave ``path``, named in the error.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ConfigError: Naming ``key=path``, why it failed and what to do.
    """
    directory = Path(path)
    missing = [folder for folder in (directory, *directory.parents) if not folder.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(
            f"{key}={str(path)!r} is not a folder membench can write to ({reason}: "
            f"{error.filename or directory}); give {key}=<a folder you may create and write to>, "
            f"or fix its permissions"
        ) from None
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break  # not created by us after all, or no longer empty
    return directory


def read_commented_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV file whose lines starting with ``#`` are comments (the reference tables in data/)."""
    lines = [line for line in Path(path).read_text().splitlines() if not line.startswith("#")]
    return list(csv.DictReader(lines))
