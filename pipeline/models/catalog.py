"""Facts about models that shape a request: context window, longest output, structured-output modes.

Names are matched as served by OpenAI-compatible routers: 'openai/gpt-4-turbo' and 'gpt-4-turbo' are
the same model. Context windows and output caps use the longest matching prefix of the name without
its provider prefix; structured capabilities use globs, first match wins (specific snapshots first).
"""
from __future__ import annotations

import fnmatch

# Longest matching prefix of the model name (provider prefix dropped) wins; others get the default.
CONTEXT_WINDOWS: dict[str, int] = {
    "gpt-4-turbo": 128_000, "gpt-4-1106": 128_000, "gpt-4-0125": 128_000, "gpt-4-vision": 128_000,
    "gpt-4o": 128_000, "gpt-4.1": 1_047_576, "gpt-4-32k": 32_768, "gpt-4": 8_192, "gpt-3.5-turbo": 16_385,
    "gpt-5": 400_000, "o1": 200_000, "o3": 200_000, "o4-mini": 200_000, "claude": 200_000,
    "gemini-1.5-pro": 2_097_152, "gemini": 1_048_576, "llama-3.1": 131_072, "llama-3.2": 131_072,
    "llama-3.3": 131_072, "mistral-large": 128_000, "qwen2.5": 32_768,
}
DEFAULT_CONTEXT = 128_000
# Longest output a model can produce (same prefix rule). Bounds a request's worst-case cost when
# max_tokens is absent, and a configured max_tokens above it is an error before anything is sent.
MAX_OUTPUT_TOKENS: dict[str, int] = {
    "gpt-4-turbo": 4_096, "gpt-4-1106": 4_096, "gpt-4-0125": 4_096, "gpt-4-vision": 4_096,
    "gpt-4o-2024-05-13": 4_096, "gpt-4o": 16_384, "gpt-4.1": 32_768, "gpt-3.5-turbo": 4_096,
}

# Model glob (fnmatch, case-insensitive) -> supported structured modes, best first; the first matching
# glob wins, so specific snapshots come before family globs.
# gpt-4-turbo and its previews lack json_schema (OpenAI 400, OpenRouter 404 with require_parameters).
# Tool first, not json_object: function calling puts the schema where these models were fine-tuned to
# follow it (required keys, enums, nesting), while JSON mode only guarantees syntax and leaves the schema
# to a prompt instruction; it is also what LangChain and the OpenAI cookbooks used for extraction
# before structured outputs existed. json_object stays as the fallback for routes without tools.
_LEGACY = ["tool", "json_object"]
_MODERN = ["json_schema", "tool", "json_object"]
BUILTIN_CAPABILITIES: dict[str, list[str]] = {  # matched with and without OpenRouter's "openai/" prefix
    "gpt-4-turbo*": _LEGACY, "gpt-4-1106*": _LEGACY, "gpt-4-0125*": _LEGACY,
    # The first gpt-4o snapshot predates structured outputs (OpenAI: 2024-08-06 and later only).
    "gpt-4o-2024-05-13": _LEGACY,
    "gpt-4o*": _MODERN, "gpt-4.1*": _MODERN, "gpt-5*": _MODERN, "o1*": _MODERN, "o3*": _MODERN, "o4*": _MODERN,
}
# Unknown models: vLLM and llama.cpp constrain decoding with json_schema, and auto steps down if not.
DEFAULT_CAPABILITIES: list[str] = ["json_schema", "json_object", "tool"]


def context_window(model: str) -> int:
    """Context size in tokens for a model name such as 'openai/gpt-4-turbo' (default 128k)."""
    best = _longest_prefix(model, CONTEXT_WINDOWS)
    return CONTEXT_WINDOWS[best] if best else DEFAULT_CONTEXT


def max_output_tokens(model: str) -> int | None:
    """The model's output cap (4096 for gpt-4-turbo), or None when the table does not know it."""
    best = _longest_prefix(model, MAX_OUTPUT_TOKENS)
    return MAX_OUTPUT_TOKENS[best] if best else None


def _longest_prefix(model: str, table: dict[str, int]) -> str | None:
    name = model.rsplit("/", 1)[-1].lower()
    return max((p for p in table if name.startswith(p)), key=len, default=None)


def capabilities(model: str, extra: dict[str, list[str]] | None = None) -> list[str]:
    """Supported structured modes for a model, best first: config entries win over the built-in table."""
    names = {model.lower(), model.lower().removeprefix("openai/")}
    for table in (extra or {}, BUILTIN_CAPABILITIES):
        for glob, modes in table.items():
            if any(fnmatch.fnmatchcase(name, glob.lower()) for name in names):
                return list(modes)
    return list(DEFAULT_CAPABILITIES)


# Provider prompt caching (prepare/caching.py). "breakpoint": only what ends at a cache_control mark is
# cached (Anthropic; Gemini through OpenRouter); "automatic": the provider caches long prefixes on its own
# (OpenAI and the OpenAI-compatible ones). Minimum cacheable prefix in tokens, longest prefix of the name
# wins: OpenAI 1,024; Anthropic 1,024 on Sonnet / Opus 4 and older Opus, 2,048 on the Haiku 3 family,
# 4,096 on Haiku 4.5 and Opus 4.5; Gemini 1,024 on Flash, 4,096 on Pro (its implicit-caching minimums).
_BREAKPOINT_VENDORS = ("anthropic/", "google/gemini")
_BREAKPOINT_NAMES = ("claude", "gemini")
CACHE_MIN_TOKENS: dict[str, int] = {
    "claude": 1_024, "claude-3-haiku": 2_048, "claude-3.5-haiku": 2_048, "claude-3-5-haiku": 2_048,
    "claude-haiku-4.5": 4_096, "claude-haiku-4-5": 4_096, "claude-opus-4.5": 4_096, "claude-opus-4-5": 4_096,
    "gemini": 1_024, "gemini-2.5-pro": 4_096, "gemini-3-pro": 4_096,
}
OPENAI_CACHE_MIN_TOKENS = 1_024
OPENAI_CACHE_STEP = 128  # OpenAI caches the prefix in steps of 128 tokens past the minimum


def prompt_cache_style(model: str) -> str:
    """'breakpoint' (Anthropic, Gemini: cache_control marks) or 'automatic' (OpenAI and compatible)."""
    name = model.lower()
    bare = name.rsplit("/", 1)[-1]
    return "breakpoint" if name.startswith(_BREAKPOINT_VENDORS) or bare.startswith(_BREAKPOINT_NAMES) else "automatic"


def cache_min_tokens(model: str) -> int:
    """The shortest prefix the provider caches for this model."""
    if prompt_cache_style(model) == "automatic":
        return OPENAI_CACHE_MIN_TOKENS
    best = _longest_prefix(model, CACHE_MIN_TOKENS)
    return CACHE_MIN_TOKENS[best] if best else 1_024


def cacheable_tokens(model: str, shared_tokens: int) -> int:
    """Tokens of a shared prefix of this length the provider would serve from its cache (0 below the minimum)."""
    least = cache_min_tokens(model)
    if shared_tokens < least:
        return 0
    if prompt_cache_style(model) == "automatic":
        return least + (shared_tokens - least) // OPENAI_CACHE_STEP * OPENAI_CACHE_STEP
    return shared_tokens


def cached_reads_exempt(model: str) -> bool:
    """Whether the provider leaves cached prompt reads out of its input-tokens-per-minute limit (Anthropic,
    on its current models); OpenAI counts them."""
    return "claude" in model.lower()
