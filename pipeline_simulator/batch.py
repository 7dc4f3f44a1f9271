"""The OpenAI Batch API: `/files` and `/batches` under the API root.

Routes: ``POST /files`` (multipart, purpose=batch), ``GET /files`` (list; 405 with
``list_files: false``), ``GET /files/{id}``, ``DELETE /files/{id}``,
``GET /files/{id}/content`` (with HTTP Range, so a client can resume), ``POST /batches``,
``GET /batches`` (list, newest first, ``after``/``limit``; 405 with ``list_batches: false``), ``GET /batches/{id}``,
``POST /batches/{id}/cancel``.

Lifecycle: validating -> in_progress -> finalizing -> completed, or failed (the file did not validate),
expired (partial output; the rest ``batch_expired``), cancelling -> cancelled (the rest
``batch_cancelled``). Time is the simulator's own: every GET of a batch is one tick, and each status
lasts the number of ticks `BatchSim` gives it. Lines are answered when the batch leaves in_progress.
Counters (`stats`): files uploaded (and upload attempts), files deleted, batches created (and per job
chunk, from the metadata), lines submitted and answered, 429s on create, cancels.
"""
from __future__ import annotations

import hashlib
import itertools
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from .batch_lines import Line, answer, check_lines, line_faults
from .chat import ChatService
from .config import BatchSim

ENDPOINTS = frozenset({"/v1/chat/completions"})
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_FILE_CONTENT = re.compile(r"^/files/([A-Za-z0-9_-]+)/content$")
_FILE = re.compile(r"^/files/([A-Za-z0-9_-]+)$")
_BATCH = re.compile(r"^/batches/([A-Za-z0-9_-]+)$")
_CANCEL = re.compile(r"^/batches/([A-Za-z0-9_-]+)/cancel$")
_RANGE = re.compile(r"^bytes=(\d+)-$")


