"""`pipeline report`: the demo job's report and a two-model comparison with a gold column, checked against
summary.json and polars computations on the outputs, self-contained, and rendered by a real browser."""
from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
from collections import Counter
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest

import pipeline
from pipeline import cli

REPO = Path(__file__).resolve().parents[2]


class Figures(HTMLParser):
    """data-k -> data-v pairs, section ids and the number of inline <svg> charts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.values: dict[str, str] = {}
        self.ids: set[str] = set()
        self.svgs = 0
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "data-k" in a:
            self.values[str(a["data-k"])] = a.get("data-v") or ""
        if "id" in a:
            self.ids.add(str(a["id"]))
        self.svgs += tag == "svg"


def num(fig: Figures, key: str) -> float:
    return float(fig.values[key])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    pipeline.run(str(REPO / "configs" / "demo.yaml"), output__dir=str(out), quiet=True)
    return out


def _gold(stars: int) -> str:
    return "positive" if stars >= 4 else "negative" if stars <= 2 else "mixed"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The same 60 reviews labelled by two models, with a gold column, failures and a pipeline.log."""
    base = tmp_path_factory.mktemp("pair")
    rows = [json.loads(line) for line in (REPO / "data" / "reviews.jsonl").read_text().splitlines()[:60]]
    with open(base / "in.jsonl", "w") as fh:
        fh.writelines(json.dumps({**r, "gold_sentiment": _gold(r["stars"])}) + "\n" for r in rows)
    outs = []
    for model, faults in (("openai/gpt-4-turbo", []), ("openai/gpt-4o-mini",
                                                        [{"requests": "3", "fault": "400"},
                                                         {"requests": "8", "fault": "schema_invalid"}])):
        out = base / model.split("/")[1]
        pipeline.run(str(REPO / "configs" / "demo.yaml"), quiet=True, output__dir=str(out),
                     input={"path": str(base / "in.jsonl"), "columns": ["stars", "gold_sentiment"]},
                     endpoint={"model": model, "simulator": {"latency_ms": 0, "fault_plan": faults}},
                     structured={"bad_content_retries": 0})
        outs.append(out)
    # pipeline.log and history.jsonl as contracts 2 and 3 define them (times within the run), plus a torn line.
    with sqlite3.connect(outs[1] / "store.sqlite") as db:
        first, last = db.execute("SELECT min(created_at), max(created_at) FROM responses").fetchone()
    (outs[1] / "pipeline.log").write_text(
        json.dumps({"ts": _iso(first + 0.001), "level": "WARNING", "event": "rate_pause", "msg": "429",
                    "seconds": 0.5}) + "\n" + '{"ts": "2026-01-01T00:0')
    (outs[1] / "history.jsonl").write_text(json.dumps({
        "run_id": "run-1", "started_at": _iso(first - 1), "finished_at": _iso(last + 1),
        "exit_code": 1, "rows_new": 60, "rows_reused": 0, "rows_removed": 0, "succeeded": 58, "failed": 2,
        "pending": 0, "requests": 60, "retries": {}, "cost_usd": 0.1, "stop_reason": None}) + "\n")
    return outs


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _external_urls(text: str) -> list[str]:
    """Anything a viewer's browser would fetch or follow: src/href/url( not pointing into the page, and
    http(s):// anywhere outside data: URIs."""
    found = [m for m in re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', text,
                                   re.IGNORECASE) if not m.startswith(("#", "data:"))]
    found += [m for m in re.findall(r'url\(\s*["\']?([^"\')]*)', text,
                                    re.IGNORECASE) if not m.startswith(("#", "data:"))]
    without_data = re.sub(r'data:[^"\')\s]*', "", text)
    return found + re.findall(r"https?://[^\s\"'<>]+", without_data, re.IGNORECASE)


