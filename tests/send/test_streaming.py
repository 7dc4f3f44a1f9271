"""params.stream: SSE through transport.py against the simulator, in every framing and stream fault mode."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest

import pipeline
from pipeline.errors import RateLimited, TransientError
from pipeline.send.classify import classify
from pipeline.send.transport import Reply, SSEParser, _Assembler
from tests.conftest import job

FLAVORS = ["openrouter", "openai"]
ROUGH = {"stream_split_writes": True, "stream_split_delay_ms": 0.2, "stream_crlf": True, "stream_comments": 3}


def stream_job(tmp_path: Path, rows: int, sim: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return job(tmp_path, rows, sim=sim, params={"stream": True, "max_tokens": 200, "temperature": 0}, **sections)


def results(tmp_path: Path) -> pl.DataFrame:
    return pl.read_parquet(tmp_path / "out" / "results.parquet").sort("rid")


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("framing", [{}, ROUGH], ids=["plain", "split+crlf"])
def test_streamed_answers_usage_and_time_to_first_token(tmp_path: Path, flavor: str, framing: dict[str, Any]) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "p").mkdir()
    sim = {"flavor": flavor, "latency_ms": 30, **framing}
    s = pipeline.run(stream_job(tmp_path / "s", 6, sim))
    assert (s.exit_code, s.succeeded, s.retries) == (0, 6, {})
    res = results(tmp_path / "s")
    assert res["ttft_s"].null_count() == 0
    # The simulator waits latency_ms before the first token; the answer ends after it.
    assert (res["ttft_s"] >= 0.03).all() and (res["ttft_s"] <= res["latency_s"]).all()
    assert (res["prompt_tokens"] > 0).all() and (res["completion_tokens"] > 0).all()  # from the usage chunk
    if flavor == "openai":  # no usage.cost: priced from the table at $10/$30 per million
        expected = res["prompt_tokens"] * 10 / 1e6 + res["completion_tokens"] * 30 / 1e6
        assert ((res["cost_usd"] - expected).abs() < 1e-12).all()
    assert (res["cost_usd"] > 0).all()
    # The same requests without streaming get the same answers, tokens and cost.
    plain = pipeline.run(job(tmp_path / "p", 6, sim={"flavor": flavor},
                             params={"max_tokens": 200, "temperature": 0}))
    assert plain.exit_code == 0
    other = results(tmp_path / "p")
    for col in ("output", "content", "prompt_tokens", "completion_tokens", "finish_reason", "model"):
        assert res[col].to_list() == other[col].to_list(), col
    assert "ttft_s" not in other.columns


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("framing", [{}, ROUGH], ids=["plain", "split+crlf"])
@pytest.mark.parametrize("fault,rule,retry_class", [
    ("stream_error", {}, "transient"),                       # error chunk, stream just ends
    ("stream_error", {"done": True}, "transient"),           # error chunk, then [DONE]
    ("stream_error", {"after_chunks": 0}, "transient"),      # before any content
    ("stream_error", {"status": 429}, "rate_limited"),       # a mid-stream rate limit pauses everyone
    ("stream_error_legacy", {}, "transient"),                # llama.cpp's `error:` field, then [DONE]
    ("stream_truncate", {}, "transient"),                    # connection dropped: no finish, no [DONE]
    ("malformed", {}, "transient"),                          # an event whose JSON never closes
    ("error_200", {}, "transient"),                          # the only event is an error
    ("error_200_partial", {}, "transient"),
])
def test_stream_faults_are_transient_and_retried(tmp_path: Path, flavor: str, framing: dict[str, Any], fault: str,
                                                 rule: dict[str, Any], retry_class: str) -> None:
    plan = [{"requests": "1-2", "fault": fault, **rule}]
    s = pipeline.run(stream_job(tmp_path, 5, {"flavor": flavor, "fault_plan": plan, **framing},
                                limits={"max_concurrency": 1}))
    assert (s.exit_code, s.succeeded, s.failed) == (0, 5, 0)
    assert s.retries == {retry_class: 2} and s.requests_sent == 7
    assert results(tmp_path)["ttft_s"].null_count() == 0


@pytest.mark.parametrize("flavor", FLAVORS)
def test_stream_without_usage_chunk_is_kept_and_costed_from_estimates(tmp_path: Path, flavor: str) -> None:
    plan = [{"requests": "1", "fault": "stream_no_usage"}]
    s = pipeline.run(stream_job(tmp_path, 3, {"flavor": flavor, "fault_plan": plan}, limits={"max_concurrency": 1}))
    assert (s.exit_code, s.succeeded, s.retries) == (0, 3, {})
    res = results(tmp_path)
    # Not free: the answer was paid for, so its tokens are estimated and priced (the budget sees them).
    assert (res["prompt_tokens"] > 0).all() and (res["completion_tokens"] > 0).all() and (res["cost_usd"] > 0).all()


def test_persistent_mid_stream_error_fails_the_row_keeping_partial_content(tmp_path: Path) -> None:
    plan = [{"requests": "1-100", "fault": "stream_error", "after_chunks": 2}]
    s = pipeline.run(stream_job(tmp_path, 1, {"fault_plan": plan, "stream_chunk_chars": [4, 4]},
                                limits={"max_concurrency": 1, "max_retries": 2}))
    assert (s.exit_code, s.failed) == (1, 1)
    fail = pl.read_parquet(tmp_path / "out" / "failures.parquet").row(0, named=True)
    assert fail["error_class"] == "transient" and fail["attempts"] == 3
    assert "middle of the stream" in fail["message"]


# -- the SSE decoder and assembler on their own --------------------------------------------------------

STREAM = (b": OPENROUTER PROCESSING\n\n: OPENROUTER PROCESSING\n\n"
          b'data: {"id":"gen-1","model":"m","provider":"P","choices":[{"index":0,"delta":{"role":"assistant",'
          b'"content":""}}]}\n\n'
          b'data: {"id":"gen-1","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
          b'data: {"id":"gen-1","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}\n\n'
          b'data: {"id":"gen-1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"cost":0.1}}\n\n'
          b"data: [DONE]\n\n")


def decode(data: bytes, step: int) -> list[tuple[str, bytes]]:
    parser = SSEParser()
    events: list[tuple[str, bytes]] = []
    for i in range(0, len(data), step):
        events += parser.feed(data[i:i + step])
    return events + parser.close()


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_decoder_gives_the_same_events_for_any_split_and_line_ending(eol: bytes) -> None:
    data = STREAM.replace(b"\n", eol)
    want = decode(STREAM, len(STREAM))
    assert len(want) == 5 and want[-1] == ("data", b"[DONE]")
    for step in (1, 2, 3, 7, 64, len(data)):
        assert decode(data, step) == want


def test_decoder_joins_data_lines_keeps_error_field_and_last_unterminated_event() -> None:
    assert decode(b"data: a\ndata: b\n\nevent: x\nid: 3\ndata: c", 4) == [("data", b"a\nb"), ("data", b"c")]
    assert decode(b'error: {"message":"boom"}\n\ndata: [DONE]\n\n', 5) == [
        ("error", b'{"message":"boom"}'), ("data", b"[DONE]")]


def assemble(data: bytes) -> dict[str, Any]:
    """The stream as the transport assembles it, judged by the one classifier."""
    acc = _Assembler()
    for name, payload in decode(data, 9):
        acc.event(name, payload)
    return classify(Reply(200, {}, orjson.dumps(acc.result()), 0.0, stream=True, cut_off=acc.cut_off))


def test_assembler_builds_one_completion_body() -> None:
    body = assemble(STREAM)
    assert body["choices"][0]["message"]["content"] == "Hello"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert (body["model"], body["provider"], body["usage"]["cost"]) == ("m", "P", 0.1)


def test_bad_endings_of_a_stream_are_transient_errors() -> None:
    cut = STREAM[:STREAM.index(b'data: {"id":"gen-1","choices":[{"index":0,"delta":{"content":"lo"}')]
    with pytest.raises(TransientError, match="without a finish_reason") as err:
        assemble(cut)
    assert err.value.content == "Hel"
    mid_error = cut + (b'data: {"error":{"code":502,"message":"Upstream gone","metadata":{"error_type":"provider_'
                       b'unavailable"}},"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}\n\n')
    with pytest.raises(TransientError, match="Upstream gone") as err:
        assemble(mid_error)
    assert type(err.value) is TransientError and err.value.content == "Hel"
    with pytest.raises(RateLimited):
        assemble(cut + b'data: {"error":{"code":"429","message":"slow down"}}\n\n')
    with pytest.raises(TransientError, match="not JSON"):
        assemble(cut + b'data: {"id":"gen-1","choi\n\n')
    # [DONE] without a finish_reason is a complete (if terse) stream.
    assert assemble(cut + b"data: [DONE]\n\n")["choices"][0]["message"]["content"] == "Hel"
    # A second choice (n > 1) does not bleed into the first.
    extra = STREAM.replace(b"data: [DONE]", orjson.dumps({"choices": [{"index": 1, "delta": {"content": "X"}}]})
                           + b"\n\ndata: [DONE]")
    assert assemble(extra)["choices"][0]["message"]["content"] == "Hello"


def test_assembler_puts_each_chunks_logprobs_together_in_order() -> None:
    """OpenAI's shape: the role chunk an empty list, one token per content chunk, null on the last chunk;
    a `logprobs.content` that is not a list (an untrusted server) adds nothing."""
    def token(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": []}
    tokens = [token('{"', 0.0), token("sent", -0.01), token('":"', 0.0), token("pos", -0.4), token('"}', 0.0)]
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                            "logprobs": {"content": [], "refusal": None}, "finish_reason": None}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": t["token"]},
                             "logprobs": {"content": [t], "refusal": None},
                             "finish_reason": None}]} for t in tokens]
    chunks.append({"choices": [{"index": 0, "delta": {}, "logprobs": {"content": "garbage"}, "finish_reason": None}]})
    chunks.append({"choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
    body = assemble(b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n")
    choice = body["choices"][0]
    assert choice["message"]["content"] == '{"sent":"pos"}'
    assert choice["logprobs"] == {"content": tokens}


def test_assembler_keeps_each_of_n_interleaved_choices() -> None:
    """n samples (votes) stream as chunks of several `index`es, interleaved; each choice is put together
    on its own, and the stream is whole only once every choice has its finish_reason."""
    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"choices": [{"index": index, "delta": delta,
                                                      "finish_reason": finish}]}) + b"\n\n"
    events = [chunk(0, {"role": "assistant", "content": ""}), chunk(1, {"role": "assistant", "content": ""}),
              chunk(0, {"content": '{"a":'}), chunk(1, {"content": '{"a":'}), chunk(1, {"content": "2}"}),
              chunk(0, {"content": "1}"}), chunk(1, {}, "stop"), chunk(0, {}, "length")]
    body = assemble(b"".join(events) + b"data: [DONE]\n\n")
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, '{"a":1}', "length"), (1, '{"a":2}', "stop")]
    with pytest.raises(TransientError, match="without a finish_reason"):
        assemble(b"".join(events[:-1]))   # choice 0 never finished and no [DONE]
    hostile = chunk(10**9, {"content": "x"}) + b'data: {"choices":[{"index":true,"delta":{"content":"y"}}]}\n\n'
    assert len(assemble(b"".join(events) + hostile + b"data: [DONE]\n\n")["choices"]) == 2


def test_assembler_skips_malformed_deltas_and_keeps_the_rest_of_a_paid_answer() -> None:
    """An untrusted stream's delta that is not an object, a tool call that is not one (or has an index that
    is not an integer), or a name/arguments that are not strings write nothing; the good chunks around them
    still make the answer, instead of an exception that would lose a paid answer."""
    def data(delta: Any, finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) \
            + b"\n\n"
    call = {"index": 0, "id": "c1", "function": {"name": "answer", "arguments": '{"a":'}}
    events = [data({"role": "assistant", "content": None, "tool_calls": [call]}), data("garbage"),
              data({"tool_calls": ["x", {"index": [1]}, {"index": 0, "function": {"name": 3, "arguments": "1}"}}]}),
              data({"tool_calls": {"index": 0}}), data({}, "tool_calls")]
    body = assemble(b"".join(events) + b"data: [DONE]\n\n")
    assert body["choices"][0]["message"]["tool_calls"] == [
        {"type": "function", "id": "c1", "function": {"name": "answer", "arguments": '{"a":1}'}}]
