"""Rows are untrusted: image paths stay inside the allowed roots and templates run in the sandbox.

Findings 1 and 2 of issue 13. Image values that try to reach files outside the input's folder (absolute
paths, `..`, `~`, `file://`, a symlink pointing out) fail their row with one message that does not say
whether the file exists; only regular files are read, and never more than the limit (a FIFO or
/dev/zero is a quick input failure, not a hang or an out-of-memory). Template payloads that reach
Python internals (the environment, os.popen) fail their row in the sandbox, also under --dry-run; an
unknown filter or a syntax error is a config error at start (exit 2) naming the key.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from PIL import Image

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ConfigError, RowError
from pipeline.prepare.images import ImageEncoder
from tests.conftest import job

ORIGIN = ("in.jsonl", 0)


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out, format="PNG")
    return out.getvalue()


def encode(value: Any, base: Path, **kw: Any) -> tuple[list[dict[str, Any]], int]:
    return ImageEncoder(**kw).parts(value, base_dir=str(base), origin=ORIGIN, column="photo")


def refusal(value: Any, base: Path, **kw: Any) -> str:
    with pytest.raises(RowError) as info:
        encode(value, base, **kw)
    return str(info.value)


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """data/ (the input's folder, with one good image) and secret/ beside it holding a readable file."""
    data, secret = tmp_path / "data", tmp_path / "secret"
    data.mkdir()
    secret.mkdir()
    (data / "ok.png").write_bytes(png())
    (secret / "key.png").write_bytes(png())  # a valid image: only the roots keep it from being uploaded
    return data, secret


def test_image_paths_escaping_the_input_folder_are_refused_alike(layout: tuple[Path, Path]) -> None:
    data, secret = layout
    (data / "link.png").symlink_to(secret / "key.png")
    (data / "dirlink").symlink_to(secret)
    assert encode("ok.png", data)[0]  # inside the root: read
    escapes = [str(secret / "key.png"), "../secret/key.png", f"file://{secret}/key.png", "link.png",
               "dirlink/key.png", {"path": str(secret / "key.png")}, "~/key.png", "sub/../../secret/key.png"]
    for value in escapes:
        msg = refusal(value, data)
        assert "outside the folders images may be read from" in msg or "not found" in msg, value
        assert "data:image" not in msg
    # An existing and a missing file outside the roots get the very same message, path aside.
    there = refusal(str(secret / "key.png"), data).replace("key.png", "X")
    missing = refusal(str(secret / "nope.png"), data).replace("nope.png", "X")
    assert there == missing and "outside" in there


def test_image_roots_widen_what_may_be_read(layout: tuple[Path, Path], tmp_path: Path) -> None:
    data, secret = layout
    assert encode(str(secret / "key.png"), data, roots=[str(secret)])[0]
    cfg = job(tmp_path, 2, prompt={"images": ["photo"], "image_roots": ["secret"]})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path)
    assert loaded.prompt.image_roots == [str(secret)]  # resolved against the config's folder
    # Where files may be read from is not part of what is asked: the job's fingerprint ignores it.
    assert loaded.request_fingerprint() == load_config(path, {"prompt.image_roots": []}).request_fingerprint()


def test_only_regular_files_and_only_up_to_the_limit(layout: tuple[Path, Path]) -> None:
    data, _ = layout
    os.mkfifo(data / "pipe.png")  # nobody ever writes: a blocking open would hang here
    assert "not a regular file" in refusal("pipe.png", data)
    (data / "dev").symlink_to("/dev")
    assert "outside" in refusal("dev/zero", data)  # a link out of the root
    # Even where /dev is an allowed root, a device is not a regular file and is never read.
    assert "not a regular file" in refusal("/dev/zero", data, roots=["/dev"])
    assert "not a regular file" in refusal("/dev/urandom", data, roots=["/dev"])
    big = data / "big.png"
    with open(big, "wb") as fh:  # sparse: 21 MB that costs nothing on disk
        fh.write(png())
        fh.truncate(21 * 1024 * 1024)
    assert "over the 20 MB per-image limit" in refusal("big.png", data)