def test_demo_report_matches_summary_and_outputs(demo: Path, tmp_path: Path) -> None:
    dest = tmp_path / "report.html"
    assert cli.main(["report", str(demo), "-o", str(dest)]) == 0
    text = dest.read_text()
    fig = Figures(text)
    assert {"r0-run", "r0-time", "r0-failures", "r0-outputs"} <= fig.ids
    summary = json.loads((demo / "summary.json").read_text())
    for key in ("succeeded", "failed", "pending", "rows_total", "prompt_tokens", "completion_tokens",
                "requests_sent", "cache_hits", "deduplicated"):
        assert int(fig.values[f"r0.{key}"]) == summary[key], key
    assert num(fig, "r0.cost_usd") == pytest.approx(summary["cost_usd"])
    assert num(fig, "r0.wall_s") == summary["wall_s"]
    done = summary["succeeded"] + summary["failed"]
    assert num(fig, "r0.cost_per_1k_rows") == pytest.approx(summary["cost_usd"] / done * 1000)
    assert num(fig, "r0.rows_per_s") == pytest.approx(done / summary["wall_s"])
    assert fig.values["r0.retries"] == ", ".join(f"{k}={v}" for k, v in sorted(summary["retries"].items()))

    # Latency quantiles from the store's answered requests.
    with sqlite3.connect(demo / "store.sqlite") as db:
        lat = pl.Series([r[0] for r in db.execute(
            "SELECT latency_s FROM responses WHERE state = 'ok' AND NOT cache_hit AND latency_s IS NOT NULL")])
    for q in (50, 90, 99):
        assert num(fig, f"r0.latency.p{q}") == pytest.approx(lat.quantile(q / 100, "linear"))
    assert int(fig.values["r0.timed_requests"]) == lat.len()

    # Output fields, each as its type calls for.
    df = pl.read_parquet(demo / "results.parquet").select("output").unnest("output")
    for value, count in df.get_column("sentiment").cast(pl.String).value_counts().iter_rows():
        assert int(fig.values[f"r0.field.sentiment.count.{value}"]) == count
    topics = Counter(t for ts in df.get_column("topics").to_list() for t in ts)
    for value, count in topics.items():
        assert int(fig.values[f"r0.field.topics.count.{value}"]) == count
    conf = df.get_column("confidence")
    assert num(fig, "r0.field.confidence.mean") == pytest.approx(conf.mean())
    assert num(fig, "r0.field.confidence.p50") == pytest.approx(conf.quantile(0.5, "linear"))
    summaries = df.get_column("summary").drop_nulls().str.len_chars()
    assert num(fig, "r0.field.summary.mean_chars") == pytest.approx(summaries.mean())
    assert int(fig.values["r0.field.summary.nulls"]) == df.get_column("summary").null_count()
    polarity = Counter(a["polarity"] for aspects in df.get_column("aspects").drop_nulls().to_list() for a in aspects)
    for value, count in polarity.items():
        assert int(fig.values[f"r0.field.aspects[].polarity.count.{value}"]) == count
    # outcome, retries, throughput, latency, and one chart per output field (7 of them)
    assert fig.svgs == 4 + 7
    assert _external_urls(text) == []
    assert "No failed rows" in text
    history = demo / "history.jsonl"  # written by the runner once run history lands (contract 3)
    if history.exists():
        assert fig.values["r0.history.0.run_id"] == json.loads(history.read_text().splitlines()[0])["run_id"]
    else:
        assert "No run history" in text


def test_comparison_with_gold(pair: list[Path], tmp_path: Path) -> None:
    rep = pipeline.report(pair, gold="gold_sentiment")
    tables = rep.tables
    assert all(isinstance(t, pl.DataFrame) for t in tables.values())
    a = pl.read_parquet(pair[0] / "results.parquet")
    b = pl.read_parquet(pair[1] / "results.parquet")
    joined = a.select("review_id", x=pl.col("output").struct.field("sentiment").cast(pl.String)).join(
        b.select("review_id", y=pl.col("output").struct.field("sentiment").cast(pl.String)), on="review_id")
    xs, ys = joined.get_column("x").to_list(), joined.get_column("y").to_list()
    n = len(xs)
    p_o = sum(x == y for x, y in zip(xs, ys)) / n
    cx, cy = Counter(xs), Counter(ys)
    p_e = sum(cx[k] * cy[k] for k in cx) / n / n
    row = tables["agreement"].filter(pl.col("field") == "sentiment").row(0, named=True)
    assert (row["rows"], row["agree"]) == (n, pytest.approx(p_o))
    assert row["kappa"] == pytest.approx((p_o - p_e) / (1 - p_e))
    conf_a = pl.Series([r["confidence"] for r in a.get_column("output").to_list()])
    mad = joined.join(a.select("review_id", ca=pl.col("output").struct.field("confidence")), on="review_id").join(
        b.select("review_id", cb=pl.col("output").struct.field("confidence")), on="review_id").select(
        (pl.col("ca") - pl.col("cb")).abs().mean()).item()
    assert conf_a.len() == a.height
    assert tables["agreement"].filter(pl.col("field") == "confidence").item(0, "mean_abs_diff") == pytest.approx(mad)
    matrix = tables["confusion sentiment: openai/gpt-4-turbo vs openai/gpt-4o-mini"]
    assert matrix.get_column("count").sum() == n
    pairs = Counter(zip(xs, ys))
    assert all(c == pairs[(r["a"], r["b"])] for r, c in zip(matrix.iter_rows(named=True), matrix.get_column("count")))

    # Gold scores from the rows each model answered.
    for out, label in zip(pair, ("openai/gpt-4-turbo", "openai/gpt-4o-mini")):
        res = pl.read_parquet(out / "results.parquet")
        gold = res.get_column("gold_sentiment").to_list()
        pred = res.get_column("output").struct.field("sentiment").cast(pl.String).to_list()
        score = tables["gold"].filter(pl.col("run") == label).row(0, named=True)
        assert score["field"] == "sentiment" and score["rows"] == len(gold)
        assert score["accuracy"] == pytest.approx(sum(g == p for g, p in zip(gold, pred)) / len(gold))
        for cls in ("positive", "negative", "mixed"):
            tp = sum(g == p == cls for g, p in zip(gold, pred))
            fp, fn = sum(p == cls != g for g, p in zip(gold, pred)), sum(g == cls != p for g, p in zip(gold, pred))
            got = tables["gold_classes"].filter((pl.col("run") == label) & (pl.col("class") == cls)).row(0, named=True)
            assert got["support"] == tp + fn
            assert got["precision"] == (pytest.approx(tp / (tp + fp)) if tp + fp else None)
            assert got["recall"] == (pytest.approx(tp / (tp + fn)) if tp + fn else None)
    cost = tables["cost"]
    assert cost.get_column("cost_usd").to_list() == pytest.approx(
        [json.loads((p / "summary.json").read_text())["cost_usd"] for p in pair])

    # The same figures in the HTML, and every section of both runs.
    text = rep.html
    fig = Figures(text)
    assert {"r0-run", "r1-run", "r1-time", "r1-failures", "r1-outputs", "compare"} <= fig.ids
    assert num(fig, "cmp.gold.openai/gpt-4o-mini.accuracy") == pytest.approx(
        tables["gold"].filter(pl.col("run") == "openai/gpt-4o-mini").item(0, "accuracy"))
    assert "<svg" in rep._repr_html_() and _external_urls(text) == []
    assert pipeline.report(pair, gold="gold_sentiment=sentiment").tables["gold"].equals(tables["gold"])


