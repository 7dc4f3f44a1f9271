"""Object storage: s3:// and gs:// paths through pyarrow filesystems, for input, publishing and Ray outputs.

Credentials and endpoint come from the standard chain (environment, ~/.aws/config, instance roles;
for GCS the application default credentials), with two corrections:
- `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` are honoured: a bare `pyarrow.fs.S3FileSystem()` ignores
  them (apache/arrow#49643), so we pass them as `endpoint_override` (with its scheme) ourselves;
- `storage_options` (input.storage_options / output.storage_options) override any argument of
  S3FileSystem / GcsFileSystem. Their values may be secrets: no message here ever shows a value.

Writes are complete-or-absent per file: an object store shows an object only once its upload completed,
so `put_file` uploads under a temporary key and moves it (a server-side copy) to the final key;
`write_bytes` is one PUT of the whole body. A local path goes through a temporary file and a rename,
both through state/safefs.py (the output folder may be shared: no file or folder below `root` is
written through a link).
"""
from __future__ import annotations

import fnmatch
import io
import os
import shutil
import uuid
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from ..common import safefs
from ..errors import ConfigError, InputError

SCHEMES = ("s3", "gs", "gcs")
_COPY_CHUNK = 8 << 20


def is_remote(path: str) -> bool:
    return urlsplit(path).scheme in SCHEMES and "://" in path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_remote(base) else os.path.join(base, *parts)


