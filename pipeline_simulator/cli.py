"""Command-line face of the simulator: ``pipeline simulate`` (and ``python -m pipeline_simulator``).

Flags override a ``--config`` file, which overrides SimConfig defaults; only flags actually given
are applied, so ``--config`` plus one ``--rate-503`` changes just that rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import RATE_FAULTS, SimConfig, load_fault_plan
from .server import LOOPBACK, Simulator

DEFAULT_PORT = 8089

# (flag, SimConfig field, type, help)
_VALUE_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--flavor", "flavor", str, "openrouter | openai | vllm | llamacpp (body shapes, envelopes, headers)"),
    ("--seed", "seed", int, "seed for content and fault draws"),
    ("--latency-ms", "latency_ms", float, "mean latency (0 = answer immediately)"),
    ("--latency-jitter-ms", "latency_jitter_ms", float, "uniform jitter around the mean"),
    ("--latency-tail-prob", "latency_tail_prob", float, "probability of a long-tail request"),
    ("--latency-tail-multiplier", "latency_tail_multiplier", float, "latency multiplier for tail requests"),
    ("--latency-per-token-ms", "latency_per_output_token_ms", float, "extra latency per output token"),
    ("--new-schema-latency-ms", "new_schema_latency_ms", float, "extra latency on a json_schema's first use"),
    ("--edge-timeout-s", "edge_timeout_s", float, "requests slower than this get 524 (openrouter) or 408"),
    ("--hang-s", "hang_s", float, "how long a 'hang' fault holds the request"),
    ("--retry-after-s", "retry_after_s", float, "Retry-After sent with random 429/503 faults"),
    ("--rpm", "rpm", int, "requests-per-minute limit (token bucket, starts full)"),
    ("--tpm", "tpm", int, "tokens-per-minute limit (token bucket, starts full)"),
    ("--limit-burst-s", "limit_burst_s", float, "seconds of the rpm/tpm limits a burst may use (60 = a minute)"),
    ("--credits-usd", "credits_usd", float, "prepaid credits; 402 once used up"),
    ("--context-tokens", "context_tokens", int, "context window; longer prompts get 400"),
    ("--stream-comments", "stream_comments", int, "': OPENROUTER PROCESSING' lines before the first token"),
    ("--stream-comment-interval-ms", "stream_comment_interval_ms", float, "spacing of keep-alive comments"),
    ("--stream-chunk-ms", "stream_chunk_ms", float, "delay between streamed content chunks"),
    ("--stream-usage-delay-ms", "stream_usage_delay_ms", float, "delay before the final usage chunk"),
    ("--stream-error-after-chunks", "stream_error_after_chunks", int, "content chunks before a stream fault"),
    ("--stream-error-code", "stream_error_code", str, "int | string: error code type in mid-stream error events"),
    ("--generation-delay-s", "generation_delay_s", float, "/generation answers 404 until this has passed"),
)
_BOOL_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--stream-split-writes", "stream_split_writes", "split SSE frames across TCP writes (mid-JSON, mid-\\n\\n)"),
    ("--stream-crlf", "stream_crlf", "end SSE lines with CRLF"),
    ("--stream-error-done", "stream_error_done", "send [DONE] after a mid-stream error event"),
    ("--stream-obfuscation", "stream_obfuscation", "add OpenAI's 'obfuscation' field to chunks"),
    ("--stream-comments-between", "stream_comments_between", "keep-alive comments between content chunks too"),
    ("--vllm-legacy-errors", "vllm_legacy_errors", "older vLLM's flat {\"object\":\"error\",...} error bodies"),
    ("--upscale-images", "upscale_images", "upscale small images to a 768-px short side when counting tokens"),
)


def _loopback(value: str) -> str:
    if value != LOOPBACK:
        raise argparse.ArgumentTypeError(f"the simulator only listens on {LOOPBACK}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)")
    parser.add_argument("--host", type=_loopback, default=LOOPBACK, help=f"only {LOOPBACK} is allowed")
    parser.add_argument("--config", metavar="FILE", help="SimConfig as YAML/JSON; flags override it")
    parser.add_argument("--fault-plan", metavar="FILE", help="scripted faults (YAML/JSON list of rules)")
    parser.add_argument("--api-key", help="accept only this bearer key (prefer --api-key-env)")
    parser.add_argument("--api-key-env", metavar="VAR", help="accept only the key in this environment variable")
    for flag, field, kind, text in _VALUE_FLAGS:
        parser.add_argument(flag, dest=field, type=kind, default=None, help=text)
    for name in RATE_FAULTS:
        parser.add_argument(f"--rate-{name.replace('_', '-')}", dest=f"rate_{name}", type=float, default=None,
                            help=f"probability (0..1) of a random '{name}' fault per request")
    for flag, field, text in _BOOL_FLAGS:
        parser.add_argument(flag, dest=field, action="store_true", default=None, help=text)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Build a SimConfig from parsed flags; raises ValueError with a readable message."""
    data: dict[str, Any] = {}
    config_file = getattr(args, "config", None)
    if config_file:
        text = Path(config_file).read_text(encoding="utf-8")
        loaded = json.loads(text) if config_file.endswith(".json") else yaml.safe_load(text)
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a mapping of simulator settings")
        data.update(loaded)
    fields = [f for _, f, _, _ in _VALUE_FLAGS] + [f"rate_{n}" for n in RATE_FAULTS] + [f for _, f, _ in _BOOL_FLAGS]
    for field in fields:
        value = getattr(args, field, None)
        if value is not None:
            data[field] = value
    key_env = getattr(args, "api_key_env", None)
    if key_env:
        key = os.environ.get(key_env)
        if not key:
            raise ValueError(f"--api-key-env {key_env}: the variable is not set")
        data["api_key"] = key
    elif getattr(args, "api_key", None):
        data["api_key"] = args.api_key
    plan_file = getattr(args, "fault_plan", None)
    if plan_file:
        data["fault_plan"] = [rule.model_dump() for rule in load_fault_plan(plan_file)]
    try:
        return SimConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid simulator settings: {problems}") from None


def serve(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM; prints the base URL on stdout. Returns an exit code."""
    try:
        cfg = config_from_args(args)
        host = _loopback(getattr(args, "host", LOOPBACK) or LOOPBACK)
    except (ValueError, OSError, argparse.ArgumentTypeError, yaml.YAMLError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    port = int(getattr(args, "port", DEFAULT_PORT))
    try:
        asyncio.run(_serve(cfg, host, port))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # e.g. port already in use
        print(f"simulate: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(cfg: SimConfig, host: str, port: int) -> None:
    sim = Simulator(cfg)
    url = await sim.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signal support
            pass
    print(url, flush=True)
    print(f"simulator ({cfg.flavor}) serving {url}/chat/completions - Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline_simulator",
                                     description="OpenAI/OpenRouter-compatible simulator on loopback")
    add_arguments(parser)
    return serve(parser.parse_args(argv))
