"""Token approximation: text at ~4 characters per token, images by the GPT-4 Turbo tile rule.

Real tokenizers are not needed: clients only need counts that move with the input the way the
real ones do, including the image cost a vision batch is dominated by.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any

import orjson
from PIL import Image, UnidentifiedImageError

PER_MESSAGE_TOKENS = 4  # role and separators, as OpenAI's own cookbook counts them
REPLY_PRIMING_TOKENS = 3
LOW_DETAIL_TOKENS = 85
TILE_TOKENS = 170
_HEADER_B64_CHARS = 96 * 1024  # enough base64 for PNG/GIF/WebP headers and most JPEG SOF markers


def text_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def image_tokens(width: int, height: int, detail: str, upscale: bool = False) -> int:
    """GPT-4 Turbo vision cost: 85 for low detail, else 85 + 170 per 512-px tile."""
    if detail == "low" or width <= 0 or height <= 0:
        return LOW_DETAIL_TOKENS
    w, h = float(width), float(height)
    if max(w, h) > 2048:  # fit inside 2048x2048
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    short = min(w, h)
    if short > 768 or (upscale and short < 768):  # shortest side to 768 (downscale-only by default)
        scale = 768 / short
        w, h = w * scale, h * scale
    tiles = math.ceil(round(w, 6) / 512) * math.ceil(round(h, 6) / 512)
    return LOW_DETAIL_TOKENS + TILE_TOKENS * tiles


class ImageSizer:
    """Reads image dimensions from data URLs, decoding only the header bytes.

    No cache: decoding ~100 kB of base64 is cheaper than hashing a multi-megabyte URL, and a
    cache keyed by the URL itself would pin every image of a long run in memory.
    """

    def __init__(self, remote_size: tuple[int, int]) -> None:
        self.remote_size = remote_size

    def size(self, url: str) -> tuple[int, int]:
        if not url.startswith("data:"):
            return self.remote_size  # never fetch: the simulator must not leave loopback
        return _data_url_size(url) or self.remote_size


def _data_url_size(url: str) -> tuple[int, int] | None:
    comma = url.find(",")
    if comma == -1 or ";base64" not in url[:comma]:
        return None
    payload = url[comma + 1:]
    head = payload[:_HEADER_B64_CHARS]
    attempts = [head[: len(head) - len(head) % 4]]
    if len(payload) > len(head):  # header beyond the first slice (e.g. big EXIF before SOF)
        attempts.append(payload)
    for chunk in attempts:
        try:
            with Image.open(io.BytesIO(base64.b64decode(chunk))) as img:
                return img.size
        except (binascii.Error, UnidentifiedImageError, OSError, ValueError):
            continue
    return None


def prompt_tokens(body: dict[str, Any], sizer: ImageSizer, upscale: bool) -> tuple[int, int]:
    """(prompt tokens, image count) for a chat request body."""
    total = REPLY_PRIMING_TOKENS
    images = 0
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        total += PER_MESSAGE_TOKENS
        content = message.get("content")
        if isinstance(content, str):
            total += text_tokens(content)
            continue
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "text":
                total += text_tokens(str(part.get("text", "")))
            elif kind == "image_url":
                spec = part.get("image_url")
                spec = {"url": spec} if isinstance(spec, str) else (spec or {})
                width, height = sizer.size(str(spec.get("url", "")))
                total += image_tokens(width, height, str(spec.get("detail") or "auto"), upscale)
                images += 1
    if body.get("tools"):  # function definitions are part of the prompt the model reads
        total += text_tokens(orjson.dumps(body["tools"]).decode())
    return total, images
