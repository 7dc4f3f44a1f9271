"""The Batch API's HTTP calls (run.mode: batch): JSON requests, a multipart upload, a resumable download.

They share the chat transport's session (its key, headers, pool and timeouts) and raise the same error
classes: a TLS failure or a redirect is run-fatal, the rest of the network failures transient. Paths
are relative to base_url, never absolute URLs, so the key only ever goes to the endpoint. Every reply
body and error message leaves here scrubbed of secret values (redact.py), as `Transport.send`'s do;
downloaded file content is written as received (the collector scrubs each stored answer). Judging a
reply is the caller's job (batch/client.py, through the classifier).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

import aiohttp
import orjson

from ..common import redact, safefs
from ..errors import RequestError, RunFatalError
from .transport import NETWORK_ERRORS, HttpTransport, Reply, network_error


class FilesApi:
    def __init__(self, transport: HttpTransport) -> None:
        self.transport = transport

    def _url(self, path: str) -> str:
        if not path.startswith("/") or "//" in path or "://" in path:
            raise ValueError(f"not a path under the endpoint: {path!r}")
        return self.transport.base_url.rstrip("/") + path

    async def call(self, method: str, path: str, *, json: Any = None,
                   params: Mapping[str, str] | None = None) -> Reply:
        """A JSON request to `{base_url}{path}`; the reply is classified by the caller."""
        return await _scrubbed(self._call(method, path, json, params))

    async def upload(self, path: str, file_path: str, *, filename: str, fields: Mapping[str, str]) -> Reply:
        """POST a file as multipart/form-data (field `file`), streamed from disk, not read into memory."""
        return await _scrubbed(self._upload(path, file_path, filename, fields))

    async def download(self, path: str, dest: str) -> Reply:
        """GET `{base_url}{path}` into the file `dest`, resuming (HTTP Range) from what `dest` already holds.
        Returns the reply with an empty body on success (200/206), the error body otherwise; `dest` then
        holds the complete content only if the server's length was reached (the caller checks)."""
        return await _scrubbed(self._download(path, dest))

    async def _call(self, method: str, path: str, json: Any, params: Mapping[str, str] | None) -> Reply:
        data = orjson.dumps(json) if json is not None else None
        async with self._guard() as start:
            async with self.transport.session().request(method, self._url(path), data=data, params=params,
                                                        allow_redirects=False) as resp:
                _no_redirect(resp)
                return Reply(resp.status, resp.headers, await resp.read(), asyncio.get_running_loop().time() - start)

    async def _upload(self, path: str, file_path: str, filename: str, fields: Mapping[str, str]) -> Reply:
        async with self._guard() as start:
            with safefs.open_read(file_path) or _refused(file_path) as fh:
                form = aiohttp.FormData()
                for name, value in fields.items():
                    form.add_field(name, value)
                form.add_field("file", fh, filename=filename, content_type="application/jsonl")
                payload = form()
                # The session's Content-Type (JSON) must not replace the multipart boundary.
                async with self.transport.session().post(self._url(path), data=payload, allow_redirects=False,
                                                         headers={"Content-Type": payload.content_type}) as resp:
                    _no_redirect(resp)
                    return Reply(resp.status, resp.headers, await resp.read(),
                                 asyncio.get_running_loop().time() - start)

    async def _download(self, path: str, dest: str) -> Reply:
        have = os.lstat(dest).st_size if os.path.lexists(dest) else 0  # a planted link is refused below
        headers = {"Range": f"bytes={have}-"} if have else None
        async with self._guard() as start:
            async with self.transport.session().get(self._url(path), headers=headers,
                                                    allow_redirects=False) as resp:
                _no_redirect(resp)
                if resp.status == 416:  # nothing left to fetch: what we hold is the whole file
                    return Reply(206, resp.headers, b"", 0.0)
                if resp.status not in (200, 206):
                    return Reply(resp.status, resp.headers, await resp.read(), 0.0)
                # 206 appends; 200 (the server ignored Range) starts over. safefs: never through a link.
                fd = safefs.open_regular(dest, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if resp.status == 206 else 0),
                                         0o600)
                if resp.status != 206:
                    os.ftruncate(fd, 0)
                with os.fdopen(fd, "ab" if resp.status == 206 else "wb") as out:
                    async for chunk in resp.content.iter_chunked(1 << 20):
                        out.write(chunk)
                return Reply(resp.status, resp.headers, b"", asyncio.get_running_loop().time() - start)

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[float]:
        """Network failures of a Batch API call as the error classes `send` raises (transport.network_error,
        the one mapping). Yields the start time on the loop's clock."""
        base_url = self.transport.base_url
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            yield start
        except NETWORK_ERRORS as exc:
            raise network_error(exc, base_url, loop.time() - start) from exc


async def _scrubbed(reply: Awaitable[Reply]) -> Reply:
    """The reply body and any error message scrubbed of secret values."""
    try:
        out = await reply
    except (RequestError, RunFatalError) as exc:
        raise redact.scrub_error(exc)  # noqa: B904 - the same exception scrubbed in place: its own cause stays
    out.body = redact.scrub_bytes(out.body)
    return out


def _no_redirect(resp: aiohttp.ClientResponse) -> None:
    if 300 <= resp.status < 400:
        raise RunFatalError(
            f"the endpoint answered with a redirect (HTTP {resp.status}) to {resp.headers.get('Location', '?')}; "
            "set endpoint.base_url to the final URL (the key is never sent across a redirect)")


def _refused(path: str) -> Any:
    raise safefs.refuse(path, "missing, a link or not a plain file")
