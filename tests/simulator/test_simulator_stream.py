"""Streaming (SSE) behaviour of the simulator, and compatibility with the official openai SDK types."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest

from pipeline_simulator import FaultRule, SimConfig, Simulator, SimulatorThread
from tests.simclient import serve

AUTH = {"Authorization": "Bearer sk-test"}
SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": ["a", "b"]},
                                           "reasons": {"type": "array", "items": {"type": "string"}, "minItems": 3}},
          "required": ["label", "reasons"], "additionalProperties": False}
FMT = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": SCHEMA}}


def body(stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "Label this review."}],
            "response_format": FMT, "stream": stream, **extra}




async def raw_stream(s: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> tuple[int, Any, list[bytes]]:
    """Status, headers and the body exactly as the TCP reads delivered it."""
    async with s.post(url + "/chat/completions", data=orjson.dumps(payload), headers=AUTH) as resp:
        pieces = [piece async for piece in resp.content.iter_any()]
        return resp.status, resp.headers, pieces


def events(text: str) -> list[tuple[str, str]]:
    """Parse SSE into (field, value) events; comments come back as (":", text)."""
    out: list[tuple[str, str]] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block:
            continue
        for line in block.split("\n"):
            if line.startswith(":"):
                out.append((":", line[1:].strip()))
            else:
                field, _, value = line.partition(": ")
                out.append((field, value))
    return out


def data_json(evts: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [json.loads(v) for f, v in evts if f == "data" and v != "[DONE]"]


def joined_content(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def test_openrouter_stream_framing() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, headers, pieces = await raw_stream(s, url, body())
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        text = b"".join(pieces).decode()
        evts = events(text)
        assert evts[0] == (":", "OPENROUTER PROCESSING") and evts[1] == (":", "OPENROUTER PROCESSING")
        assert evts[-1] == ("data", "[DONE]") and text.endswith("data: [DONE]\n\n")
        chunks = data_json(evts)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
        assert headers["X-Generation-Id"] == chunks[0]["id"]
        usage = chunks[-1]
        assert usage["choices"] == [] and usage["usage"]["cost"] > 0
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
        sizes = {len(c["choices"][0]["delta"].get("content", "")) for c in chunks[1:-2]}
        assert len(sizes) > 2  # deltas of varying size
        content = joined_content(chunks)
        jsonschema.validate(json.loads(content), SCHEMA)
        _, _, plain = await raw_stream(s, url, body(stream=False))
        assert json.loads(b"".join(plain))["choices"][0]["message"]["content"] == content
        assert sim.stats["streams"] == 1
    serve(SimConfig(), check)


def test_openai_usage_chunk_only_when_requested() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        _, _, pieces = await raw_stream(s, url, body())
        evts = events(b"".join(pieces).decode())
        assert not [e for e in evts if e[0] == ":"]
        chunks = data_json(evts)
        assert all(c["choices"] and "usage" not in c for c in chunks)
        _, _, pieces = await raw_stream(s, url, body(stream_options={"include_usage": True}))
        chunks = data_json(events(b"".join(pieces).decode()))
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
        assert all(c["usage"] is None for c in chunks[:-1])
    serve(SimConfig(flavor="openai"), check)


def test_tool_call_stream() -> None:
    tool = {"type": "function", "function": {"name": "label", "parameters": SCHEMA}}
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        payload = body(tools=[tool], tool_choice={"type": "function", "function": {"name": "label"}})
        del payload["response_format"]
        _, _, pieces = await raw_stream(s, url, payload)
        chunks = data_json(events(b"".join(pieces).decode()))
        first = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
        assert first["index"] == 0 and first["id"] and first["function"]["name"] == "label"
        args = "".join(c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                       for c in chunks if c["choices"] and "tool_calls" in c["choices"][0]["delta"])
        jsonschema.validate(json.loads(args), SCHEMA)
        assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    serve(SimConfig(), check)


def test_split_writes_and_crlf() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        _, _, pieces = await raw_stream(s, url, body())
        assert len(pieces) > 5
        assert any(not p.endswith(b"\r\n\r\n") and not p.endswith(b"\r\n") for p in pieces)  # mid-JSON
        assert any(p.endswith(b"\r\n") and not p.endswith(b"\r\n\r\n") for p in pieces)  # mid-terminator
        text = b"".join(pieces).decode()
        assert "\r\n\r\n" in text and "\n\n" not in text.replace("\r\n\r\n", "")
        chunks = data_json(events(text))
        jsonschema.validate(json.loads(joined_content(chunks)), SCHEMA)
    serve(SimConfig(stream_split_writes=True, stream_split_delay_ms=1, stream_crlf=True), check)


def test_paced_stream_with_keepalives() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        async with s.post(url + "/chat/completions", json=body(), headers=AUTH) as resp:
            start = loop.time()
            first = await resp.content.readuntil(b"\n\n")
            assert first == b": OPENROUTER PROCESSING\n\n" and loop.time() - start < 0.1
            rest = (await resp.read()).decode()
        elapsed = loop.time() - start
        assert elapsed >= 0.15
        evts = events(rest)
        assert sum(1 for e in evts if e[0] == ":") >= 3  # extra keep-alives while waiting for the first token
        assert evts[-1] == ("data", "[DONE]")
    serve(SimConfig(latency_ms=200, stream_comments=1, stream_comment_interval_ms=40, stream_chunk_ms=1), check)

    async def late_usage(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        async with s.post(url + "/chat/completions", json=body(), headers=AUTH) as resp:
            text = b""
            while b'"finish_reason":"stop"' not in text:
                text += await resp.content.readany()
            start = asyncio.get_running_loop().time()
            rest = await resp.read()
        assert asyncio.get_running_loop().time() - start >= 0.1 and b'"choices":[]' in rest
    serve(SimConfig(stream_usage_delay_ms=150), late_usage)


@pytest.mark.parametrize("done", [False, True])
def test_openrouter_mid_stream_error(done: bool) -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, _, pieces = await raw_stream(s, url, body())
        assert status == 200
        chunks = data_json(events(b"".join(pieces).decode()))
        content_chunks = [c for c in chunks if "error" not in c][1:]
        assert len(content_chunks) == 2
        err = chunks[-1]
        assert err["error"]["code"] == 429 and isinstance(err["error"]["message"], str)
        assert err["choices"][0]["finish_reason"] == "error" and err["choices"][0]["delta"] == {"content": ""}
        assert b"".join(pieces).decode().endswith("data: [DONE]\n\n") == done
        assert sim.stats["by_fault"] == {"stream_error": 1} and sim.stats["served_by_body"] == {}
    serve(SimConfig(fault_plan=[FaultRule(requests="1", fault="stream_error", after_chunks=2, status=429,
                                          done=done)]), check)


def test_other_flavor_stream_errors() -> None:
    async def vllm(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        _, _, pieces = await raw_stream(s, url, body())
        chunks = data_json(events(b"".join(pieces).decode()))
        assert chunks[-1] == {"error": {"message": chunks[-1]["error"]["message"], "type": "Bad Gateway",
                                        "param": None, "code": 502}}
        _, _, pieces = await raw_stream(s, url, body())
        evts = events(b"".join(pieces).decode())
        assert evts[-2][0] == "error" and json.loads(evts[-2][1])["code"] == 502
        assert evts[-1] == ("data", "[DONE]")
    serve(SimConfig(flavor="vllm", fault_plan=[FaultRule(requests="1", fault="stream_error"),
                                               FaultRule(requests="2", fault="stream_error_legacy")]), vllm)


def test_stream_truncation_and_missing_usage() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        received = bytearray()
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.post(url + "/chat/completions", json=body(), headers=AUTH) as resp:
                async for piece in resp.content.iter_any():
                    received += piece
        assert b"[DONE]" not in received and received.count(b"data: ") >= 1
        _, _, pieces = await raw_stream(s, url, body())
        evts = events(b"".join(pieces).decode())
        chunks = data_json(evts)
        assert evts[-1] == ("data", "[DONE]") and all(c["choices"] for c in chunks)  # no usage chunk
        _, _, pieces = await raw_stream(s, url, body())
        assert data_json(events(b"".join(pieces).decode()))[-1]["choices"] == []
    serve(SimConfig(fault_plan=[FaultRule(requests="1", fault="stream_truncate", after_chunks=3),
                                FaultRule(requests="2", fault="stream_no_usage")]), check)


def test_stream_content_faults() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        _, _, pieces = await raw_stream(s, url, body())  # refusal
        chunks = data_json(events(b"".join(pieces).decode()))
        refusal = "".join(c["choices"][0]["delta"].get("refusal") or "" for c in chunks if c["choices"])
        assert refusal == "I'm sorry, I can't help with that." and joined_content(chunks) == ""
        _, _, pieces = await raw_stream(s, url, body())  # malformed event
        data_values = [v for f, v in events(b"".join(pieces).decode()) if f == "data" and v != "[DONE]"]
        with pytest.raises(ValueError):
            [json.loads(v) for v in data_values]
        _, _, pieces = await raw_stream(s, url, body())  # error_200: error event before any content
        chunks = data_json(events(b"".join(pieces).decode()))
        assert len(chunks) == 1 and chunks[0]["error"]["code"] == 502
    serve(SimConfig(fault_plan=[FaultRule(requests="1", fault="refusal"), FaultRule(requests="2", fault="malformed"),
                                FaultRule(requests="3", fault="error_200")]), check)


@pytest.mark.parametrize("flavor", ["openrouter", "openai", "vllm", "llamacpp"])
def test_openai_sdk_types_accept_bodies_and_chunks(flavor: str) -> None:
    openai_types = pytest.importorskip("openai.types.chat")
    tool = {"type": "function", "function": {"name": "label", "parameters": SCHEMA}}
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        variants = [body(), body(tools=[tool], tool_choice="required", stream_options={"include_usage": True}),
                    body(max_tokens=3), body(logprobs=True, top_logprobs=2), body(n=3, temperature=1.0)]
        for payload in variants:
            _, _, plain = await raw_stream(s, url, {**payload, "stream": False})
            completion = openai_types.ChatCompletion.model_validate(json.loads(b"".join(plain)))
            assert completion.choices[0].finish_reason in ("stop", "tool_calls", "length")
            _, _, pieces = await raw_stream(s, url, payload)
            for chunk in data_json(events(b"".join(pieces).decode())):
                openai_types.ChatCompletionChunk.model_validate(chunk)
    serve(SimConfig(flavor=flavor), check)


def test_official_openai_client_end_to_end() -> None:
    openai = pytest.importorskip("openai")
    with SimulatorThread(SimConfig(flavor="openai", api_key="sk-test", fault_plan=[FaultRule(requests="1", fault="503",
                                                                          retry_after=0.05)])) as url:
        client = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=2)
        completion = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                                    response_format=FMT)
        jsonschema.validate(json.loads(completion.choices[0].message.content or ""), SCHEMA)
        stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_keepalive_comments_between_chunks() -> None:
    async def unpaced(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        _, _, pieces = await raw_stream(s, url, body())
        evts = events(b"".join(pieces).decode())
        content = [i for i, e in enumerate(evts) if e[0] == "data" and '"content"' in e[1]]
        # Every content chunk after the first is preceded by a keep-alive comment.
        assert all(evts[i - 1][0] == ":" for i in content[2:])
        assert joined_content(data_json(evts))
    serve(SimConfig(stream_comments_between=True), unpaced)

    async def paced(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        _, _, pieces = await raw_stream(s, url, body())
        evts = events(b"".join(pieces).decode())
        first_data = next(i for i, e in enumerate(evts) if e[0] == "data")
        between = sum(1 for e in evts[first_data:] if e[0] == ":")
        chunks = len(data_json(evts))
        assert between >= 2 * (chunks - 4)  # 25 ms gaps hold two 10-ms keep-alives each
    serve(SimConfig(stream_comments_between=True, stream_comment_interval_ms=10, stream_chunk_ms=25,
                    stream_chunk_chars=(20, 40)), paced)


def test_official_openai_client_streams_through_keepalives_and_string_error_codes() -> None:
    openai = pytest.importorskip("openai")
    cfg = SimConfig(stream_comments=2, stream_comments_between=True, stream_split_writes=True,
                    stream_split_delay_ms=0, stream_error_code="string",
                    fault_plan=[FaultRule(requests="2", fault="stream_error", status=502, after_chunks=2)])
    with SimulatorThread(cfg) as url:
        client = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
        chunks = list(client.chat.completions.create(model="openai/gpt-4o", stream=True,
                                                     messages=[{"role": "user", "content": "hi"}]))
        assert chunks[-1].usage is not None and any(c.choices and c.choices[0].delta.content for c in chunks)
        with pytest.raises(openai.APIError) as info:  # the SDK raises on an SSE event that carries an error
            list(client.chat.completions.create(model="openai/gpt-4o", stream=True,
                                                messages=[{"role": "user", "content": "hi"}]))
        assert isinstance(info.value.body, dict) and info.value.body.get("code") == "server_error"


def test_string_mid_stream_error_code_is_classified_by_the_pipeline() -> None:
    from pipeline.errors import RateLimited, TransientError
    from pipeline.send.classify import classify
    from pipeline.send.transport import HttpTransport

    async def run() -> list[type[Exception]]:
        plan = [FaultRule(requests="1", fault="stream_error", status=502),
                FaultRule(requests="2", fault="stream_error", status=429)]
        sim = Simulator(SimConfig(stream_error_code="string", fault_plan=plan))
        url = await sim.start()
        transport = HttpTransport(url, "sk-test")
        kinds: list[type[Exception]] = []
        try:
            for _ in range(2):
                try:
                    classify(await transport.send(orjson.dumps(body()), stream=True))
                except TransientError as exc:
                    kinds.append(type(exc))
        finally:
            await transport.close()
            await sim.stop()
        return kinds

    assert asyncio.run(run()) == [TransientError, RateLimited]
