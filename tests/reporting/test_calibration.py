"""Calibration against gold: reliability bins, ECE and the threshold table, checked against values worked
out by hand, both on the functions and through `pipeline report --gold ... --target-precision`."""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import pipeline
from pipeline import cli
from pipeline.reporting.calibration import calibrate, reliability, wilson, wilson_share
from tests.reporting.reportkit import Figures, write_job

# Ten rows worked by hand. Bin = min(floor(10 c), 9):
#   bin 9: .95 .92 .98 1.0, all right   -> acc 1,   mean .9625, |gap| .0375, weight .4 -> .015
#   bin 8: .85 right, .81 wrong          -> acc .5,  mean .83,   |gap| .33,   weight .2 -> .066
#   bin 7: .75 right                     -> acc 1,   |gap| .25,  weight .1 -> .025
#   bin 6: .62 wrong                     -> acc 0,   |gap| .62,  weight .1 -> .062
#   bin 5: .55 right                     -> acc 1,   |gap| .45,  weight .1 -> .045
#   bin 4: .45 wrong                     -> acc 0,   |gap| .45,  weight .1 -> .045
#   ECE = .015 + .066 + .025 + .062 + .045 + .045 = .258
CONF = [0.95, 0.92, 0.85, 0.81, 0.75, 0.62, 0.55, 0.45, 0.98, 1.0]
RIGHT = [True, True, True, False, True, False, True, False, True, True]


def test_reliability_and_ece_by_hand() -> None:
    bins, ece = reliability(pl.Series(CONF), pl.Series(RIGHT))
    assert ece == pytest.approx(0.258)
    by_bin = {r["bin"]: r for r in bins.iter_rows(named=True)}
    assert by_bin[9]["rows"] == 4 and by_bin[9]["mean_confidence"] == pytest.approx(0.9625)
    assert by_bin[9]["accuracy"] == 1.0
    assert (by_bin[8]["rows"], by_bin[8]["accuracy"], by_bin[8]["mean_confidence"]) == (2, 0.5, pytest.approx(0.83))
    assert [by_bin[b]["rows"] for b in range(4)] == [0, 0, 0, 0] and by_bin[0]["accuracy"] is None
    assert bins.get_column("rows").sum() == 10


def test_threshold_table_by_hand() -> None:
    scored = pl.DataFrame({"conf": CONF + [None], "correct": RIGHT + [True]})
    # The population: the ten gold rows plus ten answered rows nobody labelled, all at 0.99.
    population = pl.Series(CONF + [0.99] * 10)
    cal = calibrate("run", "sentiment", "confidence", population, scored, target=0.98, min_rows=1)
    assert (cal.rows, cal.no_confidence) == (10, 1)
    t = {r["threshold"]: r for r in cal.thresholds.iter_rows(named=True)}
    # >= 0.8: .95 .92 .85 .81 .98 1.0 of the gold rows (5 right of 6); of all 20 rows 6 + 10 accepted.
    assert (t[0.8]["gold_rows"], t[0.8]["precision"], t[0.8]["accepted_rows"]) == (6, pytest.approx(5 / 6), 16)
    assert t[0.8]["accepted_share"] == pytest.approx(16 / 20)
    # >= 0.9: .95 .92 .98 1.0, all right; 14 of 20 accepted.
    assert (t[0.9]["gold_rows"], t[0.9]["precision"], t[0.9]["accepted_share"]) == (4, 1.0, pytest.approx(0.7))
    # >= 0.5: everything but .45 -> 9 rows, 7 right (.81 and .62 wrong).
    assert (t[0.5]["gold_rows"], t[0.5]["precision"]) == (9, pytest.approx(7 / 9))
    # Wilson 95% for 5 of 6: centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    assert t[0.8]["precision_low"] == pytest.approx(0.4365, abs=1e-4)
    assert t[0.8]["precision_high"] == pytest.approx(0.9699, abs=1e-4)
    # The lowest threshold with precision >= 0.98 is 0.85 (.81 lets a wrong row in).
    assert cal.chosen is not None and cal.chosen["threshold"] == 0.85
    assert cal.chosen["gold_rows"] == 5 and cal.chosen["accepted_share"] == pytest.approx(15 / 20)
    # With the default minimum of 10 accepted gold rows, ten rows cannot name a threshold.
    assert calibrate("run", "sentiment", "confidence", population, scored, target=0.98).chosen is None


