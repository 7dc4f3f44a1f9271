"""What a Ray run does to its output location before any worker starts: the job's identity, the shards
this input is cut into, which of them are done, and where earlier answers to their rows are.

The same job identity as the local engine (state/jobdir.py): only what shapes requests (the request
fingerprint) makes a job; a changed one is refused naming the changed keys, unless --force-new moves the
old job aside. The input is data: shard *i* is the local engine's batch *i*, named like its part after
its content (`part_names` over the scan's batch digests), so an unchanged batch keeps its name and its
published part (`results.parquet/part-<name>.parquet`) marks it done; a grown, edited or shrunk batch
gets a new name and is answered again, from the journal wherever it can be.

The row map (`_journal/_rows.parquet`: an 8-byte hash of every row id ever answered, and the shard whose
journal folder holds its answer) is how a changed shard finds the answers its unchanged rows already
have: a worker looks its rows up in it (sorted keys, a binary search per row) and reads those shards'
journal folders as well as its own ("donors"), copying what it reuses into its own folder before it
publishes, so a finished shard's folder always holds all of its rows' answers. The driver re-points the
rows of the shards finished in a run at their new folder when the run ends; rows that left the input
keep their entry, so their answers come back free if the rows return.
"""
from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ...config import Config
from ...errors import JobChangedError
from ...read import storage
from ...state.jobdir import _job_changes
from ...state.segments import JOURNAL

MANIFEST = "ray-manifest.json"
MANIFEST_VERSION = 2   # 2: shards named by content, the request fingerprint as the job (1: by position)
ROWS_MAP = "_rows.parquet"
RESULTS, FAILURES = "results.parquet", "failures.parquet"
PREVIOUS_PREFIX = "previous-"


def part_name(name: str) -> str:
    return f"part-{name}.parquet"


def shard_of(uri: str) -> str | None:
    base = uri.rsplit("/", 1)[-1]
    return base[5:-8] if base.startswith("part-") and base.endswith(".parquet") else None


def id_hashes(ids: list[str]) -> np.ndarray:
    """Stable 8-byte hashes of row ids (the same in every process and run)."""
    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids],
                    dtype=np.uint64)


@dataclass
class RowMap:
    """Row-id hash -> the shard whose journal folder holds that row's answer; sorted by hash."""

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    shards: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    names: list[str] = field(default_factory=list)

    def donors(self, hashes: np.ndarray) -> set[str]:
        if not len(self.keys) or not len(hashes):
            return set()
        pos = np.searchsorted(self.keys, hashes)
        pos[pos >= len(self.keys)] = 0
        hit = self.keys[pos] == hashes
        return {self.names[i] for i in np.unique(self.shards[pos[hit]])}

    def seen(self, hashes: np.ndarray) -> np.ndarray:
        """Per row: was it answered by this job before (its id is in the map)?"""
        if not len(self.keys) or not len(hashes):
            return np.zeros(len(hashes), bool)
        pos = np.searchsorted(self.keys, hashes)
        pos[pos >= len(self.keys)] = 0
        return np.asarray(self.keys[pos] == hashes)

    def repoint(self, finished: dict[str, np.ndarray]) -> RowMap:
        """The map after the rows of `finished` shards moved to those shards' folders."""
        if not finished:
            return self
        new_keys = np.concatenate(list(finished.values())) if finished else np.zeros(0, np.uint64)
        keep = ~np.isin(self.keys, new_keys)
        names = sorted(set(self.names) | set(finished))
        index = {n: i for i, n in enumerate(names)}
        old_shards = np.array([index[self.names[s]] for s in self.shards[keep]], np.int32) if keep.any() \
            else np.zeros(0, np.int32)
        add = [np.full(len(h), index[n], np.int32) for n, h in finished.items()]
        keys = np.concatenate([self.keys[keep], new_keys])
        shards = np.concatenate([old_shards, *add]) if add else old_shards
        order = np.argsort(keys, kind="stable")
        keys, shards = keys[order], shards[order]
        # one entry per key: the last written (a finished shard) wins over an older one
        last = np.r_[keys[1:] != keys[:-1], True] if len(keys) else np.zeros(0, bool)
        used = sorted({int(s) for s in np.unique(shards[last])})
        remap = np.full(len(names), -1, np.int32)
        remap[used] = np.arange(len(used), dtype=np.int32)
        return RowMap(keys[last], remap[shards[last]], [names[i] for i in used])

    def encode(self) -> bytes:
        table = pa.table({"key": pa.array(self.keys, pa.uint64()),
                          "shard": pa.DictionaryArray.from_arrays(pa.array(self.shards, pa.int32()),
                                                                  pa.array(self.names, pa.string()))})
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        return sink.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> RowMap:
        table = pq.read_table(io.BytesIO(data))
        shard = table.column("shard").combine_chunks()
        if not pa.types.is_dictionary(shard.type):
            shard = shard.dictionary_encode()
        return cls(table.column("key").to_numpy(), shard.indices.to_numpy(zero_copy_only=False).astype(np.int32),
                   shard.dictionary.to_pylist())


