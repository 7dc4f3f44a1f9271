"""Vision inputs: image column values into chat content parts, with a token estimate per image.

A value may be an http(s) URL (sent as is, never fetched), a `data:image/...;base64,` URL, a local
path (relative to the input file's folder; `file://` accepted), raw bytes, a Hugging Face style
`{"bytes": ..., "path": ...}` struct, or a list of these. None, "" and [] mean "no image".

Rows are untrusted, and a local image is uploaded: a path is read only when its realpath (symlinks
followed) lies inside an allowed root (the input file's folder, plus `prompt.image_roots`), only if it
is a regular file, and never more than the size limit plus one byte. A path outside the roots fails
the row with a message that does not say whether the file exists. `~` is not expanded.

Local files and bytes become base64 data URLs. The real format is read from the bytes, never from a
file name: PNG, JPEG, WEBP and non-animated GIF are what GPT-4 Turbo accepts (docs/wire.md §1.3), so
anything else fails the row here instead of costing a 400 later. Pixels are only decoded when an
image must be downscaled (`prompt.image_max_side`); otherwise Pillow reads the header for the size.

Token cost follows the GPT-4 Turbo rule (docs/wire.md §1.4). The size of a remote URL is unknown without
fetching it, so it is estimated as 1024x1024 (765 tokens at high/auto detail): a typical photo, and the
estimate is only used for tokens/minute pacing and budget forecasts, which real usage then corrects.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import RowError

MAX_IMAGE_BYTES = 20 * 1024 * 1024
# A local file that will be downscaled (prompt.image_max_side) may be larger than what is sent, not unbounded.
MAX_SOURCE_BYTES = 200 * 1024 * 1024
UNKNOWN_URL_SIZE = (1024, 1024)
SUPPORTED_FORMATS = ("png", "jpeg", "webp", "gif")
_SUPPORTED_TEXT = "PNG, JPEG, WEBP or non-animated GIF"
_JPEG_QUALITY = 90

# Signatures of formats people commonly have on disk, so a rejection can say what the file really is.
_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
)


def image_tokens(width: int, height: int, detail: str) -> int:
    """Prompt tokens one image costs on GPT-4 Turbo.

    low: always 85. high/auto: fit inside 2048x2048, then scale so the short side is 768 px (only
    ever down, as common implementations do), then 170 per 512 px tile plus 85.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if detail == "low":
        return 85
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    # Whole pixels, as the resized image would have; avoids 1536.0000001 counting an extra tile.
    tiles = math.ceil(int(w) / 512) * math.ceil(int(h) / 512)
    return 170 * tiles + 85


