"""`pipeline review export | import`: uncertain rows and a random sample out as Label Studio tasks and
CSV, the reviewers' labels back in as gold beside the job, and `pipeline report` scoring against them."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import pipeline
from pipeline import cli
from tests.reporting.reportkit import Figures, demo_job, with_confidence

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's first 40 reviews labelled on the simulator, with a row confidence."""
    base = tmp_path_factory.mktemp("review")
    rows = [json.loads(line) for line in (REPO / "data" / "reviews.jsonl").read_text().splitlines()[:40]]
    out = demo_job(base, "out", rows, model="openai/gpt-4-turbo", columns=["product", "stars"])
    with_confidence(out)
    return out


def _export(out: Path, dest: Path, *args: str) -> list[dict[str, Any]]:
    assert cli.main(["review", "export", str(out), *args, "-o", str(dest)]) == 0
    return json.loads(dest.read_text())  # type: ignore[no-any-return]


def test_export_tasks_csv_and_config(labelled: Path, tmp_path: Path) -> None:
    res = pl.read_parquet(labelled / "results.parquet")
    below = res.filter(pl.col("confidence") < 0.8)
    tasks = _export(labelled, tmp_path / "tasks.json", "--below", "0.8", "--sample", "5")
    assert len(tasks) == below.height + 5
    uncertain = [t for t in tasks if t["data"]["reason"] != "random sample"]
    assert sorted(t["data"]["row_id"] for t in uncertain) == sorted(below.get_column("review_id").to_list())
    assert [t["data"]["confidence"] for t in uncertain] == sorted(t["data"]["confidence"] for t in uncertain)
    sampled = [t["data"]["row_id"] for t in tasks if t["data"]["reason"] == "random sample"]
    assert len(set(sampled)) == 5 and not set(sampled) & {t["data"]["row_id"] for t in uncertain}
    answers = dict(res.select("review_id", pl.col("output").struct.field("sentiment").cast(pl.String)).iter_rows())
    text = {json.loads(line)["review_id"]: json.loads(line)["text"]
            for line in (labelled.parent / "out.jsonl").read_text().splitlines()}
    for t in tasks:
        rid = t["data"]["row_id"]
        assert text[rid] in t["data"]["text"]  # the rendered user message holds the review
        (pred,) = t["predictions"]
        assert pred["result"][0] == {"from_name": "sentiment", "to_name": "text", "type": "choices",
                                     "value": {"choices": [answers[rid]]}}
        assert pred["score"] == t["data"]["confidence"] and pred["model_version"] == "openai/gpt-4-turbo"
    config = (tmp_path / "tasks.label_config.xml").read_text()
    assert '<Choices name="sentiment" toName="text"' in config and '<Text name="text" value="$text"/>' in config
    with open(tmp_path / "tasks.csv", newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert [r["row_id"] for r in lines] == [t["data"]["row_id"] for t in tasks]
    assert all(r["sentiment"] == "" and r["model_sentiment"] == answers[r["row_id"]] for r in lines)
    # The same seed draws the same sample.
    again = _export(labelled, tmp_path / "again.json", "--below", "0.8", "--sample", "5")
    assert [t["data"]["row_id"] for t in again] == [t["data"]["row_id"] for t in tasks]


def _annotate(tasks: list[dict[str, Any]], flip: set[str]) -> list[dict[str, Any]]:
    """What Label Studio's JSON export holds after review: each task with its annotations (the first
    one superseded by a later one for some, one cancelled, one left unannotated)."""
    out = []
    for i, t in enumerate(tasks):
        model = t["predictions"][0]["result"][0]["value"]["choices"][0]
        label = ("mixed" if model != "mixed" else "positive") if t["data"]["row_id"] in flip else model
        result = [{"id": f"a{i}", "from_name": "sentiment", "to_name": "text", "type": "choices", "origin": "manual",
                   "value": {"choices": [label]}},
                  {"id": f"c{i}", "from_name": "note", "to_name": "text", "type": "textarea",
                   "value": {"text": ["looked at it"]}}]
        annotations = [{"id": 1000 + i, "completed_by": 1, "result": result, "was_cancelled": False,
                        "created_at": "2026-12-07T10:00:00.000000Z", "updated_at": "2026-12-07T10:05:00.000000Z",
                        "lead_time": 4.2}]
        if i % 4 == 1:  # an earlier, superseded annotation listed first
            stale = [{**result[0], "value": {"choices": ["negative"]}}]
            annotations.insert(0, {"id": 900 + i, "completed_by": 2, "result": stale, "was_cancelled": False,
                                   "created_at": "2026-12-07T09:00:00.000000Z",
                                   "updated_at": "2026-12-07T09:01:00.000000Z"})
        if i == 2:
            annotations = [{**annotations[-1], "was_cancelled": True}]
        if i == 3:
            annotations = []
        out.append({"id": i + 1, "data": t["data"], "annotations": annotations, "predictions": t["predictions"],
                    "project": 1, "meta": {}})
    return out


def test_label_studio_export_round_trips_into_gold(labelled: Path, tmp_path: Path) -> None:
    tasks = _export(labelled, tmp_path / "tasks.json", "--below", "0.8", "--sample", "5")
    flip = {t["data"]["row_id"] for t in tasks[::3]}
    exported = _annotate(tasks, flip)
    (tmp_path / "export.json").write_text(json.dumps(exported))
    assert cli.main(["review", "import", str(labelled), str(tmp_path / "export.json")]) == 0
    gold = pl.read_parquet(labelled / "gold.parquet")
    expected = {}
    for t in exported:
        if t["annotations"] and not t["annotations"][-1]["was_cancelled"]:
            expected[t["data"]["row_id"]] = t["annotations"][-1]["result"][0]["value"]["choices"][0]
    assert dict(gold.select("row_id", "value").iter_rows()) == expected
    assert set(gold.get_column("field")) == {"sentiment"} and len(expected) == len(tasks) - 2
    assert gold.filter(pl.col("row_id") == tasks[0]["data"]["row_id"]).item(0, "reason") == tasks[0]["data"]["reason"]
    assert set(gold.get_column("source")) == {"export.json"}

    # The report scores against the stored labels without --gold.
    rep = pipeline.report(labelled)
    score = rep.tables["gold"].row(0, named=True)
    res = pl.read_parquet(labelled / "results.parquet")
    answers = dict(res.select("review_id", pl.col("output").struct.field("sentiment").cast(pl.String)).iter_rows())
    # Weighted: every uncertain row was up for review, one in (rest / 5) of the others, so a sampled row
    # stands for rest / 5 rows of the job.
    rest = res.filter(pl.col("confidence") >= 0.8).height
    weight = {t["data"]["row_id"]: t["data"]["weight"] for t in tasks}
    assert {w for t, w in zip(tasks, weight.values()) if t["data"]["reason"] == "random sample"} == {rest / 5}
    assert {w for t, w in zip(tasks, weight.values()) if t["data"]["reason"] != "random sample"} == {1.0}
    assert dict(gold.select("row_id", "weight").iter_rows()) == {rid: weight[rid] for rid in expected}
    right = sum(weight[rid] for rid, v in expected.items() if answers[rid] == v)
    assert (score["field"], score["rows"]) == ("sentiment", len(expected))
    assert score["accuracy"] == pytest.approx(right / sum(weight[rid] for rid in expected))
    fig = Figures(rep.html)
    assert "gold.parquet" in rep.html and fig.ids.index("compare") < fig.ids.index("r0-run")
    assert rep.comparison is not None and rep.comparison.calibration


def test_filled_csv_imports_and_later_labels_win(labelled: Path, tmp_path: Path) -> None:
    _export(labelled, tmp_path / "t.json", "--sample", "6", "--seed", "3")
    with open(tmp_path / "t.csv", newline="") as fh:
        lines = list(csv.DictReader(fh))
    lines[0]["sentiment"], lines[1]["sentiment"] = "negative", " mixed "   # the rest left empty: not reviewed
    with open(tmp_path / "filled.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(lines[0]))
        writer.writeheader()
        writer.writerows(lines)
    gold_before = pl.read_parquet(labelled / "gold.parquet") if (labelled / "gold.parquet").exists() else None
    assert cli.main(["review", "import", str(labelled), str(tmp_path / "filled.csv")]) == 0
    gold = pl.read_parquet(labelled / "gold.parquet")
    got = dict(gold.filter(pl.col("source") == "filled.csv").select("row_id", "value").iter_rows())
    assert got == {lines[0]["row_id"]: "negative", lines[1]["row_id"]: "mixed"}
    if gold_before is not None:  # labels for other rows stay; a row labelled again takes the new label
        others = gold_before.filter(~pl.col("row_id").is_in(list(got)))
        assert others.height + len(got) == gold.height


def test_bad_imports_change_nothing(labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = _export(labelled, tmp_path / "tasks.json", "--sample", "3")
    before = (labelled / "gold.parquet").read_bytes() if (labelled / "gold.parquet").exists() else None
    bad_value = _annotate(tasks, set())
    bad_value[1]["annotations"][-1]["result"][0]["value"]["choices"] = ["angry"]
    unknown = _annotate(tasks, set())
    unknown[0]["data"] = {**unknown[0]["data"], "row_id": "R99999"}
    cases = [(bad_value, "task 2: sentiment = 'angry' is not one of positive"),
             (unknown, "task 1: row_id 'R99999' is not an answered row"),
             ({"data": {}}, "a JSON list of tasks"),
             ([{"data": {"text": "x"}, "annotations": []}], "task 1 has no data.row_id")]
    for i, (content, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.json"
        path.write_text(json.dumps(content))
        assert cli.main(["review", "import", str(labelled), str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(path) in err, err
    (tmp_path / "broken.csv").write_text("id,sentiment\nR00001,positive\n")
    assert cli.main(["review", "import", str(labelled), str(tmp_path / "broken.csv")]) == 2
    assert "no 'row_id' column" in capsys.readouterr().err
    after = (labelled / "gold.parquet").read_bytes() if (labelled / "gold.parquet").exists() else None
    assert after == before


def test_export_usage_errors(labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["review", "export", str(labelled), "-o", str(tmp_path / "t.json")]) == 2
    assert "--below" in capsys.readouterr().err
    assert cli.main(["review", "export", str(labelled), "--sample", "2", "-o", str(tmp_path / "t.txt")]) == 2
    assert "*.json" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert cli.main(["review", "export", str(labelled), "--sample", "2", "-o", str(tmp_path / "afile" / "t.json")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert cli.main(["review", "export", str(labelled), "--sample", "2", "-o", str(tmp_path / "new" / "t.json")]) == 0
    assert (tmp_path / "new" / "t.csv").exists()
    no_conf = tmp_path / "noconf"
    no_conf.mkdir()
    for name in ("manifest.json", "summary.json"):
        (no_conf / name).write_bytes((labelled / name).read_bytes())
    pl.read_parquet(labelled / "results.parquet").drop("confidence").write_parquet(no_conf / "results.parquet")
    assert cli.main(["review", "export", str(no_conf), "--below", "0.8", "-o", str(tmp_path / "t.json")]) == 2
    assert "quality.confidence" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_input_text_only_when_proved(tmp_path: Path) -> None:
    """A row edited in the input since it was answered gets no text (its rebuilt request is not the one
    answered); the other rows get the user message they were sent."""
    rows = [json.loads(line) for line in (REPO / "data" / "reviews.jsonl").read_text().splitlines()[:8]]
    out = demo_job(tmp_path, "job", rows, model="openai/gpt-4-turbo", columns=["product"])
    edited = {**rows[3], "text": "Something else entirely."}
    (tmp_path / "job.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3] + [edited] + rows[4:]))
    tasks = _export(out, tmp_path / "t.json", "--sample", "8")
    text = {t["data"]["row_id"]: t["data"]["text"] for t in tasks}
    assert text[rows[3]["review_id"]].startswith("(input not available")
    assert all(r["text"] in text[r["review_id"]] for r in rows if r is not rows[3])