def test_escaping_image_rows_fail_and_their_files_are_never_sent(layout: tuple[Path, Path], tmp_path: Path) -> None:
    data, secret = layout
    (secret / "key.png").write_bytes(png() + b"TOP-SECRET-CANARY")  # still a valid PNG
    os.mkfifo(data / "pipe.png")
    rows = [{"rid": "a", "photo": "ok.png"}, {"rid": "b", "photo": str(secret / "key.png")},
            {"rid": "c", "photo": "../secret/key.png"}, {"rid": "d", "photo": "pipe.png"},
            {"rid": "e", "photo": "/dev/zero"}]
    (data / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = job(tmp_path, 0, prompt={"user": "Describe {{ rid }}", "images": ["photo"]}, structured=None)
    cfg["input"] = {"path": str(data / "in.jsonl"), "id_column": "rid"}
    cfg.pop("structured")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "job.yaml"), "-q"]) == 1
    fail = pl.read_parquet(tmp_path / "out" / "failures.parquet").sort("rid")
    assert fail["rid"].to_list() == ["b", "c", "d", "e"] and set(fail["error_class"]) == {"input"}
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert b"TOP-SECRET-CANARY" not in path.read_bytes(), path


# -- templates --------------------------------------------------------------------------------------

PAYLOADS = {
    "environ": "{{ cycler.__init__.__globals__.os.environ.SEC_TEST_CANARY }}",
    "popen": "{{ cycler.__init__.__globals__.os.popen('touch PWNED').read() }}",
    "joiner": "{{ joiner.__init__.__globals__.os.environ }}",
    "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "mutate": "{% set x = [] %}{{ x.append(1) }}",
}


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("name", list(PAYLOADS))
def test_template_payloads_fail_the_row_in_the_sandbox(name: str, dry: bool, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SEC_TEST_CANARY", "sk-canary-template-leak")
    monkeypatch.chdir(tmp_path)
    cfg = job(tmp_path, 3, prompt={"user": "Review: {{ text }} " + PAYLOADS[name]})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["run", str(tmp_path / "job.yaml"), "-q", *(["--dry-run"] if dry else [])])
    out, err = capsys.readouterr()
    assert not (tmp_path / "PWNED").exists()
    assert "sk-canary-template-leak" not in out + err and "Traceback" not in err
    if dry:
        assert code == 0 and "template" in out
        return
    assert code == 1
    fail = pl.read_parquet(tmp_path / "out" / "failures.parquet")
    assert fail.height == 3 and set(fail["error_class"]) == {"input"}
    assert all("prompt.user" in m and ("unsafe" in m or "Security" in m) for m in fail["message"]), fail["message"]
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert b"sk-canary-template-leak" not in path.read_bytes()


@pytest.mark.parametrize("key, template, says", [
    ("prompt.user", "{{ text | no_such_filter }}", "no filter named 'no_such_filter'"),
    ("prompt.system", "{% if false %}{{ x | nope }}{% endif %}", "no filter named 'nope'"),
    ("prompt.user", "{% if text is nothing_like_this %}x{% endif %}", "no test named"),
    ("prompt.user", "{{ text ", "template syntax error on line 1"),
])
def test_bad_templates_are_config_errors_before_anything_is_read(key: str, template: str, says: str,
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = job(tmp_path, 3)
    cfg["prompt"][key.split(".")[1]] = template
    cfg["input"]["path"] = str(tmp_path / "does-not-exist.jsonl")  # compiled before the input is looked at
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=key):
        load_config(tmp_path / "job.yaml")
    assert main(["run", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert key in err and says in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_rows_without_an_input_folder_read_only_the_image_roots(layout: tuple[Path, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows of a Ray dataset (pipeline.ray.label) come from no file: the working directory is no root.
    data, secret = layout
    monkeypatch.chdir(secret)
    for value in ("key.png", str(secret / "key.png")):
        with pytest.raises(RowError, match="outside the folders"):
            ImageEncoder().parts(value, base_dir=None, origin=("<ray dataset>", 0), column="photo")
    parts, _ = ImageEncoder(roots=[str(data)]).parts(str(data / "ok.png"), base_dir=None,
                                                     origin=("<ray dataset>", 0), column="photo")
    assert parts and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
