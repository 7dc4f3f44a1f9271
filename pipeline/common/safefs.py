"""Creating files in a folder others may write to, without ever writing through a link.

The output folder may be shared (other jobs, other users), and runs are often root: a symlink planted at
`.lock`, `manifest.json.tmp` or `store.sqlite` must not make us truncate or overwrite its target. So every
file this package creates in output.dir goes through here:

- new files are opened with O_CREAT | O_EXCL | O_NOFOLLOW (never an existing file, never a link), and
  temporary files get unpredictable names, so nobody can plant a link at the name in advance;
- files reopened (the lock) use O_NOFOLLOW and must be regular files with one link (no hard link to a
  victim), checked with fstat on the open descriptor;
- finished files are renamed into place with os.replace, which replaces a link at the destination
  itself, never its target;
- folders (parts/) and SQLite files, which other code opens by path, are checked with lstat first.

`output.dir` itself may be a symlink (people keep outputs on another disk): only what is inside it
is held to these rules.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import UnsafePathError

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC


def refuse(path: str | os.PathLike[str], what: str) -> UnsafePathError:
    return UnsafePathError(
        f"{path} is {what}; the runner never writes through links in the output folder (someone may have "
        "planted it). Remove it, or choose another output.dir with --set output.dir=...")


def check_not_link(path: str | os.PathLike[str]) -> None:
    """UnsafePathError when `path` exists as a symlink (checked without following it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise refuse(path, "a symbolic link")


def ensure_dir(path: str | os.PathLike[str]) -> None:
    """Create a folder inside output.dir, or accept an existing real one (never a link to elsewhere)."""
    check_not_link(path)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise refuse(path, "not a folder") from None


def open_new(path: str | os.PathLike[str], mode: int = 0o644) -> int:
    """A new file's descriptor; refuses an existing file or link at that name."""
    try:
        return os.open(path, NEW_FILE, mode)
    except FileExistsError:
        raise refuse(path, "already there (a leftover or a planted file)") from None


def open_regular(path: str | os.PathLike[str], flags: int, mode: int = 0o644) -> int:
    """Open (or create) a file that must be a plain regular file of ours: no link, no hard link."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC, mode)
    except OSError as exc:
        if os.path.islink(path):
            raise refuse(path, "a symbolic link") from None
        raise exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise refuse(path, "not a plain file (a device, a FIFO or a hard link to another file)")
    os.set_blocking(fd, True)
    return fd


def open_read(path: str | os.PathLike[str]) -> BinaryIO | None:
    """A file of ours to read back (outputs, parts), or None when the name holds nothing of ours: missing,
    a link (never followed: reading through it could leak or choke on another file) or not a regular file.
    What was planted there is replaced, not read, when the run writes that name again."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) or os.path.islink(path):
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def temp_name(dest: str | os.PathLike[str]) -> Path:
    """An unpredictable sibling name for a temporary file, ending in .tmp."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.{secrets.token_hex(8)}.tmp")


@contextlib.contextmanager
def atomic_writer(dest: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A file object on a new temporary file; on success it is fsynced and renamed onto `dest`.

    On an exception the temporary file is removed and `dest` is untouched. A link at `dest` is
    replaced by the file (rename acts on the name), never followed."""
    tmp = temp_name(dest)
    fh = os.fdopen(open_new(tmp), "wb")
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(dest: str | os.PathLike[str], data: bytes) -> None:
    with atomic_writer(dest) as fh:
        fh.write(data)


def write_new(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a file that must not exist yet (a report named by time, say)."""
    with os.fdopen(open_new(path), "wb") as fh:
        fh.write(data)
