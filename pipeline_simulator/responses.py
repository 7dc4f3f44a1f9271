"""Success bodies and stream chunks, shaped like each flavor's real payloads."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from .answer import Answer
from .envelopes import SimError, error_object, string_code

OBJECT = "chat.completion"
CHUNK = "chat.completion.chunk"


@dataclass(slots=True)
class Meta:
    """Per-response identity and prices."""

    flavor: str
    id: str
    created: int
    model: str
    provider: str
    fingerprint: str
    price_in: float  # USD per token
    price_out: float
    price_cached: float = 0.0  # per cached prompt token
    price_write: float = 0.0  # per prompt token written to the cache

    def prompt_cost(self, a: Answer) -> float:
        uncached = max(0, a.prompt_tokens - a.cached_tokens - a.cache_write_tokens)
        return uncached * self.price_in + a.cached_tokens * self.price_cached + a.cache_write_tokens * self.price_write

    def cost(self, answer: Answer) -> float:
        return self.prompt_cost(answer) + answer.completion_tokens * self.price_out


def usage(meta: Meta, a: Answer) -> dict[str, Any]:
    total = a.prompt_tokens + a.completion_tokens
    if meta.flavor == "openrouter":
        prompt_cost = meta.prompt_cost(a)
        out_cost = a.completion_tokens * meta.price_out
        return {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens, "total_tokens": total,
                "cost": round(prompt_cost + out_cost, 12), "is_byok": False,
                "prompt_tokens_details": {"cached_tokens": a.cached_tokens, "cache_write_tokens": a.cache_write_tokens,
                                          "audio_tokens": 0, "video_tokens": 0},
                "cost_details": {"upstream_inference_cost": None,
                                 "upstream_inference_prompt_cost": round(prompt_cost, 12),
                                 "upstream_inference_completions_cost": round(out_cost, 12)},
                "completion_tokens_details": {"reasoning_tokens": 0, "image_tokens": 0, "audio_tokens": 0}}
    if meta.flavor == "openai":
        return {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens, "total_tokens": total,
                "prompt_tokens_details": {"cached_tokens": a.cached_tokens, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
    if meta.flavor == "vllm":
        return {"prompt_tokens": a.prompt_tokens, "total_tokens": total, "completion_tokens": a.completion_tokens,
                "prompt_tokens_details": None}
    return {"completion_tokens": a.completion_tokens, "prompt_tokens": a.prompt_tokens, "total_tokens": total}


def _tool_calls(a: Answer) -> list[dict[str, Any]]:
    return [{"id": a.tool_id, "type": "function", "function": {"name": a.tool_name, "arguments": a.tool_args}}]


def _message(meta: Meta, a: Answer) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": a.content}
    if meta.flavor == "openrouter":
        msg["refusal"] = a.refusal
        msg["reasoning"] = None
    elif meta.flavor == "openai":
        msg["refusal"] = a.refusal
        msg["annotations"] = []
    elif meta.flavor == "vllm":
        msg.update({"refusal": a.refusal, "annotations": None, "audio": None, "function_call": None,
                    "tool_calls": [], "reasoning_content": None})
    elif a.refusal is not None:  # llama.cpp has no refusal field; the text is the content
        msg["content"] = a.refusal
    if a.tool_name is not None:
        msg["tool_calls"] = _tool_calls(a)
    return msg


def _logprobs(a: Answer) -> dict[str, Any] | None:
    return {"content": a.logprobs, "refusal": None} if a.logprobs is not None else None


def completion_body(meta: Meta, a: Answer, error: SimError | None = None) -> dict[str, Any]:
    """A non-streaming chat.completion; ``error`` makes it OpenRouter's partial-content error choice."""
    choice: dict[str, Any] = {"index": 0, "message": _message(meta, a), "logprobs": _logprobs(a),
                              "finish_reason": "error" if error else a.finish_reason}
    f = meta.flavor
    if a.more and error is None:  # n samples: the same choice shape, one per sample
        body = completion_body(meta, replace(a, more=None))
        first = body["choices"][0]
        for i, m in enumerate(a.more, 1):
            extra = {**first, "index": i, "message": _message(meta, m), "finish_reason": m.finish_reason}
            if "logprobs" in first:
                extra["logprobs"] = _logprobs(m)
            body["choices"].append(extra)
        return body
    if f == "openrouter":
        choice["native_finish_reason"] = "error" if error else a.finish_reason
        if error is not None:
            choice["error"] = error_object(error, f, meta.provider)
        return {"id": meta.id, "provider": meta.provider, "model": meta.model, "object": OBJECT,
                "created": meta.created, "choices": [choice], "system_fingerprint": meta.fingerprint,
                "usage": usage(meta, a)}
    if f == "openai":
        return {"id": meta.id, "object": OBJECT, "created": meta.created, "model": meta.model, "choices": [choice],
                "usage": usage(meta, a), "service_tier": "default", "system_fingerprint": meta.fingerprint}
    if f == "vllm":
        choice["stop_reason"] = None
        return {"id": meta.id, "object": OBJECT, "created": meta.created, "model": meta.model, "choices": [choice],
                "usage": usage(meta, a), "prompt_logprobs": None, "kv_transfer_params": None}
    del choice["logprobs"]
    return {"choices": [choice], "created": meta.created, "model": meta.model, "system_fingerprint": meta.fingerprint,
            "object": OBJECT, "usage": usage(meta, a), "id": meta.id}


def error_200_body(meta: Meta, error: SimError) -> dict[str, Any]:
    """OpenRouter's 200 that carries only an error (no choices): clients must not treat it as success."""
    body: dict[str, Any] = {"error": error_object(error, meta.flavor, meta.provider)}
    if meta.flavor == "openrouter":
        body["user_id"] = "user_sim_0001"
    return body


