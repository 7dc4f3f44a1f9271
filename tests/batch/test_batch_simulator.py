"""The simulator's Batch API over real HTTP: validation with line numbers, the status lifecycle on the
simulator's clock (one tick per poll), request_counts, shuffled output, line failures and expiry,
cancel, 429 on create, resumable downloads, and answers identical to the chat endpoint's."""
from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from pipeline_simulator import SimConfig, Simulator
from tests.simclient import serve

AUTH = {"Authorization": "Bearer sk-test"}


def line(cid: str, text: str = "hello", *, model: str = "openai/gpt-4-turbo", url: str = "/v1/chat/completions",
         drop: str | None = None) -> bytes:
    obj: dict[str, Any] = {"custom_id": cid, "method": "POST", "url": url,
                           "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 50}}
    if drop:
        del obj[drop]
    return orjson.dumps(obj) + b"\n"


async def upload(session: aiohttp.ClientSession, url: str, data: bytes, name: str = "in.jsonl",
                 purpose: str = "batch") -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData()
    form.add_field("purpose", purpose)
    form.add_field("file", data, filename=name)
    async with session.post(f"{url}/files", data=form, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def call(session: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    async with session.request(method, url, json=body, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def create(session: aiohttp.ClientSession, url: str, data: bytes, **meta: str) -> tuple[int, dict[str, Any]]:
    _, f = await upload(session, url, data)
    return await call(session, "POST", f"{url}/batches", {"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                                           "completion_window": "24h", "metadata": meta or None})


async def poll_until_done(session: aiohttp.ClientSession, url: str, batch_id: str) -> list[dict[str, Any]]:
    seen = []
    for _ in range(20):
        _, b = await call(session, "GET", f"{url}/batches/{batch_id}")
        seen.append(b)
        if b["status"] in ("completed", "failed", "expired", "cancelled"):
            return seen
    raise AssertionError("the batch never finished")


async def content(session: aiohttp.ClientSession, url: str, file_id: str) -> list[dict[str, Any]]:
    async with session.get(f"{url}/files/{file_id}/content", headers=AUTH) as resp:
        return [orjson.loads(x) for x in (await resp.read()).splitlines()]


def test_a_bad_file_fails_validation_naming_each_line() -> None:
    data = (line("a") + b"{not json\n" + line("b", drop="url") + line("a") + line("c", model="gpt-4o")
            + line("d", url="/v1/embeddings"))

    async def body(sim: Simulator, url: str, session: aiohttp.ClientSession) -> None:
        status, b = await create(session, url, data)
        assert status == 200 and b["status"] == "validating"
        final = (await poll_until_done(session, url, b["id"]))[-1]
        assert final["status"] == "failed"
        errors = [(e["line"], e["code"]) for e in final["errors"]["data"]]
        assert errors == [(2, "invalid_json_line"), (3, "missing_required_parameter"), (4, "duplicate_custom_id"),
                          (5, "mismatched_model"), (6, "invalid_url")]
        assert final["output_file_id"] is None
    serve(SimConfig(), body)


def test_uploads_are_checked_for_purpose_name_and_size() -> None:
    async def body(sim: Simulator, url: str, session: aiohttp.ClientSession) -> None:
        assert (await upload(session, url, line("a"), purpose="fine-tune"))[0] == 400
        assert (await upload(session, url, line("a"), name="in.csv"))[0] == 400
        status, err = await upload(session, url, line("a") * 10)
        assert status == 400 and err["error"]["code"] == "file_too_large"
        async with session.post(f"{url}/files", data=b"x", headers={}) as resp:
            assert resp.status == 401
    serve(SimConfig(batch={"max_file_bytes": 500}), body)


def test_lifecycle_counts_shuffle_and_answers_equal_to_chat() -> None:
    data = b"".join(line(f"c{i}", f"text {i}") for i in range(30))

    async def body(sim: Simulator, url: str, session: aiohttp.ClientSession) -> None:
        _, b = await create(session, url, data, pipeline_job="j", pipeline_chunk="1")
        seen = await poll_until_done(session, url, b["id"])
        statuses = [s["status"] for s in seen]
        assert statuses == ["validating", "in_progress", "in_progress", "finalizing", "completed"]
        progress = [s["request_counts"]["completed"] for s in seen if s["status"] == "in_progress"]
        assert progress == sorted(progress) and seen[-1]["request_counts"] == {"total": 30, "completed": 30,
                                                                               "failed": 0}
        out = await content(session, url, seen[-1]["output_file_id"])
        ids = [o["custom_id"] for o in out]
        assert sorted(ids) == sorted(f"c{i}" for i in range(30)) and ids != [f"c{i}" for i in range(30)]
        # The same body on the chat endpoint gets the same content and usage, at twice the price.
        first = next(o for o in out if o["custom_id"] == "c3")["response"]["body"]
        _, chat = await call(session, "POST", f"{url}/chat/completions", orjson.loads(line("c3", "text 3"))["body"])
        assert chat["choices"][0]["message"] == first["choices"][0]["message"]
        assert chat["usage"]["completion_tokens"] == first["usage"]["completion_tokens"]
        assert chat["usage"]["cost"] == 2 * first["usage"]["cost"]
        _, listed = await call(session, "GET", f"{url}/batches?limit=1")
        assert listed["data"][0]["metadata"] == {"pipeline_job": "j", "pipeline_chunk": "1"}
        assert sim.stats["batch"]["created_by_chunk"] == {"j:1": 1}
    serve(SimConfig(), body)


def test_line_failures_and_expiry_go_to_the_error_file() -> None:
    data = b"".join(line(f"c{i}", f"t{i}") for i in range(200))

    async def body(sim: Simulator, url: str, session: aiohttp.ClientSession) -> None:
        _, b = await create(session, url, data)
        final = (await poll_until_done(session, url, b["id"]))[-1]
        assert final["status"] == "expired"
        out = await content(session, url, final["output_file_id"])
        err = await content(session, url, final["error_file_id"])
        assert len(out) + len(err) == 200
        codes = [e["response"]["status_code"] if e["response"] else e["error"]["code"] for e in err]
        assert codes.count("batch_expired") == 100  # half answered before the window closed
        assert {400, 500} <= set(codes)
        assert final["request_counts"]["completed"] == len(out)
    serve(SimConfig(batch={"expire": [1], "expire_done_ratio": 0.5, "line_rate_4xx": 0.1, "line_rate_5xx": 0.1}), body)


def test_cancel_and_the_429s_on_create() -> None:
    async def body(sim: Simulator, url: str, session: aiohttp.ClientSession) -> None:
        _, b = await create(session, url, line("a") + line("b"))
        status, again = await create(session, url, line("c"))
        assert status == 429 and again["error"]["code"] == "rate_limit_exceeded"
        _, cancelling = await call(session, "POST", f"{url}/batches/{b['id']}/cancel")
        assert cancelling["status"] == "cancelling"
        final = (await poll_until_done(session, url, b["id"]))[-1]
        assert final["status"] == "cancelled"
        err = await content(session, url, final["error_file_id"])
        assert {e["error"]["code"] for e in err} == {"batch_cancelled"}
        assert (await create(session, url, line("c")))[0] == 200  # room again
    serve(SimConfig(batch={"max_active": 1}), body)


def test_the_enqueued_token_queue_refuses_with_429() -> None:
    async def body(sim: Simulator, url: str, session: aiohttp.ClientSession) -> None:
        assert (await create(session, url, line("a", "x " * 40)))[0] == 200
        status, err = await create(session, url, line("b", "y " * 40))
        assert status == 429 and err["error"]["code"] == "token_limit_exceeded"
    serve(SimConfig(batch={"max_enqueued_tokens": 40}), body)  # ~27 tokens a request


def test_a_download_resumes_with_range() -> None:
    async def body(sim: Simulator, url: str, session: aiohttp.ClientSession) -> None:
        _, b = await create(session, url, line("a") + line("b"))
        final = (await poll_until_done(session, url, b["id"]))[-1]
        async with session.get(f"{url}/files/{final['output_file_id']}/content", headers=AUTH) as resp:
            whole = await resp.read()
        async with session.get(f"{url}/files/{final['output_file_id']}/content",
                               headers={**AUTH, "Range": "bytes=10-"}) as resp:
            assert resp.status == 206 and await resp.read() == whole[10:]
            assert resp.headers["Content-Range"] == f"bytes 10-{len(whole) - 1}/{len(whole)}"
        async with session.get(f"{url}/files/{final['output_file_id']}/content",
                               headers={**AUTH, "Range": f"bytes={len(whole)}-"}) as resp:
            assert resp.status == 416
    serve(SimConfig(), body)


def test_switches_for_servers_without_lists_a_failing_upload_and_deletes() -> None:
    async def body(sim: Simulator, url: str, session: aiohttp.ClientSession) -> None:
        status, f = await upload(session, url, line("a"))
        assert status == 200
        assert (await call(session, "GET", f"{url}/files"))[0] == 405
        assert (await call(session, "GET", f"{url}/batches"))[0] == 405
        assert (await call(session, "DELETE", f"{url}/files/{f['id']}")) == (
            200, {"id": f["id"], "object": "file", "deleted": True})
        assert (await call(session, "GET", f"{url}/files/{f['id']}"))[0] == 404
        assert (await call(session, "DELETE", f"{url}/files/{f['id']}"))[0] == 404
        sim.cfg.batch.upload_status = 500
        status, err = await upload(session, url, line("a"))
        assert status == 500 and err["error"]["type"] == "server_error"
        assert sim.stats["batch"]["upload_attempts"] == 2 and sim.stats["batch"]["files_deleted"] == 1
    serve(SimConfig(batch={"list_files": False, "list_batches": False}), body)


def test_batches_of_a_held_model_stay_in_progress_until_released() -> None:
    async def body(sim: Simulator, url: str, session: aiohttp.ClientSession) -> None:
        _, held = await create(session, url, line("h", model="strong"))
        _, free = await create(session, url, line("f", model="weak"))
        assert (await poll_until_done(session, url, free["id"]))[-1]["status"] == "completed"
        for _ in range(10):
            _, b = await call(session, "GET", f"{url}/batches/{held['id']}")
            assert b["status"] in ("validating", "in_progress")
        sim.batches.cfg.hold_models = []
        assert (await poll_until_done(session, url, held["id"]))[-1]["status"] == "completed"
    serve(SimConfig(batch={"hold_models": ["strong"]}), body)