def test_failures_history_and_pauses(pair: list[Path]) -> None:
    text = pipeline.report(pair[1]).html
    fig = Figures(text)
    failures = pl.read_parquet(pair[1] / "failures.parquet")
    assert failures.height == 2
    by = failures.group_by("error_class", "status").len()
    for cls, _status, rows in by.sort("error_class").iter_rows():
        keys = [k for k, v in fig.values.items()
                if k.startswith("r0.failures.") and k.endswith(".error_class") and v == cls]
        assert keys and int(fig.values[keys[0].replace(".error_class", ".rows")]) == rows
    for message in failures.get_column("message"):
        assert message[:40].replace("'", "&#x27;").replace('"', "&quot;") in text
    bad = failures.filter(pl.col("error_class") == "bad_content").get_column("content").item()
    assert bad and "raw content" in text
    assert fig.values["r0.rate_pauses"] == "1" and "the last run (run-1)" in text
    assert fig.values["r0.history.0.run_id"] == "run-1"


def test_cli_report_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", str(tmp_path / "nowhere"), "-o", str(tmp_path / "r.html")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    assert "holds no job" in capsys.readouterr().err


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# No network at all, and none of the browser's own background traffic: the page must stand alone.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND",
         "--enable-logging=stderr", "--v=0"]


@pytest.mark.skipif(BROWSER is None, reason="no headless browser (chromium) installed: `apt-get install chromium`")
def test_report_renders_in_a_browser(demo: Path, tmp_path: Path) -> None:
    from PIL import Image, ImageChops

    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    pipeline.report(demo).save(page)
    run = subprocess.run([BROWSER, *FLAGS, "--window-size=1280,2400", f"--screenshot={shot}", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    assert run.stdout.count("<svg") == 11 and "Latency of answered requests" in run.stdout
    assert "CONSOLE" not in run.stderr, [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    # The charts' bars are drawn in the accent colour (#3b6ea8): count those pixels in the screenshot.
    channels = Image.open(shot).convert("RGB").split()
    masks = [ch.point(lambda v, c=c: 255 if abs(v - c) < 24 else 0) for ch, c in zip(channels, (0x3B, 0x6E, 0xA8))]
    accent = ImageChops.multiply(ImageChops.multiply(masks[0], masks[1]), masks[2]).histogram()[255]
    assert accent > 5000, accent


def test_untrusted_folder_without_summary(demo: Path, tmp_path: Path) -> None:
    """A stopped job has no summary.json; answers and messages may carry markup: the page stays inert."""
    out = tmp_path / "copy"
    shutil.copytree(demo, out)
    (out / "summary.json").unlink()
    res = pl.read_parquet(out / "results.parquet")
    hostile = '<script>alert(1)</script><img src="http://x.invalid/a.png">'
    res = res.with_columns(pl.col("output").struct.with_fields(
        pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(hostile)).otherwise(pl.field("summary")).alias("summary")))
    res.write_parquet(out / "results.parquet")
    text = pipeline.report(out).html
    fig = Figures(text)
    assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert _external_urls(text) == []
    assert int(fig.values["r0.succeeded"]) == res.height and "no summary.json" in text
    assert num(fig, "r0.prompt_tokens") == res.get_column("prompt_tokens").sum()