class RayJob:
    """The job in an output location (a local folder or an object-store prefix)."""

    def __init__(self, cfg: Config) -> None:
        self.root, self.options = cfg.output.dir, cfg.output.storage_options
        self.manifest_uri = storage.join(self.root, MANIFEST)
        self.rows_uri = storage.join(self.root, JOURNAL, ROWS_MAP)

    def read_manifest(self) -> dict[str, Any] | None:
        try:
            manifest = orjson.loads(storage.read_bytes(self.manifest_uri, self.options))
        except (FileNotFoundError, OSError, orjson.JSONDecodeError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def adopt_batch_size(self, cfg: Config) -> None:
        """A job keeps the batch size it started with, so unchanged batches keep their names."""
        known = self.read_manifest()
        if known and known.get("version") == MANIFEST_VERSION and "batch_size" in known \
                and not _job_changes(known, cfg.request_fingerprint(), cfg.request_config()):
            cfg.input.batch_size = int(known["batch_size"])

    def check(self, cfg: Config, *, force_new: bool, command: str) -> dict[str, Any]:
        """Refuse another job's folder (naming the changed keys), or move it aside with --force-new."""
        known = self.read_manifest()
        fingerprint, request = cfg.request_fingerprint(), cfg.request_config()
        keys: list[str] = []
        if known is not None:
            if known.get("version") != MANIFEST_VERSION:  # shards by position: its parts never fit
                keys = [] if known.get("request_fingerprint") == fingerprint else ["?"]
                if not keys:
                    self._clear_parts()
            else:
                keys = _job_changes(known, fingerprint, request)
        if keys:
            what = ", ".join(keys[:8]) if keys != ["?"] else \
                "the request-affecting config (endpoint, model, prompt, params, structured)"
            if not force_new:
                raise JobChangedError(
                    f"{self.root} holds answers to a different job: {what} changed since it started, so its "
                    "answers do not fit these requests. Use a new output.dir, or re-run with --force-new to "
                    f"move the old job aside (nothing is deleted): {command} --force-new")
            self._move_aside()
            known = None
        now = time.time()
        manifest = {"version": MANIFEST_VERSION, "engine": "ray", "fingerprint": fingerprint,
                    "batch_size": cfg.input.batch_size, "model": cfg.endpoint.model, "request": request,
                    "name": cfg.job.name,
                    "config": cfg.source, "command": command,
                    "created": (known or {}).get("created", now), "updated": now}
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        storage.write_bytes(self.manifest_uri, orjson.dumps(manifest, option=orjson.OPT_INDENT_2), self.options,
                            root=self.root)

    def _clear_parts(self) -> None:
        for folder in (RESULTS, FAILURES):
            for uri in storage.list_files(storage.join(self.root, folder), self.options):
                _delete(uri, self.options)

    def _move_aside(self) -> None:
        """--force-new: everything of the old job under previous-<time>/ (objects moved, none deleted)."""
        aside = f"{PREVIOUS_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
        for uri in storage.list_files(self.root, self.options):
            rel = uri[len(self.root.rstrip("/")) + 1:]
            if rel.startswith((PREVIOUS_PREFIX, "_lease", "history.jsonl", "pipeline.log", "ray-status.json")):
                continue  # the location's own: who holds it, what ran there, the log being written
            target = storage.join(self.root, aside, rel)
            if storage.is_remote(uri):
                fs, src = storage.filesystem(uri, self.options)
                fs.move(src, storage.filesystem(target, self.options)[1])
            else:
                import os
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(uri, target)

    # -- parts ------------------------------------------------------------------------------------

    def parts(self, folder: str) -> dict[str, str]:
        """Shard name -> part URI of a parts folder."""
        out = {}
        for uri in storage.list_files(storage.join(self.root, folder), self.options):
            name = shard_of(uri)
            if name is not None:
                out[name] = uri
        return out

    def done(self, names: list[str], *, retry_failed: bool) -> dict[str, tuple[int, int, int]]:
        """The shards of this plan that are done: name -> (ok rows, failed rows, of them input failures). A
        shard is redone when its
        failures part holds rows a run must ask again (transient always; --retry-failed: every row whose
        request failed), as the local engine redoes such parts."""
        wanted = set(names)
        results = {n: u for n, u in self.parts(RESULTS).items() if n in wanted}
        failures = self.parts(FAILURES)
        out = {}
        for name, uri in results.items():
            ok = _read(uri, self.options, columns=[]).num_rows
            values: list[str] = []
            if name in failures:
                values = _read(failures[name], self.options, columns=["error_class"]).column("error_class").to_pylist()
                if "transient" in values or (retry_failed and any(v != "input" for v in values)):
                    continue
            out[name] = (ok, len(values), values.count("input"))
        return out

    def prune(self, names: list[str], id_column: str) -> list[pa.ChunkedArray]:
        """Delete the parts of shards this input no longer has; returns their ids (to count rows removed)."""
        keep, removed = set(names), []
        for folder in (FAILURES, RESULTS):  # results last: a results part marks a shard done
            for name, uri in self.parts(folder).items():
                if name not in keep:
                    try:
                        removed.append(_read(uri, self.options, columns=[id_column]).column(id_column))
                    except (OSError, KeyError, pa.ArrowException):
                        pass
                    _delete(uri, self.options)
        return removed

    def sweep(self) -> None:
        """Delete what killed uploads left in the parts folders: a worker killed while publishing leaves
        its temporary object (a local `.part-….tmp`, an object store's `.tmp-…-part-…`; S3's move is a
        copy then a delete), which a reader listing the folder would take for a part. Only the lease
        holder calls it, when no worker of this job can be uploading (before the shards start, after
        they have all returned)."""
        for folder in (FAILURES, RESULTS):
            for uri in storage.list_files(storage.join(self.root, folder), self.options):
                base = uri.rsplit("/", 1)[-1]
                if base.startswith(".") and "part-" in base:
                    _delete(uri, self.options)

    # -- the row map ------------------------------------------------------------------------------

    def row_map(self) -> RowMap:
        try:
            return RowMap.decode(storage.read_bytes(self.rows_uri, self.options))
        except (FileNotFoundError, OSError, pa.ArrowException, KeyError):
            return RowMap()

    def save_row_map(self, rows: RowMap) -> None:
        storage.write_bytes(self.rows_uri, rows.encode(), self.options, root=self.root)


def _read(uri: str, options: dict[str, Any] | None, *, columns: list[str]) -> pa.Table:
    if storage.is_remote(uri):
        fs, path = storage.filesystem(uri, options)
        return pq.read_table(path, filesystem=fs, columns=columns)
    return pq.read_table(uri, columns=columns)


def _delete(uri: str, options: dict[str, Any] | None) -> None:
    if storage.is_remote(uri):
        fs, path = storage.filesystem(uri, options)
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass
    else:
        import os
        try:
            os.unlink(uri)
        except FileNotFoundError:
            pass