def filesystem(uri: str, options: dict[str, Any] | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem for `uri` and the path inside it ("bucket/key")."""
    parts = urlsplit(uri)
    path = (parts.netloc + parts.path).rstrip("/")
    return _cached_fs(parts.scheme, tuple(sorted((options or {}).items()))), path


@lru_cache(maxsize=16)
def _cached_fs(scheme: str, options: tuple[tuple[str, Any], ...]) -> pafs.FileSystem:
    kwargs = dict(options)
    if scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_override" not in kwargs:
            ep = urlsplit(endpoint)
            kwargs["endpoint_override"] = ep.netloc or endpoint
            kwargs.setdefault("scheme", ep.scheme or "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region and "region" not in kwargs:
            kwargs["region"] = region
        make: Any = pafs.S3FileSystem
    else:
        make = pafs.GcsFileSystem
    try:
        return make(**kwargs)
    except TypeError as exc:
        names = ", ".join(sorted(kwargs))  # names only: values may be secrets
        raise ConfigError(f"storage_options for {scheme}:// take pyarrow {make.__name__} arguments; "
                          f"one of these is not: {names} ({str(exc).split(':')[0]})", key="storage_options") from None


def expand(uri: str, options: dict[str, Any] | None = None) -> tuple[list[tuple[str, int]], bool]:
    """(uri, size) of the files `uri` names, sorted, and whether it named them explicitly (a file or a
    pattern) rather than as a folder. `**` in a pattern crosses folders, `*` does not."""
    fs, path = filesystem(uri, options)
    scheme = urlsplit(uri).scheme
    pattern = any(ch in path for ch in "*?[")
    try:
        if not pattern:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                return [(uri, info.size)], True
            if info.type == pafs.FileType.NotFound:
                raise InputError("input file or folder not found in object storage", file=uri)
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
            return sorted((f"{scheme}://{i.path}", i.size) for i in infos if i.type == pafs.FileType.File), False
        base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise InputError(f"cannot list object storage: {exc}", file=uri) from None
    found = [(f"{scheme}://{i.path}", i.size) for i in infos
             if i.type == pafs.FileType.File and _matches(i.path, path)]
    return sorted(found), True


def _matches(path: str, pattern: str) -> bool:
    if "**" in pattern:
        return fnmatch.fnmatchcase(path, pattern.replace("**/", "*").replace("**", "*"))
    return path.count("/") == pattern.count("/") and fnmatch.fnmatchcase(path, pattern)


def stat(uri: str, options: dict[str, Any] | None = None) -> tuple[int, int]:
    """(size, mtime in ns); for the input fingerprint."""
    fs, path = filesystem(uri, options)
    info = fs.get_file_info(path)
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    return info.size or 0, mtime


def open_input(uri: str, options: dict[str, Any] | None = None) -> Any:
    """A buffered, seekable binary file (readline, iteration) over the object."""
    fs, path = filesystem(uri, options)
    try:
        return io.BufferedReader(fs.open_input_file(path), 1 << 20)
    except OSError as exc:
        raise InputError(f"cannot read the object: {exc}", file=uri) from None


def open_random(uri: str, options: dict[str, Any] | None = None) -> Any:
    """A pyarrow random-access file: what pq.ParquetFile reads footers and row groups from."""
    fs, path = filesystem(uri, options)
    try:
        return fs.open_input_file(path)
    except OSError as exc:
        raise InputError(f"cannot read the object: {exc}", file=uri) from None


def write_bytes(uri: str, data: bytes, options: dict[str, Any] | None = None, *, root: str | None = None) -> None:
    """The whole object in one upload (local: temp file + rename): complete or absent. `root`: the
    output folder `uri` lies in; the folders below it are created or accepted only if they are no links."""
    if not is_remote(uri):
        _local_folders(uri, root)
        safefs.write_atomic(uri, data)
        return
    fs, path = filesystem(uri, options)
    out = fs.open_output_stream(path)
    out.write(data)
    out.close()


def put_file(local: str, uri: str, options: dict[str, Any] | None = None, *, root: str | None = None) -> None:
    """Copy a local file to `uri` so that readers see the old object or the whole new one (`root`: as
    for write_bytes)."""
    if not is_remote(uri):
        _local_folders(uri, root)
        with open(local, "rb") as src, safefs.atomic_writer(uri) as out:
            shutil.copyfileobj(src, out, _COPY_CHUNK)
        return
    fs, path = filesystem(uri, options)
    tmp = f"{path.rsplit('/', 1)[0]}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    try:
        with open(local, "rb") as src, fs.open_output_stream(tmp) as out:
            while chunk := src.read(_COPY_CHUNK):
                out.write(chunk)
        fs.move(tmp, path)  # a server-side copy: the final key appears complete
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def _local_folders(uri: str, root: str | None) -> None:
    """Create the folders between `root` (which may itself be a link) and the file, refusing links."""
    folder = os.path.dirname(uri) or "."
    if root is None or not os.path.abspath(folder).startswith(os.path.abspath(root) + os.sep):
        os.makedirs(folder, exist_ok=True)
        return
    os.makedirs(root, exist_ok=True)
    below = os.path.relpath(folder, root).split(os.sep)
    for i in range(1, len(below) + 1):
        safefs.ensure_dir(os.path.join(root, *below[:i]))


def list_files(uri: str, options: dict[str, Any] | None = None) -> list[str]:
    """Every file below a local folder or an object-store prefix (none if it does not exist)."""
    if not is_remote(uri):
        if not os.path.isdir(uri):
            return []
        return sorted(os.path.join(d, f) for d, _, names in os.walk(uri) for f in names)
    fs, path = filesystem(uri, options)
    scheme = urlsplit(uri).scheme
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(f"{scheme}://{i.path}" for i in infos if i.type == pafs.FileType.File)


def read_bytes(uri: str, options: dict[str, Any] | None = None) -> bytes:
    if not is_remote(uri):
        with open(uri, "rb") as fh:
            return fh.read()
    fs, path = filesystem(uri, options)
    with fs.open_input_stream(path) as fh:
        return bytes(fh.read())


def publish(files: list[str], dest: str, options: dict[str, Any] | None = None) -> list[str]:
    """Copy the local engine's outputs to an object-store folder; returns the URIs written."""
    written = []
    for local in files:
        if os.path.exists(local):
            target = join(dest, os.path.basename(local))
            put_file(local, target, options)
            written.append(target)
    return written
