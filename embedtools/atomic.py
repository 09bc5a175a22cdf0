"""Atomic replacement of one file on disk: what a save needs so that a crash never leaves a mix.

Apart from the embedtools format (:mod:`embedtools.fileformat`), which only hands this module the
bytes to write: a temp file ``.NAME.XXXXXXXXXXXX.tmp`` beside the target, created exclusively and
held under ``flock`` until it is renamed into place, fsync'd (and the folder after it), replacing only
a regular file; temps that killed saves left are removed without touching a running save's. Also the
typed checks of a store path before anything is read or written (:func:`as_store_path`, :func:`locate`).
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import cast

from embedtools.errors import EmbedtoolsError, InvalidArgumentError, StoreNotFoundError, StoreWriteError, invalid_file

__all__ = ["as_store_path", "atomic_write", "locate", "remove_stale_temp_files", "temp_prefix"]

# A temp file is ``.NAME.XXXXXXXXXXXX.tmp`` (12 hex digits) beside the target, NAME cut to this many
# A temp file is ``.NAME.XXXXXXXXXXXX.tmp`` (12 hex digits) beside the target, NAME cut to this many
# bytes so that a target name the filesystem accepts (up to 255 bytes) still has a temp name it accepts.
_TEMP_NAME_BYTES = 200
_TEMP_TOKEN_HEX = 12
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def temp_prefix(name: str) -> str:
    """The NAME in ``.NAME.XXXXXXXXXXXX.tmp``: the target's file name, cut to 200 bytes if longer.

    Cut because the temp name is 18 bytes longer than NAME, and a 240-byte target name (which the
    filesystem accepts) would otherwise give a temp name it refuses.
    """
    prefix = name
    while len(os.fsencode(prefix)) > _TEMP_NAME_BYTES:
        prefix = prefix[:-1]
    return prefix


def _is_temp_of(entry: str, prefix: str) -> bool:
    head = f".{prefix}."
    if not (entry.startswith(head) and entry.endswith(".tmp")):
        return False
    token = entry[len(head) : -len(".tmp")]
    return len(token) == _TEMP_TOKEN_HEX and all(c in "0123456789abcdef" for c in token)


def as_store_path(path: object) -> Path:
    """``path`` as a ``Path``, or an :class:`InvalidArgumentError` naming what is wrong with it.

    Checked up front so that ``save(5)`` or a NUL in the name is a typed error before anything is
    written, not a ``TypeError``/``ValueError`` from deep inside ``os``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"a store path must be a str or os.PathLike, not {type(path).__name__}")
    # isinstance leaves the PathLike type argument unknown; os.fspath itself refuses all but str and bytes
    text = os.fspath(cast("str | os.PathLike[str] | os.PathLike[bytes]", path))
    if not isinstance(text, str):
        raise InvalidArgumentError(f"a store path must be text, not {type(text).__name__}")
    if not text:
        raise InvalidArgumentError("a store path must not be empty")
    if "\0" in text:
        raise InvalidArgumentError(f"a store path must not contain a NUL character: {text!r}")
    return Path(text)


def _write_error(target: Path, exc: OSError) -> StoreWriteError:
    error = StoreWriteError(f"cannot save {target}: {exc.strerror or exc}")
    error.errno = exc.errno
    return error


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symlink"))
    return next((name for test, name in kinds if test(mode)), "special file")


def _replaceable(target: Path) -> Path:
    """The file a save of ``target`` replaces: ``target``, or the regular file a symlink there names.

    Only a regular file (or nothing) may be replaced: ``os.replace`` would swap a FIFO, a device or a
    socket for a regular file. A symlink to a regular file is followed, so the link stays and what it
    points at is replaced (as ``open(path, "w")`` would write through it); any other symlink is refused.
    """
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        if not target.parent.is_dir():
            raise StoreNotFoundError(f"folder {target.parent} does not exist") from None
        return target
    except NotADirectoryError:
        raise StoreNotFoundError(f"{target.parent} is not a folder") from None
    except OSError as exc:
        raise _write_error(target, exc) from None
    if stat.S_ISLNK(info.st_mode):
        resolved = Path(os.path.realpath(target))
        try:
            final = os.stat(resolved)
        except OSError:
            raise InvalidArgumentError(f"{target} is a symlink to {resolved}, which does not exist; save replaces only regular files") from None
        if not stat.S_ISREG(final.st_mode):
            raise InvalidArgumentError(f"{target} is a symlink to a {_kind(final.st_mode)}; save replaces only regular files")
        return resolved
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgumentError(f"{target} is a {_kind(info.st_mode)}; save writes one regular file")
    return target