def test_wilson_edges() -> None:
    assert wilson(0, 0) == (None, None)
    low, high = wilson(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(0.7225, abs=1e-4)


def _calibration_job(path: Path) -> Path:
    """Twenty gold rows (the ten above twice) and twenty unlabelled rows at 0.99, in a results.parquet."""
    gold_labels = ["positive" if i % 3 else "negative" for i in range(10)]
    answers = [g if ok else ("negative" if g == "positive" else "positive") for g, ok in zip(gold_labels, RIGHT)]
    rows = [{"id": f"g{k}{i}", "gold": gold_labels[i], "sentiment": answers[i], "confidence": CONF[i]}
            for k in range(2) for i in range(10)]
    rows += [{"id": f"u{i:02d}", "gold": None, "sentiment": "positive", "confidence": 0.99} for i in range(20)]
    return write_job(path, rows, model="openai/gpt-4o-mini")


def test_report_calibration_and_target(tmp_path: Path) -> None:
    out = _calibration_job(tmp_path / "job")
    dest = tmp_path / "r.html"
    assert cli.main(["report", str(out), "--gold", "gold=sentiment", "--target-precision", "0.98",
                     "-o", str(dest)]) == 0
    fig = Figures(dest.read_text())
    k = "cmp.calibration.openai/gpt-4o-mini.sentiment"
    assert float(fig.values[f"{k}.ece"]) == pytest.approx(0.258)
    # 0.85: 10 gold rows accepted, all right; 10 + 20 of the 40 rows accepted.
    assert float(fig.values[f"{k}.chosen"]) == 0.85
    rows = {float(fig.values[f"{k}.thresholds.{i}.threshold"]): i for i in range(11)
            if f"{k}.thresholds.{i}.threshold" in fig.values}
    i = rows[0.8]
    assert int(fig.values[f"{k}.thresholds.{i}.gold_rows"]) == 12
    assert float(fig.values[f"{k}.thresholds.{i}.precision"]) == pytest.approx(10 / 12)
    assert float(fig.values[f"{k}.thresholds.{i}.accepted_share"]) == pytest.approx(32 / 40)
    assert "compare" in fig.ids and fig.svgs >= 1
    rep = pipeline.report(out, gold="gold=sentiment", target_precision=0.98)
    table = rep.tables["calibration sentiment: openai/gpt-4o-mini"]
    assert table.filter(pl.col("threshold") == 0.9).item(0, "precision") == 1.0


def test_target_precision_needs_gold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _calibration_job(tmp_path / "job")
    assert cli.main(["report", str(out), "--target-precision", "0.98", "-o", str(tmp_path / "r.html")]) == 2
    assert "needs gold labels" in capsys.readouterr().err
    assert cli.main(["report", str(out), "--gold", "gold", "--target-precision", "1.5",
                     "-o", str(tmp_path / "r.html")]) == 2
    assert "between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_weighted_review_gold_by_hand() -> None:
    """Review gold: a sampled row weighs (rows not below) / (sample size), an uncertain row 1.
    conf .95 right w1, .90 wrong w3, .85 right w3, .55 right w1 (total weight 8):
      bin 9: .95, .90 -> mean conf (.95 + 3 * .90) / 4 = .9125, accuracy 1/4, |gap| .6625, weight 4/8 -> .33125
      bin 8: .85      -> |gap| .15, weight 3/8 -> .05625;   bin 5: .55 -> |gap| .45, weight 1/8 -> .05625
      ECE = .44375; precision at >= .8 = (1 + 0 + 3) / (1 + 3 + 3) = 4/7 over 3 gold rows."""
    scored = pl.DataFrame({"conf": [0.95, 0.90, 0.85, 0.55], "correct": [True, False, True, True],
                           "weight": [1.0, 3.0, 3.0, 1.0]})
    cal = calibrate("run", "sentiment", "confidence", scored.get_column("conf"), scored)
    assert cal.ece == pytest.approx(0.44375)
    nine = cal.bins.filter(pl.col("bin") == 9).row(0, named=True)
    assert (nine["rows"], nine["mean_confidence"], nine["accuracy"]) == (2, pytest.approx(0.9125), 0.25)
    t = cal.thresholds.filter(pl.col("threshold") == 0.8).row(0, named=True)
    assert (t["gold_rows"], t["precision"]) == (3, pytest.approx(4 / 7))
    # The interval is Wilson's on the effective size (sum w)^2 / sum w^2 = 49 / 19.
    assert (t["precision_low"], t["precision_high"]) == tuple(pytest.approx(x) for x in wilson_share(4 / 7, 49 / 19))
