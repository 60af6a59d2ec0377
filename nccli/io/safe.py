"""The one way nccli writes an output file: a private temporary, renamed when complete.

Every output (a cache, a ``-o`` result file, a ``--plot`` image) is written the same way:

1. the target itself must not be a symbolic link;
2. :class:`OutputLock` takes an exclusive ``flock`` on ``<target>.lock`` (opened with
   ``O_NOFOLLOW``, holding the writer's pid).  A second nccli writing the same target
   refuses with one line naming the first one's pid and never touches its files.  The
   kernel drops a ``flock`` when its process dies, so the lock file a ``kill -9`` leaves
   behind is stale and the next run (``--resume``) simply takes it;
3. the temporary ``<target>.partial`` is created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (a
   link or file planted there is never followed or truncated; a leftover partial of an
   earlier run on the same target is removed first, under the lock);
4. the temporary is renamed onto the target (``os.replace``) only when it is complete,
   after checking that the name still holds the file this writer created;
5. on failure the writer removes only what it created, never a file it did not make.

:func:`atomic_output` does all of it for a text or bytes output; the cache writer
(:mod:`nccli.io.cache.writer`) uses the pieces (:class:`OutputLock`, :func:`clear_stale`,
:func:`same_file`, :func:`remove_created`) because HDF5 opens its file by name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from nccli.errors import DataError

try:  # POSIX; elsewhere the O_EXCL temporary alone keeps writers apart
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DISK_FULL",
    "OutputLock",
    "atomic_output",
    "clear_stale",
    "create_exclusive",
    "file_id",
    "lock_path",
    "partial_path",
    "refuse_link",
    "remove_created",
    "same_file",
]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

FileId = tuple[int, int]
#: errno values of a write that failed for want of space (disk, quota, file-size limit)
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)})


def partial_path(target: str | os.PathLike[str]) -> Path:
    """Where an unfinished ``target`` is written: ``<target>.partial``."""
    p = Path(target)
    return p.with_name(p.name + ".partial")


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of ``target``: ``<target>.lock``."""
    p = Path(target)
    return p.with_name(p.name + ".lock")


def _link_error(path: Path, flag: str) -> DataError:
    return DataError(
        f"{path}: is a symbolic link; nccli does not write through links in the output "
        f"directory, remove it or choose another {flag}"
    )


def refuse_link(path: str | os.PathLike[str], flag: str = "-o") -> None:
    """One line when ``path`` is a symbolic link (dangling or not)."""
    if os.path.islink(path):
        raise _link_error(Path(path), flag)


def file_id(st: os.stat_result) -> FileId:
    return (st.st_dev, st.st_ino)


def same_file(path: str | os.PathLike[str], ident: FileId | None) -> bool:
    """Whether ``path`` (not following a link) is still the file ``ident``."""
    if ident is None:
        return False
    try:
        return file_id(os.lstat(path)) == ident
    except OSError:
        return False


def remove_created(path: str | os.PathLike[str], ident: FileId | None) -> None:
    """Delete ``path`` only if it is still the file this writer created (``ident``)."""
    if same_file(path, ident):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _keep_mode(fd: int, target: Path) -> None:
    """An output that replaces an existing file keeps that file's permission bits (the
    rename gives the target a new inode: a group-writable result stays group-writable)."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        os.fchmod(fd, stat.S_IMODE(st.st_mode))


def create_exclusive(tmp: str | os.PathLike[str], mode: int = 0o644, flag: str = "-o") -> int:
    """Create ``tmp`` for writing; never follows, truncates or reuses what is there."""
    try:
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
    except FileExistsError:
        refuse_link(tmp, flag)
        raise DataError(
            f"{tmp}: appeared while nccli was about to write it (another program writes "
            f"there); remove it or choose another {flag}"
        ) from None


def clear_stale(tmp: str | os.PathLike[str], flag: str = "-o") -> None:
    """Remove the leftover temporary of an earlier run (call it holding the lock).

    A symbolic link is refused, not removed; so is anything but a regular file."""
    try:
        st = os.lstat(tmp)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise _link_error(Path(tmp), flag)
    if not stat.S_ISREG(st.st_mode):
        raise DataError(
            f"{tmp}: is in the way and is not a regular file; remove it or choose another {flag}"
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a name only: a hard link's other names keep their bytes


# --------------------------------------------------------------------------- the lock
_HELD: dict[str, list[int]] = {}  # lock file (absolute) -> [fd, holders in this process]
_HELD_GUARD = threading.Lock()


def _holder_pid(fd: int) -> str:
    """The pid the holder wrote into the lock file (it writes it right after locking)."""
    for _ in range(50):
        with contextlib.suppress(OSError):
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            if text.isdigit():
                return text
        time.sleep(0.01)
    return "unknown"


def _open_lock_file(path: Path, flag: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC | _NONBLOCK, 0o644)
    except OSError:
        refuse_link(path, flag)
        raise  # the directory is missing or not writable: the caller words it
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise DataError(
            f"{path}: is not nccli's lock file (not a regular file, or it has other names); "
            f"remove it or choose another {flag}"
        )
    return fd


def _try_flock(fd: int) -> bool:
    """Take the lock without waiting: False when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:  # a file system without flock: the O_EXCL temporary still guards
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    return True