def _recheck(target: Path) -> None:
    """Refuse if ``target`` became something other than a regular file while the temp was written."""
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgumentError(f"{target} is now a {_kind(info.st_mode)}; save replaces only regular files")


def _lock(fd: int, *, wait: bool) -> None:
    if sys.platform == "win32":  # pragma: no cover
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_stale_temp_files(path: str | os.PathLike[str]) -> tuple[Path, ...]:
    """Delete the ``.NAME.XXXXXXXXXXXX.tmp`` files that killed saves of ``path`` left; return them.

    A save holds an exclusive ``flock`` on its temp file from creation until it is renamed into place,
    so only temps that no live process holds are deleted: a save running right now in another process
    is never touched, however slow. Every ``save`` calls this first (freeing the space before writing);
    call it yourself to tidy a folder. Where ``flock`` does not exist (Windows), nothing is deleted.
    """
    target = as_store_path(path)
    if sys.platform == "win32":  # pragma: no cover - no flock: a running save cannot be told apart
        return ()
    prefix = temp_prefix(target.name)
    try:
        names = [entry.name for entry in os.scandir(target.parent) if _is_temp_of(entry.name, prefix)]
    except OSError:
        return ()
    removed: list[Path] = []
    for name in sorted(names):
        tmp = target.parent / name
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC)
        except OSError:
            continue
        try:
            held = os.fstat(fd)
            if not stat.S_ISREG(held.st_mode):
                continue
            _lock(fd, wait=False)  # raises while a save holds it
            now = os.lstat(tmp)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                os.unlink(tmp)
                removed.append(tmp)
        except OSError:
            continue
        finally:
            os.close(fd)
    return tuple(removed)


def _create_temp(target: Path) -> tuple[int, Path]:
    """A new temp file beside ``target``, open for writing and locked against cleanup."""
    prefix = temp_prefix(target.name)
    for _ in range(100):
        tmp = target.parent / f".{prefix}.{secrets.token_hex(_TEMP_TOKEN_HEX // 2)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _write_error(target, exc) from None
        try:
            try:
                _lock(fd, wait=True)
            except OSError:  # a filesystem without flock: a cleanup's lock fails there too, so it skips this
                pass
            held, now = os.fstat(fd), os.lstat(tmp)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd, tmp
        except FileNotFoundError:
            pass  # another process's cleanup took it between creation and lock: take another name
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise _write_error(target, exc) from None
        os.close(fd)
    raise StoreWriteError(f"cannot save {target}: no free temp file name beside it")


def _write_all(fd: int, chunk: bytes | memoryview) -> None:
    view = memoryview(chunk).cast("B")
    while view:
        view = view[os.write(fd, view[: 1 << 26]) :]


def atomic_write(path: str | os.PathLike[str], chunks: Iterable[bytes | memoryview]) -> None:
    """Write ``chunks`` to a temp file beside ``path``, fsync it, then ``os.replace`` it into place.

    A crash at any moment leaves the old file or the new one, never a mix, and at worst one
    ``.NAME.XXXXXXXXXXXX.tmp`` (see :func:`temp_prefix`), which the next save of ``path`` removes; on
    an exception the temp file is removed and ``path`` is untouched. Only a regular file (or a symlink
    to one, whose target is replaced) is replaced. OS failures are :class:`StoreWriteError`. The new
    file's mode follows the umask, as ``open`` would. ``chunks`` is consumed lazily, so a caller can
    stream large arrays without copying them.
    """
    target = _replaceable(as_store_path(path))
    remove_stale_temp_files(target)
    fd, tmp = _create_temp(target)
    try:
        for chunk in chunks:
            _write_all(fd, chunk)
        os.fsync(fd)
        _recheck(target)
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        os.close(fd)
        if isinstance(exc, OSError) and not isinstance(exc, EmbedtoolsError):
            raise _write_error(target, exc) from None
        raise
    os.close(fd)  # releases the lock only now: the temp name is gone, so no cleanup can race the rename
    _fsync_folder(target.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def locate(path: object) -> tuple[Path, bool]:
    """A store to read: its ``Path`` and whether it is a folder (a seed store), checked before
    anything is read — a FIFO or a device would block a reader or stream forever, and a name the
    filesystem refuses is no store either: typed errors, not ``OSError`` from deep inside ``os``."""
    target = as_store_path(path)
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        raise StoreNotFoundError(f"no store at {target}") from None
    except OSError as exc:  # a name over the filesystem's limit, a folder we may not search
        raise StoreNotFoundError(f"no store at {target}: {exc.strerror or exc}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise invalid_file(target, f"a {_kind(mode)}, not a regular file")
    return target, stat.S_ISDIR(mode)