def sniff_format(data: bytes) -> str | None:
    """The image format from the magic bytes ("png", "jpeg", "webp", "gif"), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _describe_unsupported(data: bytes) -> str:
    head = data[:16].lstrip()
    for sig, name in _OTHER_SIGNATURES:
        if head.startswith(sig):
            return f"it is {name}"
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return f"it is an ISO media file ({data[8:12].decode('ascii', 'replace')}, e.g. HEIC/AVIF)"
    if not data:
        return "it is empty"
    return "the bytes are not an image"


@dataclass(slots=True)
class EncodedImage:
    """One image ready for the wire."""

    url: str
    width: int
    height: int
    tokens: int


class ImageEncoder:
    """Turns image column values into content parts; one per Renderer, holding only settings."""

    def __init__(self, detail: str = "auto", max_side: int | None = None, roots: Iterable[str] = ()) -> None:
        self.detail = detail
        self.max_side = max_side
        self._roots = tuple(os.path.realpath(r) for r in roots)
        self._url_tokens = image_tokens(*UNKNOWN_URL_SIZE, detail)

    def parts(
        self, value: Any, *, base_dir: str | None, origin: tuple[str, int], column: str
    ) -> tuple[list[dict[str, Any]], int]:
        """Content parts for one cell and their total token estimate. Raises RowError naming file+row."""
        if value is None:
            return [], 0
        items = value if isinstance(value, (list, tuple)) else (value,)
        parts: list[dict[str, Any]] = []
        tokens = 0
        for i, item in enumerate(items):
            try:
                enc = self._encode(item, base_dir=base_dir)
            except _ImageProblem as exc:
                where = f"column {column!r}" + (f" item {i}" if items is value else "")
                raise RowError(f"{where}: {exc}", file=origin[0], row=origin[1], reason="image") from None
            if enc is None:
                continue
            parts.append({"type": "image_url", "image_url": {"url": enc.url, "detail": self.detail}})
            tokens += enc.tokens
        return parts, tokens

    def _encode(self, item: Any, *, base_dir: str | None) -> EncodedImage | None:
        """One image value to a URL plus size; None for an empty value. Raises _ImageProblem."""
        if item is None:
            return None
        if isinstance(item, (bytes, bytearray, memoryview)):
            return self._from_bytes(bytes(item), what="the bytes")
        if isinstance(item, dict):
            # Hugging Face `Image` feature columns hold {"bytes": ..., "path": ...}.
            if item.get("bytes"):
                return self._from_bytes(bytes(item["bytes"]), what="the bytes")
            inner = item.get("url") or item.get("path")
            return self._encode(inner, base_dir=base_dir) if inner else None
        if not isinstance(item, str):
            raise _ImageProblem(
                f"an image must be a URL, a data URL, a file path or bytes, not {type(item).__name__}"
            )
        text = item.strip()
        if not text:
            return None
        low = text[:8].lower()
        if low.startswith(("http://", "https://")):
            w, h = UNKNOWN_URL_SIZE
            return EncodedImage(text, w, h, self._url_tokens)
        if low.startswith("data:"):
            return self._from_data_url(text)
        if low.startswith("file://"):
            text = text[7:]  # still judged by where it resolves, like any other path
        return self._from_file(text, base_dir)

    def _from_file(self, path: str, base_dir: str | None) -> EncodedImage:
        # No input folder (rows from a Ray dataset): only absolute paths inside prompt.image_roots, never the
        # working directory by default.
        full = os.path.realpath(os.path.join(base_dir, path)) if base_dir else os.path.realpath(path)
        roots = self._roots + ((os.path.realpath(base_dir),) if base_dir else ())
        if (base_dir is None and not os.path.isabs(path)) or not any(_inside(full, root) for root in roots):
            # Says nothing about whether the file exists: the row's author must not learn that either.
            raise _ImageProblem(f"image path {_short(path)} is outside the folders images may be read from "
                                "(the input file's folder, and prompt.image_roots); move the image there or "
                                "add its folder to prompt.image_roots")
        limit = MAX_SOURCE_BYTES if self.max_side else MAX_IMAGE_BYTES
        # Inside the roots, naming the resolved file helps and reveals nothing the row may not read anyway.
        return self._from_bytes(read_regular_file(full, full, limit), what=full)

    def _from_data_url(self, url: str) -> EncodedImage:
        header, sep, payload = url.partition(",")
        if not sep or not header.lower().endswith(";base64") or not header[5:].lower().startswith("image/"):
            raise _ImageProblem("a data URL must look like data:image/<format>;base64,<data>")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _ImageProblem("the data URL holds invalid base64") from None
        checked, fmt, width, height = self._inspect(data, what="the data URL")
        declared = header[11:-7].lower()
        if checked is data and (declared == fmt or (declared == "jpg" and fmt == "jpeg")):
            # Unchanged image with a truthful MIME type: send the caller's string, no re-encoding.
            return EncodedImage(url, width, height, image_tokens(width, height, self.detail))
        return self._data_url(checked, fmt, width, height)

    def _from_bytes(self, data: bytes, *, what: str) -> EncodedImage:
        return self._data_url(*self._inspect(data, what=what))

    def _inspect(self, data: bytes, *, what: str) -> tuple[bytes, str, int, int]:
        """Checked image bytes (downscaled if asked), the real format and the size sent."""
        if len(data) > MAX_IMAGE_BYTES and not self.max_side:
            raise _ImageProblem(_too_large(len(data), what))  # sent as is, so no need to decode it at all
        fmt = sniff_format(data)
        if fmt is None:
            raise _ImageProblem(f"{what}: not a supported image ({_describe_unsupported(data)}); "
                                f"give {_SUPPORTED_TEXT}")
        try:
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
            width, height = img.size
            if fmt == "gif" and getattr(img, "is_animated", False):
                raise _ImageProblem(f"{what}: an animated GIF is not accepted; give a single frame "
                                    f"({_SUPPORTED_TEXT})")
            if self.max_side and max(width, height) > self.max_side:
                data, width, height = _downscale(img, fmt, self.max_side)
        except Image.DecompressionBombError as exc:
            # Pillow refuses absurd pixel counts (a crafted or broken file); that is this row's problem only.
            raise _ImageProblem(f"{what}: {exc}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise _ImageProblem(f"{what}: cannot be read as a {fmt.upper()} image ({exc})") from None
        if len(data) > MAX_IMAGE_BYTES:
            raise _ImageProblem(_too_large(len(data), what))
        return data, fmt, width, height

    def _data_url(self, data: bytes, fmt: str, width: int, height: int) -> EncodedImage:
        url = f"data:image/{fmt};base64," + base64.b64encode(data).decode("ascii")
        return EncodedImage(url, width, height, image_tokens(width, height, self.detail))


def read_regular_file(full: str, shown: str, limit: int) -> bytes:
    """At most `limit` bytes of a regular file, else _ImageProblem; `full` is already a realpath.

    O_NOFOLLOW: a link swapped in after the realpath check is not followed. O_NONBLOCK: a FIFO cannot
    hang the open; fstat on the open descriptor then refuses anything but a regular file (FIFO,
    device, socket). The size is enforced while reading, never taken from stat (/dev/zero, /proc).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(full, flags)
    except FileNotFoundError:
        raise _ImageProblem(f"image file not found: {shown} (relative paths are resolved against the input "
                            "file's folder)") from None
    except OSError as exc:
        raise _ImageProblem(f"cannot read image file {shown}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _ImageProblem(f"image path {shown} is not a regular file")
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise _ImageProblem(f"cannot read image file {shown}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if got > limit:
        if limit > MAX_IMAGE_BYTES:
            raise _ImageProblem(f"{shown}: image file is over the {limit // 1_048_576} MB limit for an image to "
                                "downscale; shrink it")
        raise _ImageProblem(f"{shown}: image file is over the 20 MB per-image limit; shrink it or set "
                            "prompt.image_max_side")
    return b"".join(chunks)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _short(text: str) -> str:
    return repr(text) if len(text) <= 120 else repr(text[:117] + "...")


class _ImageProblem(Exception):
    """Internal: what is wrong with one image; ImageEncoder.parts adds the column, file and row."""


def _too_large(size: int, what: str) -> str:
    return (f"{what}: image is {size / 1_048_576:.1f} MB, over the 20 MB per-image limit; "
            "shrink it or set prompt.image_max_side")


def _downscale(img: Image.Image, fmt: str, max_side: int) -> tuple[bytes, int, int]:
    """Re-encode so the longest side is max_side, keeping the format and the aspect ratio."""
    img.load()
    if fmt == "jpeg":
        # The model never sees EXIF, so bake the orientation into the pixels while decoding anyway.
        img = ImageOps.exif_transpose(img)
    if img.mode in ("P", "1") and fmt != "gif":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif fmt == "gif" and img.mode != "RGBA":
        img = img.convert("RGBA")
    w, h = img.size
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = img.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if fmt == "jpeg":
        if small.mode not in ("RGB", "L", "CMYK"):
            small = small.convert("RGB")
        small.save(out, format="JPEG", quality=_JPEG_QUALITY)
    elif fmt == "webp":
        small.save(out, format="WEBP", quality=_JPEG_QUALITY)
    else:
        small.save(out, format=fmt.upper())
    return out.getvalue(), size[0], size[1]
