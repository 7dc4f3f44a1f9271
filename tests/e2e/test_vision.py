"""Vision inputs end to end: every kind of image value, on the wire (simulator log), in the token estimate
the limiter and the dry run use, as per-row failures, and never copied into the outputs or the store."""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pipeline
from pipeline.config import load_config
from pipeline.engines.estimate import estimate
from pipeline_simulator import SimConfig, SimulatorThread
from tests.support import cli_in_process

KEY_ENV = "VISION_TEST_KEY"


def picture(size: tuple[int, int], fmt: str, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=fmt)
    return out.getvalue()


def animated_gif() -> bytes:
    out = io.BytesIO()
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Any]:
    """A Parquet input whose rows hold each kind of image value, next to the files it names."""
    files = {"big.png": picture((1024, 1024), "PNG"), "still.gif": picture((64, 64), "GIF"),
             "anim.gif": animated_gif(), "pic.bmp": picture((16, 16), "BMP"), "wide.png": picture((2048, 1024), "PNG")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with open(tmp_path / "huge.png", "wb") as fh:  # 21 MB (sparse): over the limit, never worth decoding
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.truncate(21 * 1024 * 1024)
    jpeg = picture((300, 200), "JPEG")
    webp_url = "data:image/webp;base64," + base64.b64encode(picture((100, 100), "WEBP")).decode()
    rows: list[dict[str, Any]] = [
        {"path": "big.png"},                                        # local path, relative to the input file
        {"path": "https://example.com/cat.jpg"},                    # URL: sent as is, never fetched
        {"path": webp_url},                                         # data URL
        {"raw": jpeg},                                              # raw bytes in a binary column
        {"path": "still.gif"},                                      # a non-animated GIF is fine
        {"many": ["big.png", "https://example.com/dog.png"]},      # a list of values
        {"path": "anim.gif"}, {"path": "pic.bmp"}, {"path": "huge.png"}, {"path": "nope.png"},  # failures
    ]
    table = pa.table({
        "rid": [f"r{i}" for i in range(len(rows))],
        "text": [f"photo {i}" for i in range(len(rows))],
        "path": pa.array([r.get("path") for r in rows], pa.string()),
        "raw": pa.array([r.get("raw") for r in rows], pa.binary()),
        "many": pa.array([r.get("many") for r in rows], pa.list_(pa.string())),
    })
    pq.write_table(table, tmp_path / "photos.parquet")
    return {"jpeg": jpeg, "webp_url": webp_url}


def vision_cfg(tmp_path: Path, base_url: str = "simulator", **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "input": {"path": str(tmp_path / "photos.parquet"), "id_column": "rid"},
        "endpoint": {"base_url": base_url, "model": "openai/gpt-4-turbo", "api_key_env": KEY_ENV},
        "prompt": {"system": "Describe photos.", "user": "Describe {{ text }}.", "images": ["path", "raw", "many"],
                   "image_detail": "high"},
        "params": {"max_tokens": 50},
        "limits": {"requests_per_minute": None, "max_concurrency": 4, "backoff_base_s": 0.01},
        "output": {"dir": str(tmp_path / "out"), "compression": "none"},
        "run": {"progress": False},
    }
    for name, value in sections.items():
        cfg[name] = {**cfg.get(name, {}), **value}
    return cfg


# 1024x1024 high: 765; a URL is assumed 1024x1024: 765; 100x100, 300x200, 64x64: one tile, 255.
TOKENS = {"r0": 765, "r1": 765, "r2": 255, "r3": 255, "r4": 255, "r5": 765 + 765}


def test_every_kind_of_image_value_on_the_wire(tmp_path: Path, images: dict[str, Any],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    thread = SimulatorThread(SimConfig())
    url = thread.start()
    try:
        est = estimate(load_config(vision_cfg(tmp_path, url)))  # the dry run's (and limiter's) figure
        s = pipeline.run(vision_cfg(tmp_path, url))
        log = [e["body"] for e in thread.sim.log if e["path"].endswith("/chat/completions")]
    finally:
        thread.stop()
    assert (s.exit_code, s.succeeded, s.failed) == (1, 6, 4)
    sent = {b["messages"][-1]["content"][0]["text"].split()[-1].rstrip("."): b["messages"][-1]["content"] for b in log}
    assert sorted(sent) == ["0", "1", "2", "3", "4", "5"]
    for parts in sent.values():  # the text part first, then the images, each with the configured detail
        assert parts[0]["type"] == "text" and all(p["type"] == "image_url" for p in parts[1:])
        assert all(p["image_url"]["detail"] == "high" for p in parts[1:])
    urls = {k: [p["image_url"]["url"] for p in v[1:]] for k, v in sent.items()}
    assert urls["0"][0].startswith("data:image/png;base64,")
    assert base64.b64decode(urls["0"][0].split(",", 1)[1]) == (tmp_path / "big.png").read_bytes()
    assert urls["1"] == ["https://example.com/cat.jpg"]
    assert urls["2"] == [images["webp_url"]]
    assert urls["3"] == ["data:image/jpeg;base64," + base64.b64encode(images["jpeg"]).decode()]
    assert urls["4"][0].startswith("data:image/gif;base64,")
    assert urls["5"][0] == urls["0"][0] and urls["5"][1] == "https://example.com/dog.png"

    fail = pl.read_parquet(tmp_path / "out" / "failures.parquet").sort("rid")
    messages = dict(zip(fail["rid"], fail["message"]))
    assert set(fail["error_class"]) == {"input"}
    assert "animated GIF" in messages["r6"] and "it is BMP" in messages["r7"]
    assert "over the 20 MB per-image limit" in messages["r8"] and "not found" in messages["r9"]
    assert all("photos.parquet row" in m for m in messages.values())

    # The simulator counts image tokens by its own implementation of the tile rule: ours must agree.
    res = pl.read_parquet(tmp_path / "out" / "results.parquet").sort("rid")
    assert est.image_tokens == sum(TOKENS.values()) and est.images == 7
    for rid, prompt in zip(res["rid"], res["prompt_tokens"]):
        text_only = prompt - TOKENS[rid]
        assert 15 <= text_only <= 25, (rid, prompt)  # system + user text, a few tokens either way


def test_image_bytes_are_not_copied_into_outputs_or_store(tmp_path: Path, images: dict[str, Any]) -> None:
    s = pipeline.run(vision_cfg(tmp_path))
    assert s.succeeded == 6
    big = (tmp_path / "big.png").read_bytes()
    needles = [b"data:image", base64.b64encode(images["jpeg"])[200:260], images["jpeg"][300:360],
               base64.b64encode(big)[100:160], images["webp_url"][-60:].encode()]
    out = tmp_path / "out"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "store.sqlite" for p in files) and any(p.name == "results.parquet" for p in files)
    for path in files:  # outputs are uncompressed here (compression: none), so a copy would show
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, (path.name, needle[:20])
    store = out / "store.sqlite"
    assert store.stat().st_size < 100_000  # the raw *responses* only: small next to ~10 images


def test_downscale_to_max_side_and_its_token_estimate(tmp_path: Path, images: dict[str, Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pq.write_table(pa.table({"rid": ["w"], "text": ["wide"], "path": ["wide.png"]}), tmp_path / "photos.parquet")
    monkeypatch.setenv(KEY_ENV, "sk-test")
    cfg = vision_cfg(tmp_path, prompt={"images": ["path"], "image_max_side": 1024})
    # 2048x1024 would be 6 tiles (1105 tokens); downscaled to 1024x512 it is 2 tiles.
    assert estimate(load_config(cfg)).image_tokens == 425
    thread = SimulatorThread(SimConfig())
    try:
        cfg["endpoint"]["base_url"] = thread.start()
        assert pipeline.run(cfg).succeeded == 1
        body = next(e["body"] for e in thread.sim.log if e["path"].endswith("/chat/completions"))
    finally:
        thread.stop()
    url = body["messages"][-1]["content"][1]["image_url"]["url"]
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as img:
        assert (img.format, img.size) == ("PNG", (1024, 512))
    res = pl.read_parquet(tmp_path / "out" / "results.parquet")
    assert 425 < res["prompt_tokens"][0] < 425 + 25


def test_limiter_estimate_counts_image_tokens(tmp_path: Path, images: dict[str, Any]) -> None:
    pq.write_table(pa.table({"rid": ["big", "small"], "text": ["a", "b"], "path": ["big.png", "still.gif"]}),
                   tmp_path / "photos.parquet")
    # 700 tokens/minute: ~20 of text + 50 max_tokens fit with a one-tile image (255), not with 765.
    s = pipeline.run(vision_cfg(tmp_path, prompt={"images": ["path"]}, limits={"tokens_per_minute": 700}))
    assert (s.succeeded, s.failed) == (1, 1)
    fail = pl.read_parquet(tmp_path / "out" / "failures.parquet").row(0, named=True)
    assert (fail["rid"], fail["error_class"]) == ("big", "permanent")
    assert "more than limits.tokens_per_minute (700)" in fail["message"]


def test_detail_low_is_85_tokens_an_image(tmp_path: Path, images: dict[str, Any]) -> None:
    est = estimate(load_config(vision_cfg(tmp_path, prompt={"image_detail": "low"})))
    assert (est.images, est.image_tokens) == (7, 7 * 85)


def test_vision_demo_config_runs_on_the_simulator(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    p = cli_in_process("run", str(repo / "configs/vision-demo.yaml"), "-q", "--set", f"output.dir={out}",
                       "--set", "endpoint.simulator.latency_ms=0", cwd=repo)
    assert p.returncode == 0, p.stderr
    res = pl.read_parquet(out / "results.parquet")
    assert res.height == 11 and res["ttft_s"].null_count() == 0
    assert set(res["output"].struct.field("shape").cast(pl.String)) <= {"circle", "square", "triangle", "other"}


def test_price_per_image_when_the_endpoint_reports_no_cost(tmp_path: Path, images: dict[str, Any]) -> None:
    pq.write_table(pa.table({"rid": ["one", "two"], "text": ["a", "b"], "path": ["big.png", None],
                             "many": [None, ["still.gif", "https://x.org/y.png"]]},
                            schema=pa.schema([("rid", pa.string()), ("text", pa.string()), ("path", pa.string()),
                                              ("many", pa.list_(pa.string()))])),
                   tmp_path / "photos.parquet")
    price = {"input_per_m": 10.0, "output_per_m": 30.0, "per_image": 0.5}
    cfg = vision_cfg(tmp_path, prompt={"images": ["path", "many"]}, endpoint={"simulator": {"flavor": "openai"}})
    cfg["prices"] = {"openai/gpt-4-turbo": price}
    assert pipeline.run(cfg).succeeded == 2
    res = pl.read_parquet(tmp_path / "out" / "results.parquet").sort("rid")
    for n_images, row in zip((1, 2), res.iter_rows(named=True)):
        tokens = row["prompt_tokens"] * 10.0 / 1e6 + row["completion_tokens"] * 30.0 / 1e6
        assert row["cost_usd"] == pytest.approx(tokens + n_images * 0.5)
