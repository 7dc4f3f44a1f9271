"""The OpenAI Batch protocol over the transport seam: files, batches, listing, cancel.

Every reply goes through THE classifier (send/classify.py): a non-2xx raises the same error classes a chat
request would (401 AuthError, 429 RateLimited, 5xx TransientError, ...), and the caller decides. Server
answers are untrusted: ids are checked for shape before they are used in a path.
"""
from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson

from ..errors import PermanentError, TransientError
from ..send.classify import classify
from ..send.files_api import FilesApi
from ..send.transport import HttpTransport, Reply
from .files import ENDPOINT

_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


class BatchClient:
    def __init__(self, transport: HttpTransport) -> None:
        self.api = FilesApi(transport)

    async def upload(self, path: str, filename: str) -> str:
        reply = await self.api.upload("/files", path, filename=filename, fields={"purpose": "batch"})
        return _id(_json(reply), "file")

    async def create(self, file_id: str, metadata: dict[str, str]) -> dict[str, Any]:
        body = {"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h", "metadata": metadata}
        batch = _json(await self.api.call("POST", "/batches", json=body))
        _id(batch, "batch")
        return batch

    async def get(self, batch_id: str) -> dict[str, Any]:
        return _json(await self.api.call("GET", f"/batches/{_safe(batch_id)}"))

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return _json(await self.api.call("POST", f"/batches/{_safe(batch_id)}/cancel"))

    async def delete(self, file_id: str) -> None:
        """Delete a file at the provider (`DELETE /files/{id}`); a file already gone is no error."""
        reply = await self.api.call("DELETE", f"/files/{_safe(file_id)}")
        if reply.status != 404:
            _json(reply)

    async def batches(self) -> AsyncIterator[dict[str, Any]]:
        """Every batch of the account, newest first, page by page (100 a page)."""
        async for item in self._pages("/batches", {}):
            yield item

    async def files(self) -> AsyncIterator[dict[str, Any]]:
        async for item in self._pages("/files", {"purpose": "batch"}):
            yield item

    async def download(self, file_id: str, dest: str) -> None:
        """The file's content into `dest`, resuming a partial `dest` left by an earlier run."""
        reply = await self.api.download(f"/files/{_safe(file_id)}/content", dest)
        if reply.status not in (200, 206):
            classify(reply)  # not 2xx: raises the class of the failure
            raise TransientError(f"download of {file_id} answered HTTP {reply.status}", status=reply.status)
        expected = _content_length(reply)
        if expected is not None:
            have = os.path.getsize(dest)
            if have != expected:
                raise TransientError(f"download of {file_id} ended after {have:,} of {expected:,} bytes",
                                     code="truncated")

    async def _pages(self, path: str, params: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        after: str | None = None
        while True:
            query = {**params, "limit": "100", **({"after": after} if after else {})}
            page = _json(await self.api.call("GET", path, params=query))
            data = page.get("data")
            items = [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []
            for item in items:
                yield item
            if not page.get("has_more") or not items:
                return
            last = items[-1].get("id")
            if not isinstance(last, str) or last == after:
                return
            after = last


def _json(reply: Reply) -> dict[str, Any]:
    if not 200 <= reply.status < 300:
        classify(reply)  # not 2xx: always raises the class of the failure
    try:
        body = orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise TransientError(f"HTTP {reply.status} with a body that is not a JSON object", status=reply.status,
                             code="malformed")
    return body


def _id(obj: dict[str, Any], what: str) -> str:
    value = obj.get("id")
    if not isinstance(value, str) or not _ID.match(value):
        raise TransientError(f"the provider's {what} object has no usable id", code="malformed")
    return value


def _safe(value: str) -> str:
    """An id (from the provider: untrusted) that may go into a path."""
    if not _ID.match(value):
        raise PermanentError(f"the provider's id {value[:80]!r} is not an id", code="malformed")
    return value


def _content_length(reply: Reply) -> int | None:
    """The full size of the file: Content-Range's total on a 206, Content-Length on a 200."""
    crange = reply.headers.get("Content-Range", "")
    if reply.status == 206 and "/" in crange:
        total = crange.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = reply.headers.get("Content-Length")
    return int(length) if reply.status == 200 and length and length.isdigit() else None


def queue_full(batch: dict[str, Any]) -> bool:
    """A batch that failed because the provider's enqueued-token queue was full: its lines go again."""
    return any(e.get("code") == "token_limit_exceeded" for e in _error_list(batch))


def _error_list(batch: dict[str, Any]) -> list[dict[str, Any]]:
    errors = batch.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []


def batch_errors(batch: dict[str, Any]) -> str:
    """Why a batch failed, from its errors.data (code, line, message), for the stop message."""
    items = _error_list(batch)[:5]
    if not items:
        return "no reason given"
    return "; ".join(f"{e.get('code')}{' line ' + str(e['line']) if e.get('line') else ''}: "
                     f"{str(e.get('message'))[:200]}" for e in items)