class OutputLock:
    """An exclusive claim on writing ``target``, held from before its temporary is opened
    until it is renamed into place (or removed).

    Re-entrant within a process: a caller may hold it around a :class:`CacheWriter` that
    takes it again.  Usable as a context manager; :meth:`acquire` raises a one-line
    :class:`~nccli.errors.DataError` (exit 1) when another process holds it.
    """

    def __init__(self, target: str | os.PathLike[str], flag: str = "-o") -> None:
        self.target = Path(target)
        self.path = lock_path(self.target)
        self.flag = flag
        self._key = os.path.abspath(self.path)
        self._held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._held

    def acquire(self) -> OutputLock:
        if self._held:
            return self
        with _HELD_GUARD:
            entry = _HELD.get(self._key)
            if entry is not None:
                entry[1] += 1
            else:
                _HELD[self._key] = [self._lock_fd(), 1]
        self._held = True
        return self

    def _lock_fd(self) -> int:
        if fcntl is None:  # pragma: no cover - Windows
            return -1
        for _ in range(20):
            fd = _open_lock_file(self.path, self.flag)
            try:
                locked = _try_flock(fd)
                if not locked:
                    raise DataError(
                        f"{self.target}: in use by another nccli (pid {_holder_pid(fd)}); wait "
                        f"for it to finish or choose another {self.flag}"
                    )
                # a finishing holder removes the lock file before unlocking it: make sure the
                # file we locked is still the one the name points at
                if same_file(self.path, file_id(os.fstat(fd))):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise DataError(f"{self.path}: cannot take the lock (it keeps changing); try again")

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        with _HELD_GUARD:
            entry = _HELD.get(self._key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _HELD[self._key]
        fd = entry[0]
        if fd < 0:  # pragma: no cover - Windows
            return
        try:
            # remove the name while still locked: a writer that opened it meanwhile sees the
            # name gone (or replaced) once it gets the lock, and tries again
            remove_created(self.path, file_id(os.fstat(fd)))
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- text/bytes
@contextlib.contextmanager
def atomic_output(
    target: str | os.PathLike[str],
    mode: str = "w",
    *,
    flag: str = "-o",
    encoding: str | None = "utf-8",
    newline: str | None = "",
) -> Iterator[IO[Any]]:
    """Write ``target`` through ``<target>.partial``, renamed into place when the block
    ends without an error.

    ``mode`` is ``"w"`` (text; ``encoding``/``newline`` apply) or ``"wb"``.  Refuses (one
    :class:`~nccli.errors.DataError`) when the target or the temporary is a symbolic link
    or another nccli is writing the target; an :class:`OSError` of the write itself (a full
    disk) propagates for the caller to word.  On any failure only the temporary this call
    created is removed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', not {mode!r}")
    target = Path(target)
    tmp = partial_path(target)
    refuse_link(target, flag)
    with OutputLock(target, flag):
        clear_stale(tmp, flag)
        fd = create_exclusive(tmp, flag=flag)
        ident = file_id(os.fstat(fd))
        try:
            _keep_mode(fd, target)
            if mode == "wb":
                fh = os.fdopen(fd, "wb")
            else:
                fh = os.fdopen(fd, "w", encoding=encoding, newline=newline)
        except BaseException:
            os.close(fd)
            remove_created(tmp, ident)
            raise
        try:
            with fh:
                yield fh
            refuse_link(target, flag)
            if not same_file(tmp, ident):
                raise DataError(
                    f"{tmp}: was replaced while nccli wrote it (another program writes there); "
                    f"choose another {flag}"
                )
            os.replace(tmp, target)
        except BaseException:
            remove_created(tmp, ident)
            raise