@dataclass
class File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def obj(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed"}


@dataclass
class Batch:
    id: str
    number: int
    input_file_id: str
    endpoint: str
    metadata: dict[str, str] | None
    lines: list[Line]
    errors: list[dict[str, Any]]
    created_at: int
    status: str = "validating"
    ticks: int = 0
    times: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    done_at_cancel: int = 0  # lines a cancelled batch had done when the cancel came

    @property
    def tokens(self) -> int:
        return sum(line.tokens for line in self.lines)


class BatchService:
    def __init__(self, cfg: BatchSim, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.files: dict[str, File] = {}
        self.batches: dict[str, Batch] = {}
        self.ids = itertools.count(1)
        self.counts: Counter[str] = Counter()
        self.by_chunk: Counter[str] = Counter()

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "created_by_chunk": dict(self.by_chunk),
                "status": dict(Counter(b.status for b in self.batches.values()))}

    async def handle(self, sub: str, request: web.BaseRequest, chat: ChatService) -> web.Response:
        """`sub` is the path below the API root (/files..., /batches...)."""
        method = request.method
        if method == "POST" and sub == "/files":
            return await self._upload(request)
        if method == "GET" and sub == "/files":
            if not self.cfg.list_files:
                self.counts["files_list_refused"] += 1
                return _error(405, "Method Not Allowed", "method_not_allowed")
            return _list([f.obj() for f in reversed(self.files.values())
                          if request.query.get("purpose") in (None, f.purpose)], request)
        if method == "POST" and sub == "/batches":
            return await self._create(request, chat)
        if method == "GET" and sub == "/batches":
            if not self.cfg.list_batches:
                return _error(405, "Method Not Allowed", "method_not_allowed")
            return _list([self._obj(b) for b in reversed(self.batches.values())], request)
        if method == "GET" and (m := _FILE_CONTENT.match(sub)):
            return self._content(m.group(1), request)
        if method == "GET" and (m := _FILE.match(sub)):
            f = self.files.get(m.group(1))
            return _json(f.obj()) if f else _not_found("file", m.group(1))
        if method == "GET" and (m := _BATCH.match(sub)):
            b = self.batches.get(m.group(1))
            if b is None:
                return _not_found("batch", m.group(1))
            self.counts["polls"] += 1
            self._tick(b, chat)
            return _json(self._obj(b))
        if method == "DELETE" and (m := _FILE.match(sub)):
            return self._delete(m.group(1))
        if method == "POST" and (m := _CANCEL.match(sub)):
            return self._cancel(m.group(1))
        return _error(404, f"Not Found: {method} {sub}", "not_found")

    # -- files ---------------------------------------------------------------------------------

    async def _upload(self, request: web.BaseRequest) -> web.Response:
        self.counts["upload_attempts"] += 1
        if self.cfg.upload_status is not None:
            status = self.cfg.upload_status
            return _error(status, f"The server had an error while processing your request (HTTP {status}).",
                          "server_error" if status >= 500 else "invalid_request")
        if not request.content_type.startswith("multipart/"):
            return _error(400, "Expected a multipart/form-data body with 'purpose' and 'file'.", "invalid_request")
        purpose, filename, data = None, None, b""
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):  # a nested multipart: no field of ours
                continue
            if part.name == "purpose":
                purpose = (await part.read()).decode()
            elif part.name == "file":
                filename = part.filename
                data = bytes(await part.read())
        if purpose != "batch":
            return _error(400, f"Invalid purpose {purpose!r}: this simulator takes purpose=batch.", "invalid_purpose")
        if not filename or not filename.endswith(".jsonl"):
            return _error(400, "The batch input file must be a .jsonl file.", "invalid_file_format")
        if len(data) > self.cfg.max_file_bytes:
            return _error(400, f"File is too large: {len(data):,} bytes, the limit is {self.cfg.max_file_bytes:,}.",
                          "file_too_large")
        f = File(f"file-{next(self.ids):012d}", filename, purpose, data, int(time.time()))
        self.files[f.id] = f
        self.counts["files_uploaded"] += 1
        return _json(f.obj())

    def _delete(self, file_id: str) -> web.Response:
        if self.files.pop(file_id, None) is None:
            return _not_found("file", file_id)
        self.counts["files_deleted"] += 1
        return _json({"id": file_id, "object": "file", "deleted": True})

    def _content(self, file_id: str, request: web.BaseRequest) -> web.Response:
        f = self.files.get(file_id)
        if f is None:
            return _not_found("file", file_id)
        m = _RANGE.match(request.headers.get("Range", ""))
        if m is None:
            return web.Response(body=f.data, content_type="application/octet-stream")
        start = int(m.group(1))
        if start >= len(f.data):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(f.data)}"})
        self.counts["downloads_resumed"] += 1
        headers = {"Content-Range": f"bytes {start}-{len(f.data) - 1}/{len(f.data)}"}
        return web.Response(status=206, body=f.data[start:], headers=headers, content_type="application/octet-stream")

    # -- batches -------------------------------------------------------------------------------

    async def _create(self, request: web.BaseRequest, chat: ChatService) -> web.Response:
        try:
            req = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            req = None
        if not isinstance(req, dict):
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request")
        f = self.files.get(str(req.get("input_file_id")))
        endpoint = req.get("endpoint")
        meta = req.get("metadata")
        if f is None or f.purpose != "batch":
            return _error(400, f"No batch input file with id {req.get('input_file_id')!r}.", "invalid_request")
        if endpoint not in ENDPOINTS:
            return _error(400, f"Invalid endpoint {endpoint!r}; supported: {', '.join(sorted(ENDPOINTS))}.",
                          "invalid_request")
        if req.get("completion_window") != "24h":
            return _error(400, "completion_window must be '24h'.", "invalid_request")
        if meta is not None and (not isinstance(meta, dict) or len(meta) > 16
                                 or not all(isinstance(v, str) and len(v) <= 512 for v in meta.values())):
            return _error(400, "metadata takes up to 16 string values of up to 512 characters.", "invalid_request")
        lines, errors = check_lines(f.data, endpoint, chat)
        if len(lines) > self.cfg.max_file_lines:
            errors.append({"code": "too_many_requests", "line": None, "param": None,
                           "message": f"The file has {len(lines):,} requests; the limit is "
                                      f"{self.cfg.max_file_lines:,}."})
        refusal = self._over_limits(sum(line.tokens for line in lines))
        if refusal is not None:
            self.counts["create_429"] += 1
            return refusal
        b = Batch(f"batch_{next(self.ids):012d}", len(self.batches) + 1, f.id, endpoint, meta, lines, errors,
                  int(time.time()))
        self.batches[b.id] = b
        self.counts["batches_created"] += 1
        self.counts["lines_submitted"] += len(lines)
        if meta:
            self.by_chunk[f"{meta.get('pipeline_job')}:{meta.get('pipeline_chunk')}"] += 1
        return _json(self._obj(b))

    def _over_limits(self, tokens: int) -> web.Response | None:
        active = [b for b in self.batches.values() if b.status not in TERMINAL]
        cfg = self.cfg
        if cfg.max_active is not None and len(active) >= cfg.max_active:
            return _error(429, f"Too many unfinished batches ({len(active)}); wait for some to finish.",
                          "rate_limit_exceeded")
        queued = sum(b.tokens for b in active)
        if cfg.max_enqueued_tokens is not None and queued + tokens > cfg.max_enqueued_tokens:
            return _error(429, f"Enqueued token limit reached: {queued:,} enqueued + {tokens:,} in this batch, "
                               f"limit {cfg.max_enqueued_tokens:,}. Try again once batches finish.",
                          "token_limit_exceeded")
        return None

    def _cancel(self, batch_id: str) -> web.Response:
        b = self.batches.get(batch_id)
        if b is None:
            return _not_found("batch", batch_id)
        if b.status in ("validating", "in_progress", "finalizing"):
            b.done_at_cancel = self._progress(b)
            self._move(b, "cancelling", ticks=0)
            self.counts["cancels"] += 1
        return _json(self._obj(b))

    def _tick(self, b: Batch, chat: ChatService) -> None:
        """One step of the batch's clock (a poll). A status is answered for as many polls as `BatchSim`
        gives it; the poll after that answers the next status (which a 0 skips)."""
        b.ticks += 1
        cfg = self.cfg
        lasts = {"validating": cfg.validating_polls, "in_progress": cfg.in_progress_polls,
                 "finalizing": cfg.finalizing_polls, "cancelling": cfg.cancelling_polls}
        while b.status not in TERMINAL and b.ticks > lasts[b.status]:
            if b.status == "in_progress" and b.lines and b.lines[0].body.get("model") in cfg.hold_models:
                break  # held (BatchSim.hold_models): a file carries one model, its first line names it
            if b.status == "validating":
                self._move(b, "failed" if b.errors else "in_progress")
            elif b.status == "in_progress" and b.number in cfg.expire:
                self._finish(b, chat, "expired", int(len(b.lines) * cfg.expire_done_ratio), "batch_expired")
            elif b.status == "in_progress":
                self._move(b, "finalizing")
            elif b.status == "finalizing":
                self._finish(b, chat, "completed", len(b.lines), "")
            else:
                self._finish(b, chat, "cancelled", b.done_at_cancel, "batch_cancelled")

    def _move(self, b: Batch, status: str, ticks: int = 1) -> None:
        b.status, b.ticks = status, ticks
        b.times[f"{status}_at"] = int(time.time())

    def _progress(self, b: Batch) -> int:
        """Lines a batch in progress has done so far, on its clock."""
        if b.status == "finalizing":
            return len(b.lines)
        if b.status != "in_progress" or not self.cfg.in_progress_polls:
            return 0
        return min(len(b.lines), len(b.lines) * (b.ticks - 1) // self.cfg.in_progress_polls)

    def _finish(self, b: Batch, chat: ChatService, status: str, done: int, rest_code: str) -> None:
        """Answer the first `done` lines (in a shuffled order), the rest get `rest_code`; write the files."""
        rng = random.Random(self.seed * 1_000_003 + b.number)
        order = list(range(len(b.lines)))
        if self.cfg.shuffle:
            rng.shuffle(order)
        cfg = self.cfg
        rates = {"4xx": cfg.line_rate_4xx, "5xx": cfg.line_rate_5xx, "schema_invalid": cfg.line_rate_schema_invalid,
                 "no_choices": cfg.line_rate_no_choices}
        faults = line_faults(len(b.lines), rates, rng)
        out: list[dict[str, Any]] = []
        err: list[dict[str, Any]] = []
        for rank, i in enumerate(order):
            line = b.lines[i]
            rid = f"batch_req_{hashlib.sha256(f'{b.id}:{i}'.encode()).hexdigest()[:24]}"
            if rank < done:
                status_code, body = answer(chat, line, faults[i], cfg.price_factor, cfg.line_4xx_status)
                item = {"id": rid, "custom_id": line.custom_id, "error": None,
                        "response": {"status_code": status_code, "request_id": f"req_{rid[10:]}", "body": body}}
                ok = status_code == 200
                b.completed += ok
                b.failed += not ok
                (out if ok or self.cfg.errors_in_output else err).append(item)
            else:
                message = ("This request could not be executed before the completion window expired."
                           if rest_code == "batch_expired" else "The batch was cancelled before this request ran.")
                err.append({"id": rid, "custom_id": line.custom_id, "response": None,
                            "error": {"code": rest_code, "message": message}})
                b.failed += status == "expired"
        self.counts["lines_answered"] += b.completed + b.failed
        b.output_file_id = self._result_file(b, "output", out)
        b.error_file_id = self._result_file(b, "error", err)
        if status != "cancelled":
            b.times["finalizing_at"] = b.times.get("finalizing_at", int(time.time()))
        self._move(b, status)

    def _result_file(self, b: Batch, kind: str, items: list[dict[str, Any]]) -> str | None:
        if not items:
            return None
        data = b"".join(orjson.dumps(item) + b"\n" for item in items)
        f = File(f"file-{next(self.ids):012d}", f"{b.id}_{kind}.jsonl", "batch_output", data, int(time.time()))
        self.files[f.id] = f
        return f.id

    def _obj(self, b: Batch) -> dict[str, Any]:
        total = len(b.lines)
        if b.status in TERMINAL:
            counts = {"total": total, "completed": b.completed, "failed": b.failed}
        else:
            counts = {"total": total, "completed": self._progress(b), "failed": 0}
        obj: dict[str, Any] = {
            "id": b.id, "object": "batch", "endpoint": b.endpoint, "input_file_id": b.input_file_id,
            "completion_window": "24h", "status": b.status, "output_file_id": b.output_file_id,
            "error_file_id": b.error_file_id, "created_at": b.created_at, "expires_at": b.created_at + 86_400,
            "request_counts": counts, "metadata": b.metadata,
            "errors": {"object": "list", "data": b.errors} if b.status == "failed" else None,
        }
        for name in ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
                     "cancelled_at"):
            obj[name] = b.times.get(name)
        return obj


def _list(items: list[dict[str, Any]], request: web.BaseRequest) -> web.Response:
    after = request.query.get("after")
    try:
        limit = max(1, min(100, int(request.query.get("limit", "20"))))
    except ValueError:
        limit = 20
    if after:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return _json({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                  "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _error(status: int, message: str, code: str) -> web.Response:
    etype = "invalid_request_error" if status < 500 and status != 429 else "rate_limit_error" if status == 429 \
        else "server_error"
    return _json({"error": {"message": message, "type": etype, "param": None, "code": code}}, status)


def _not_found(kind: str, ident: str) -> web.Response:
    return _error(404, f"No such {kind}: {ident[:64]}", "not_found")
