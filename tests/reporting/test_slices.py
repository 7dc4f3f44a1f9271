"""`report --by COLUMN`: per slice, each figure with the rows behind it; review gold weighted as the gold
table weighs it; the audit's figures marked as the sample's; the largest slices, the rest and all rows."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

import pipeline
from pipeline.reporting import examples, slices
from pipeline.reporting.data import load_run
from pipeline.reporting.gold import GOLD_SCHEMA, stored_gold, write_gold
from tests.reporting.reportkit import Figures, write_job

PRODUCTS = ["kettle", "lamp", "mug"]


def _rows(n: int, wrong_every: int) -> list[dict[str, Any]]:
    values = ["positive", "negative", "mixed"]
    return [{"id": f"r{i:03d}", "sentiment": values[(i + (i % wrong_every == 0)) % 3], "confidence": 0.5 + i % 5 / 10}
            for i in range(n)]


def _job(base: Path, name: str, model: str, wrong_every: int, audit: dict[str, bool | None] | None = None) -> Path:
    out = write_job(base / name, _rows(60, wrong_every), model=model)
    res = pl.read_parquet(out / "results.parquet")
    res = res.with_columns(product=pl.Series([PRODUCTS[i % 3] for i in range(res.height)]))
    if audit is not None:
        agrees = [audit.get(rid) for rid in res.get_column("id")]
        res = res.with_columns(audit_agrees=pl.DataFrame({"sentiment": pl.Series(agrees, dtype=pl.Boolean)})
                               .to_struct("audit_agrees"))
    res.write_parquet(out / "results.parquet")
    return out


def _review_gold(out: Path) -> dict[str, tuple[str, float]]:
    """Human labels for half the rows: the uncertain ones (weight 1) and a sample (weight 4)."""
    truth = {f"r{i:03d}": ["positive", "negative", "mixed"][i % 3] for i in range(60)}
    picked = {rid: (value, 1.0 if i % 4 == 0 else 4.0) for i, (rid, value) in enumerate(truth.items()) if i % 2 == 0}
    write_gold(out, pl.DataFrame([{"row_id": rid, "field": "sentiment", "value": v, "annotator": "a",
                                   "annotated_at": "", "reason": "", "weight": w, "source": "t.json",
                                   "imported_at": ""} for rid, (v, w) in picked.items()], schema=GOLD_SCHEMA))
    return picked


@pytest.fixture()
def pair(tmp_path: Path) -> list[Path]:
    audit = {f"r{i:03d}": i % 7 != 0 for i in range(0, 60, 4)}   # every 4th row audited
    return [_job(tmp_path, "a", "model-a", 4, audit), _job(tmp_path, "b", "model-b", 5)]


def test_slices_weigh_review_gold_say_n_and_match_the_whole_run(pair: list[Path]) -> None:
    gold = _review_gold(pair[0])
    rep = pipeline.report(pair, by="product")
    table = rep.tables["slices"]
    assert table.get_column("slice").to_list() == [*sorted(PRODUCTS), "(all rows)"]
    assert table.get_column("rows").to_list() == [20, 20, 20, 60]
    assert table.get_column("share").to_list() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    for run, label in zip(pair, ("model-a", "model-b")):
        res = pl.read_parquet(run / "results.parquet")
        said = dict(zip(res.get_column("id"), res.get_column("output").struct.field("sentiment").cast(pl.String)))
        product = dict(zip(res.get_column("id"), res.get_column("product")))
        for line in table.iter_rows(named=True):
            mine = {rid: vw for rid, vw in gold.items() if line["slice"] in (product[rid], "(all rows)")}
            right = sum(w for rid, (v, w) in mine.items() if said[rid] == v)
            unweighted = sum(1 for rid, (v, _) in mine.items() if said[rid] == v) / len(mine)
            assert line[f"gold rows {label}"] == len(mine)
            assert line[f"accuracy {label}"] == pytest.approx(right / sum(w for _, w in mine.values()))
            if label == "model-a":  # its errors are the uncertain rows' (weight 1): the plain mean undercounts
                assert line[f"accuracy {label}"] > unweighted + 0.05   # what the slice used to report
        whole = rep.tables["gold"].filter(pl.col("run") == label).item(0, "accuracy")
        assert table.row(3, named=True)[f"accuracy {label}"] == pytest.approx(whole)
    # The audit is a sample: its agreement and how many rows it covers, marked as the sample's.
    res = pl.read_parquet(pair[0] / "results.parquet")
    audited = res.filter(pl.col("audit_agrees").struct.field("sentiment").is_not_null())
    for line in table.iter_rows(named=True):
        mine = audited if line["slice"] == "(all rows)" else audited.filter(pl.col("product") == line["slice"])
        agrees = mine.get_column("audit_agrees").struct.field("sentiment")
        assert line["audited model-a"] == mine.height
        assert line["audit agreement model-a"] == pytest.approx(agrees.mean())
    assert "audited model-b" not in table.columns
    page = rep.html
    assert "from the audit&#x27;s seeded sample only" in page and "inverse of their chance of being reviewed" in page
    fig = Figures(page)
    assert fig.values["cmp.slices.lamp.gold rows model-a"] == str(table.row(1, named=True)["gold rows model-a"])


def test_without_gold_agreement_says_how_many_rows_both_answered(pair: list[Path]) -> None:
    b = pl.read_parquet(pair[1] / "results.parquet")
    b.filter(pl.col("id") != "r001").write_parquet(pair[1] / "results.parquet")  # b failed one lamp row
    table = pipeline.report(pair, by="product").tables["slices"]
    lamp = table.filter(pl.col("slice") == "lamp").row(0, named=True)
    assert lamp["rows"] == 20 and lamp["compared model-b"] == 19
    a = pl.read_parquet(pair[0] / "results.parquet").filter(pl.col("product") == "lamp", pl.col("id") != "r001")
    sa = a.get_column("output").struct.field("sentiment").cast(pl.String)
    sb = b.filter(pl.col("product") == "lamp", pl.col("id") != "r001").get_column("output").struct.field(
        "sentiment").cast(pl.String)
    assert lamp["agreement model-b"] == pytest.approx((sa == sb).mean())
    assert not any(c.startswith("accuracy") for c in table.columns)


def test_beyond_the_largest_slices_one_line_holds_the_rest(pair: list[Path]) -> None:
    runs = [load_run(p) for p in pair]
    gold = stored_gold(runs)
    frame = examples.wide(runs, ["sentiment"], gold, "product", "sentiment")
    table = slices.slices(frame, ["a", "b"], "sentiment", limit=2)
    assert table.get_column("slice").to_list() == ["kettle", "lamp", "(other values: 1)", "(all rows)"]
    assert table.get_column("rows").to_list() == [20, 20, 20, 60]
    assert table.get_column("confidence a").to_list()[2] == pytest.approx(
        frame.filter(pl.col("__by") == "mug").get_column("confidence@0").mean())