class ChunkMaker:
    """Builds the chunk dicts of one stream; every chunk shares id, created and model."""

    def __init__(self, meta: Meta, include_usage: bool, obfuscation: bool, string_codes: bool = False) -> None:
        self.meta = meta
        self.include_usage = include_usage and meta.flavor != "openrouter"
        self.obfuscation = obfuscation and meta.flavor == "openai"
        self.string_codes = string_codes and meta.flavor == "openrouter"

    def chunk(self, delta: dict[str, Any], finish: str | None = None,
              logprobs: list[dict[str, Any]] | None = None, index: int = 0) -> dict[str, Any]:
        """One chunk of choice `index`; `logprobs` are the tokens this delta writes (None: the chunk has none)."""
        m = self.meta
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
        lp = {"content": logprobs, "refusal": None} if logprobs is not None else None
        if m.flavor == "openrouter":
            choice["native_finish_reason"] = finish
            choice["logprobs"] = lp
            return {"id": m.id, "provider": m.provider, "model": m.model, "object": CHUNK, "created": m.created,
                    "choices": [choice], "system_fingerprint": m.fingerprint}
        if m.flavor == "llamacpp":
            return {"choices": [choice], "created": m.created, "id": m.id, "model": m.model,
                    "system_fingerprint": m.fingerprint, "object": CHUNK}
        choice["logprobs"] = lp
        out: dict[str, Any] = {"id": m.id, "object": CHUNK, "created": m.created, "model": m.model}
        if m.flavor == "openai":
            out["service_tier"] = "default"
            out["system_fingerprint"] = m.fingerprint
        out["choices"] = [choice]
        if self.include_usage:
            out["usage"] = None
        if self.obfuscation:
            out["obfuscation"] = "x" * (1 + len(str(delta)) % 7)
        return out

    def usage_chunk(self, a: Answer) -> dict[str, Any]:
        m = self.meta
        out: dict[str, Any] = {"id": m.id, "object": CHUNK, "created": m.created, "model": m.model, "choices": [],
                               "usage": usage(m, a)}
        if m.flavor == "openrouter":
            out["provider"] = m.provider
            out["system_fingerprint"] = m.fingerprint
        elif m.flavor == "openai":
            out["service_tier"] = "default"
            out["system_fingerprint"] = m.fingerprint
        return out

    def error_chunk(self, error: SimError) -> dict[str, Any]:
        """The mid-stream error event: OpenRouter's unified chunk, else a bare ``{"error":...}``."""
        m = self.meta
        if m.flavor != "openrouter":
            return {"error": error_object(error, m.flavor, m.provider)}
        obj = error_object(error, m.flavor, m.provider)
        if self.string_codes and isinstance(obj.get("code"), int):
            obj["code"] = string_code(obj["code"])
        return {"id": m.id, "object": CHUNK, "created": m.created, "model": m.model, "provider": m.provider,
                "error": obj,
                "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error",
                             "native_finish_reason": "error", "logprobs": None}]}

    def body_chunks(self, a: Answer, low: int, high: int) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                                   dict[str, Any]]:
        """(role chunk, content/tool/refusal delta chunks of random sizes, final chunk with finish_reason).

        An answer with logprobs streams as OpenAI does: one token per content chunk, each chunk carrying that
        token in `logprobs.content` (the role chunk an empty list, the final chunk null), so the chunks'
        logprobs put together are the whole answer's. With n samples (`a.more`) every choice streams under
        its own index, their chunks interleaved, each choice ending with its own finish_reason."""
        first, middle, final = self._choice_chunks(a, 0, low, high)
        if not a.more:
            return first, middle, final
        others = [self._choice_chunks(m, i, low, high) for i, m in enumerate(a.more, 1)]
        lanes = [middle] + [o[1] for o in others]
        mixed = [lane[k] for k in range(max(len(lane) for lane in lanes)) for lane in lanes if k < len(lane)]
        return first, [o[0] for o in others] + mixed + [o[2] for o in others], final

    def _choice_chunks(self, a: Answer, index: int, low: int, high: int
                       ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
        if a.logprobs is not None and a.tool_name is None and a.refusal is None and self.meta.flavor != "llamacpp":
            first = self.chunk({"role": "assistant", "content": "", "refusal": None}, logprobs=[], index=index)
            middle = [self.chunk({"content": t["token"]}, logprobs=[t], index=index) for t in a.logprobs]
            return first, middle, self.chunk({}, a.finish_reason, index=index)
        rng = random.Random(a.rng_seed ^ 0x5EED ^ index)
        pieces = _split(a.output, rng, low, high)
        if a.tool_name is not None:
            first = self.chunk({"role": "assistant", "content": None, "tool_calls": [
                {"index": 0, "id": a.tool_id, "type": "function", "function": {"name": a.tool_name, "arguments": ""}}]},
                index=index)
            middle = [self.chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}, index=index)
                      for p in pieces]
        elif a.refusal is not None and self.meta.flavor != "llamacpp":
            first = self.chunk({"role": "assistant", "content": None, "refusal": ""}, index=index)
            middle = [self.chunk({"refusal": p}, index=index) for p in pieces]
        else:
            first = self.chunk({"role": "assistant", "content": ""}, index=index)
            middle = [self.chunk({"content": p}, index=index) for p in pieces]
        return first, middle, self.chunk({}, a.finish_reason, index=index)


def _split(text: str, rng: random.Random, low: int, high: int) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(text):
        step = rng.randint(low, high)
        out.append(text[i:i + step])
        i += step
    return out
