"""What a batch of input holds, as a digest, and whether a file changed while it was read.

A batch's digest (blake2b, 8 bytes) is fed per segment (the rows a batch takes from one file) the same
way by the scan and by Source.batches(): the file's path, then for JSONL each line's bytes (and its
number wherever numbering jumps: blank lines move line numbers, which bad-row ids and origins use),
for Parquet the file's content hash and the row range. A file's stamp is (size, mtime_ns, inode).
"""
from __future__ import annotations

import hashlib
import os

from ..errors import InputChangedError, InputError
from . import storage
from .formats import File, open_binary


class BatchHash:
    """One batch's content digest, fed per segment the same way by the scan and by batches()."""

    __slots__ = ("h", "next")

    def __init__(self) -> None:
        self.h = hashlib.blake2b(digest_size=8)
        self.next = -1  # the line number expected next; any other is hashed (blank lines move line numbers)

    def file(self, f: File) -> None:
        self.h.update(b"\0file\0" + f.path.encode() + b"\0")
        self.next = -1

    def gap(self, line: int) -> None:
        self.h.update(b"\0line\0" + line.to_bytes(8, "little"))

    def line(self, line: int, raw: bytes) -> None:
        if line != self.next:
            self.gap(line)
        self.h.update(raw)
        self.next = line + 1

    def rows(self, f: File, start: int, n: int) -> None:
        self.h.update(f.content_hash + start.to_bytes(8, "little") + n.to_bytes(8, "little"))

    def digest(self) -> bytes:
        return self.h.digest()


def stamp(f: File) -> tuple[int, int, int]:
    """(size, mtime_ns, inode); an object in s3:// or gs:// has no inode (0)."""
    if storage.is_remote(f.path):
        size, mtime_ns = storage.stat(f.path, f.options)
        return size, mtime_ns, 0
    st = os.stat(f.path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def check_stamp(f: File) -> None:
    try:
        now: tuple[int, int, int] | None = stamp(f)
    except (OSError, InputError):
        now = None
    if now != f.stamp:
        raise InputChangedError(f.path, "its size, modification time or inode changed")


def file_hash(f: File) -> bytes:
    """A Parquet file's content hash (its rows are hashed as a whole: files are written whole)."""
    h = hashlib.blake2b(digest_size=16)
    with open_binary(f.path, f.options) as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.digest()
