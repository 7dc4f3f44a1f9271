"""The comparison report of two runs with gold, opened in headless Chromium: the comparison comes first,
and no element is clipped or runs past the page (bounding boxes measured in the browser)."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

import pipeline
from tests.reporting.reportkit import BROWSER, Figures, demo_job, measure, with_confidence

REPO = Path(__file__).resolve().parents[2]
MODELS = ("openai/gpt-4-turbo", "openai/gpt-4o-mini")


def _gold(stars: int) -> str:
    return "positive" if stars >= 4 else "negative" if stars <= 2 else "mixed"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The same 50 reviews labelled by two models, with a gold column, a product column to slice by, a
    row confidence, and a run history whose message is one long unbroken word."""
    base = tmp_path_factory.mktemp("compare")
    rows = [json.loads(line) for line in (REPO / "data" / "reviews.jsonl").read_text().splitlines()[:50]]
    rows = [{**r, "gold_sentiment": _gold(r["stars"])} for r in rows]
    outs = []
    for n, model in enumerate(MODELS):
        out = demo_job(base, model.split("/")[1], rows, model=model, columns=["product", "stars", "gold_sentiment"])
        with_confidence(out, salt=n)
        with open(out / "history.jsonl", "a") as fh:
            fh.write(json.dumps({"run_id": "run-x", "started_at": "2026-12-07T10:00:00.000Z",
                                 "finished_at": "2026-12-07T10:01:00.000Z", "exit_code": 3,
                                 "retries": {"rate_limited": 3, "server_error": 2}, "stop_reason": "fatal",
                                 "message": "endpoint-said:" + "x" * 300}) + "\n")
        outs.append(out)
    return outs


@pytest.mark.skipif(BROWSER is None, reason="no headless browser (chromium) installed: `apt-get install chromium`")
def test_comparison_first_nothing_clipped_or_overflowing(runs: list[Path], tmp_path: Path) -> None:
    page = tmp_path / "compare.html"
    rep = pipeline.report(runs, gold="gold_sentiment", by="product", target_precision=0.9)
    rep.save(page)
    found = measure(page)
    # The comparison is the first section, before either run's own.
    order = [name for name, _ in sorted(found["order"], key=lambda x: x[1])]
    assert order[0] == "compare" and order.index("compare") < order.index("r0-run") < order.index("r1-run")
    # Nothing wider than the 1,400 px window, nothing past its parent, no SVG text outside its SVG,
    # no two axis labels on top of each other.
    assert found["width"][0] <= found["width"][1], found["width"]
    assert found["overflow"] == [], found["overflow"][:10]
    assert found["clipped"] == [], found["clipped"][:10]
    assert found["overlaps"] == [], found["overlaps"][:10]
    # Confusion matrices: no gridlines over the numbers, axes named after the runs and the gold.
    matrices = {key: titles for key, titles in found["titles"] if key and "confusion" in key}
    grids = {key: n for key, n in found["grids"] if key and "confusion" in key}
    assert len(matrices) == 3 and set(grids.values()) == {0}, grids
    for key, titles in matrices.items():
        assert "a" not in titles and "b" not in titles, (key, titles)
        if key.startswith("cmp.gold_confusion"):
            assert any(t.startswith("gold") for t in titles) and any(t in MODELS for t in titles), titles
        else:
            assert sorted(titles) == sorted(MODELS), titles

    # What the comparison shows matches the outputs.
    fig = Figures(page.read_text())
    for out, model in zip(runs, MODELS):
        res = pl.read_parquet(out / "results.parquet")
        pred = res.get_column("output").struct.field("sentiment").cast(pl.String)
        acc = (pred == res.get_column("gold_sentiment")).mean()
        assert float(fig.values[f"cmp.runs.{model}.accuracy"]) == pytest.approx(acc)
        assert float(fig.values[f"cmp.runs.{model}.mean_confidence"]) == \
            pytest.approx(res.get_column("confidence").mean())
    a, b = (pl.read_parquet(p / "results.parquet").select(
        "review_id", "gold_sentiment", s=pl.col("output").struct.field("sentiment").cast(pl.String)) for p in runs)
    both = a.join(b.drop("gold_sentiment"), on="review_id")
    worth = both.filter((pl.col("s") != pl.col("s_right")) | (pl.col("s") != pl.col("gold_sentiment"))
                        | (pl.col("s_right") != pl.col("gold_sentiment"))).get_column("review_id").to_list()
    shown = {k.split(".")[2] for k in fig.values if k.startswith("cmp.disagree.") and k.endswith(".id")}
    assert shown <= set(worth) and len(shown) == min(12, len(worth)) > 0
    reviews = {r["review_id"]: r["text"] for r in map(json.loads,
                                                      (REPO / "data" / "reviews.jsonl").read_text().splitlines())}
    for rid in shown:
        assert fig.values[f"cmp.disagree.{rid}.gold"] == f"sentiment={_gold_of(runs[0], rid)}"
        assert reviews[rid] in fig.values[f"cmp.disagree.{rid}.input"]  # the user message it was sent
    # This run's figures beside the job's: the job counts every run in history.jsonl.
    history = [json.loads(line) for line in (runs[0] / "history.jsonl").read_text().splitlines()]
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert int(fig.values["r0.job.runs"]) == len(history) == 2
    assert int(fig.values["r0.job.requests_sent"]) == sum(h.get("requests", 0) for h in history)
    assert int(fig.values["r0.requests_sent"]) == summary["requests_sent"]
    assert float(fig.values["r0.job.run_cost_usd"]) == pytest.approx(summary["cost_usd"])
    assert float(fig.values["r0.job.wall_s"]) > float(fig.values["r0.wall_s"])  # the extra history line's minute
    slices = rep.tables["slices"]
    top = slices.row(0, named=True)
    res = pl.read_parquet(runs[0] / "results.parquet")
    assert top["rows"] == res.filter(pl.col("product") == top["slice"]).height
    assert {"r0-run", "r1-run", "compare", "calibration", "slices", "sample"} <= set(fig.ids)


def _gold_of(out: Path, rid: str) -> str:
    res = pl.read_parquet(out / "results.parquet")
    return str(res.filter(pl.col("review_id") == rid).item(0, "gold_sentiment"))
