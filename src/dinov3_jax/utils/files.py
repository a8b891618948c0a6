"""Writing files so that an interrupted write never leaves a partial or truncated file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; when the block succeeds it is renamed onto
    `path` (atomic on one file system) with the usual umask-based mode (safetensors creates 0600
    files). On an error, or a kill, `path` keeps its old content and the temporary file goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The suffix is kept last, because numpy and torch add or inspect it.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def writable_folder(path: str | os.PathLike, what: str) -> Path:
    """`path` as a folder this process can write into (made when missing), or a ValueError in one
    line naming `what` and the path (a file in the way, a read-only or unreachable place)."""
    import tempfile

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be written to: {err.strerror or err}") from None
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on `folder` (a `.lock` file held with `flock`) for as long as the block
    runs: a second process gets `FolderInUse` naming the holder's PID and host. The OS drops the
    lock when its holder exits or dies, so a crashed run never leaves the folder locked."""
    import fcntl
    import socket
    import time

    path = Path(folder) / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "an unknown process"
            raise FolderInUse(
                f"{folder} is in use by another run ({holder}); wait for it to finish or choose another folder"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
