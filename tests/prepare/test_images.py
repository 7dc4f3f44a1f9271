from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.errors import RowError
from pipeline.prepare import images
from pipeline.prepare.images import ImageEncoder, image_tokens, sniff_format

ORIGIN = ("/data/in.jsonl", 3)


def make_image(fmt: str, size: tuple[int, int] = (40, 20), frames: int = 1) -> bytes:
    out = io.BytesIO()
    first = Image.new("RGB", size, (200, 30, 30))
    if frames > 1:
        rest = [Image.new("RGB", size, (30, 30, 200 - i)) for i in range(frames - 1)]
        first.save(out, format=fmt, save_all=True, append_images=rest)
    else:
        first.save(out, format=fmt)
    return out.getvalue()


def parts(value: Any, base_dir: str = "/data", **kw: Any) -> tuple[list[dict[str, Any]], int]:
    return ImageEncoder(**kw).parts(value, base_dir=base_dir, origin=ORIGIN, column="photo")


def decode(url: str) -> tuple[str, bytes]:
    header, _, payload = url.partition(",")
    return header, base64.b64decode(payload)


@pytest.mark.parametrize("w, h, detail, tokens", [
    (1024, 1024, "high", 765), (2048, 4096, "high", 1105), (4096, 8192, "low", 85),
    (512, 512, "high", 255), (100, 100, "auto", 255), (768, 768, "auto", 765), (4096, 1024, "high", 765),
    (1000, 3000, "high", 1445),
])
def test_image_tokens_rule(w: int, h: int, detail: str, tokens: int) -> None:
    assert image_tokens(w, h, detail) == tokens


@pytest.mark.parametrize("fmt, name", [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp"), ("GIF", "gif")])
def test_bytes_become_data_urls_of_their_real_format(fmt: str, name: str) -> None:
    data = make_image(fmt)
    assert sniff_format(data) == name
    got, tokens = parts(data, detail="low")
    assert got == [{"type": "image_url", "image_url": {"url": got[0]["image_url"]["url"], "detail": "low"}}]
    header, raw = decode(got[0]["image_url"]["url"])
    assert header == f"data:image/{name};base64" and raw == data and tokens == 85


def test_local_path_relative_to_input_folder(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    data = make_image("PNG", (1024, 1024))
    (tmp_path / "img" / "a.jpg").write_bytes(data)  # a misleading extension: the bytes decide
    got, tokens = parts("img/a.jpg", base_dir=str(tmp_path), detail="high")
    header, raw = decode(got[0]["image_url"]["url"])
    assert header == "data:image/png;base64" and raw == data and tokens == 765
    same, _ = parts(f"file://{tmp_path}/img/a.jpg", base_dir=str(tmp_path), detail="high")
    assert same == got
    with pytest.raises(RowError, match="outside the folders images may be read from"):
        parts(f"file://{tmp_path}/img/a.jpg", base_dir="/elsewhere")  # a file outside the input's folder


def test_urls_pass_through_with_assumed_size() -> None:
    got, tokens = parts("https://example.com/cat.png", detail="auto")
    assert got[0]["image_url"] == {"url": "https://example.com/cat.png", "detail": "auto"} and tokens == 765
    assert parts("http://example.com/cat.png", detail="low")[1] == 85


def test_data_url_round_trip_and_mime_fix() -> None:
    data = make_image("JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    got, _ = parts(url)
    assert got[0]["image_url"]["url"] == url
    lying = "data:image/png;base64," + base64.b64encode(data).decode()
    fixed = parts(lying)[0][0]["image_url"]["url"]
    assert fixed.startswith("data:image/jpeg;base64,") and decode(fixed)[1] == data
    shrunk = parts("data:image/png;base64," + base64.b64encode(make_image("PNG", (400, 100))).decode(), max_side=40)
    with Image.open(io.BytesIO(decode(shrunk[0][0]["image_url"]["url"])[1])) as img:
        assert img.size == (40, 10)
    with pytest.raises(RowError, match="invalid base64"):
        parts("data:image/png;base64,!!!")
    with pytest.raises(RowError, match="data:image/<format>;base64"):
        parts("data:text/plain,hello")


def test_lists_none_and_struct_values() -> None:
    png = make_image("PNG")
    got, tokens = parts([png, None, "https://a/b.png", ""], detail="low")
    assert len(got) == 2 and tokens == 170
    assert parts(None) == ([], 0) and parts([]) == ([], 0)
    struct, _ = parts({"bytes": png, "path": "ignored.png"}, detail="low")
    assert decode(struct[0]["image_url"]["url"])[1] == png


def test_rejects_animated_gif_and_other_formats() -> None:
    with pytest.raises(RowError, match="animated GIF"):
        parts(make_image("GIF", frames=3))
    with pytest.raises(RowError, match="it is BMP.*PNG, JPEG, WEBP or non-animated GIF") as info:
        parts(make_image("BMP"))
    assert (info.value.file, info.value.row) == ORIGIN and "column 'photo'" in str(info.value)
    with pytest.raises(RowError, match="not an image"):
        parts(b"hello world")
    with pytest.raises(RowError, match="item 1"):
        parts([make_image("PNG"), b"nope"])
    with pytest.raises(RowError, match="not int"):
        parts(5)


def test_oversize_rejected_with_size(tmp_path: Path) -> None:
    big = make_image("PNG", (300, 300))
    big = big + b"\0" * (21 * 1_048_576 - len(big))  # trailing bytes: still a readable PNG, 21 MB
    (tmp_path / "big.png").write_bytes(big)
    with pytest.raises(RowError, match=r"over the 20 MB per-image limit") as info:
        parts("big.png", base_dir=str(tmp_path))
    assert (info.value.file, info.value.row) == ORIGIN
    with pytest.raises(RowError, match=r"image is 21\.0 MB, over the 20 MB per-image limit"):
        parts(big)  # in memory the size is known; a file is never read past the limit, so it is not said
    got, _ = parts(big, max_side=100)  # downscaling brings it under the limit
    assert len(decode(got[0]["image_url"]["url"])[1]) < images.MAX_IMAGE_BYTES


def test_downscale_keeps_format_and_aspect(tmp_path: Path) -> None:
    for fmt, name in (("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp"), ("GIF", "gif")):
        data = make_image(fmt, (1000, 500))
        got, tokens = parts(data, max_side=200, detail="high")
        header, raw = decode(got[0]["image_url"]["url"])
        assert header == f"data:image/{name};base64"
        with Image.open(io.BytesIO(raw)) as img:
            assert img.size == (200, 100) and img.format == fmt
        assert tokens == image_tokens(200, 100, "high")
    small = make_image("PNG", (100, 50))
    got, _ = parts(small, max_side=200)
    assert decode(got[0]["image_url"]["url"])[1] == small  # small enough: not re-encoded


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(RowError) as info:
        parts("nope/missing.png", base_dir=str(tmp_path))
    assert "nope/missing.png" in str(info.value) and "not found" in str(info.value)
    assert (info.value.file, info.value.row) == ORIGIN
    with pytest.raises(RowError, match="not a regular file"):
        parts(str(tmp_path), base_dir=str(tmp_path))
