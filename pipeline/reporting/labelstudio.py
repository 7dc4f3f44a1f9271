"""Label Studio's formats, in and out: import tasks with pre-annotations, a labeling config that matches
them, and the exports people bring back (JSON, JSON-MIN, CSV, or our own CSV filled in).

Tasks (Label Studio's documented import JSON): one object per row,
    {"data": {"text": ..., "row_id": ..., "reason": ..., "confidence": ..., "weight": ...},
     "predictions": [{"model_version": MODEL, "score": CONFIDENCE,
                      "result": [{"from_name": FIELD, "to_name": "text", "type": "choices",
                                  "value": {"choices": [VALUE]}}, ...]}]}
Every reviewed field is a <Choices name=FIELD toName="text"> in the labeling config written beside the
tasks (enum values as choices, booleans as "true" / "false"); the names must match or Label Studio drops
the pre-annotation. Its JSON export lists the same tasks with `annotations[].result[]` in the shape above;
JSON-MIN and CSV exports put each field's choice in a column named after the field.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

import orjson

from ..errors import InputError

TEXT = "text"          # the data key and <Text> name the choices point at
ROW_ID = "row_id"


@dataclass
class ReviewField:
    """A reviewable output field: an enum (its values) or a boolean."""

    name: str
    choices: list[str]


@dataclass
class Label:
    """One human label read back from an export."""

    row_id: str
    field: str
    value: str
    annotator: str | None
    annotated_at: str | None
    reason: str | None
    weight: float | None  # the row's inverse chance of being up for review, as exported
    where: str            # "task 3" / "line 5", for error messages


def task(row: dict[str, Any], fields: list[ReviewField], model: str) -> dict[str, Any]:
    """One import task: data (input text, row id, why it is up for review) and the model's answer."""
    result = [{"from_name": f.name, "to_name": TEXT, "type": "choices", "value": {"choices": [row[f.name]]}}
              for f in fields if row.get(f.name) is not None]
    prediction: dict[str, Any] = {"model_version": model, "result": result}
    if row.get("confidence") is not None:
        prediction["score"] = row["confidence"]
    data = {TEXT: row[TEXT], ROW_ID: row[ROW_ID], "reason": row["reason"], "confidence": row.get("confidence"),
            "weight": row["weight"]}
    return {"data": data, "predictions": [prediction] if result else []}


def label_config(fields: list[ReviewField]) -> str:
    """The <View> to paste into the project's Labeling Interface (Code)."""
    lines = ["<View>", f"  <Text name={quoteattr(TEXT)} value={quoteattr('$' + TEXT)}/>"]
    for f in fields:
        lines.append(f"  <Header value={quoteattr(f.name)}/>")
        lines.append(f"  <Choices name={quoteattr(f.name)} toName={quoteattr(TEXT)} choice=\"single\" "
                     "showInline=\"true\">")
        lines += [f"    <Choice value={quoteattr(c)}/>" for c in f.choices]
        lines.append("  </Choices>")
    lines.append("</View>")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]], fields: list[ReviewField]) -> str:
    """row_id, reason, weight, confidence, text, then per field the model's answer and an empty column to fill."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([ROW_ID, "reason", "weight", "confidence", TEXT]
                    + [c for f in fields for c in (f"model_{f.name}", f.name)])
    for r in rows:
        conf = "" if r.get("confidence") is None else f"{r['confidence']:.4f}"
        writer.writerow([r[ROW_ID], r["reason"], f"{r['weight']:.6g}", conf, _cell(r[TEXT])]
                        + [c for f in fields for c in (_cell(r.get(f.name)), "")])
    return out.getvalue()


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    # A spreadsheet runs a cell starting with = + - @ as a formula: the input text is untrusted.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def parse(data: bytes, name: str) -> tuple[list[Label], int]:
    """Labels from a Label Studio export (JSON, JSON-MIN or CSV) or our CSV filled in, and how many tasks
    (or CSV lines) the file holds."""
    head = data.lstrip()[:1]
    if head in (b"[", b"{"):
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise InputError(f"not valid JSON ({exc}); export the project as JSON from Label Studio",
                             file=name) from None
        if not isinstance(value, list):
            raise InputError("a Label Studio export is a JSON list of tasks; this is a single object", file=name)
        return _from_json(value, name), len(value)
    return _from_csv(data, name)


def _from_json(tasks: list[Any], name: str) -> list[Label]:
    labels: list[Label] = []
    for i, t in enumerate(tasks, 1):
        if not isinstance(t, dict):
            raise InputError(f"task {i} is a {type(t).__name__}, not an object", file=name)
        if "data" in t or "annotations" in t:
            labels += _from_task(t, f"task {i}", name)
        else:  # JSON-MIN: the task's data and each choice flat in one object
            labels += _from_flat(t, f"task {i}", name)
    return labels


def _from_task(t: dict[str, Any], where: str, name: str) -> list[Label]:
    data: dict[str, Any] = t["data"] if isinstance(t.get("data"), dict) else {}
    row_id = _row_id(data.get(ROW_ID), where, name)
    done = [a for a in t.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not done:
        return []
    # Several annotators: the one who saved last decides (Label Studio lists them oldest first).
    chosen = max(enumerate(done), key=lambda p: (str(p[1].get("updated_at") or p[1].get("created_at") or ""), p[0]))[1]
    annotator = chosen.get("completed_by")
    if isinstance(annotator, dict):
        annotator = annotator.get("email") or annotator.get("id")
    out = []
    for item in chosen.get("result") or []:
        if not isinstance(item, dict) or item.get("type") != "choices":
            continue  # a comment box or a region: not a label of a field
        choices = (item.get("value") or {}).get("choices") if isinstance(item.get("value"), dict) else None
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], str):
            raise InputError(f"{where}: {item.get('from_name')!r} holds {choices!r}; one choice per field is "
                             "expected (choice=\"single\" in the labeling config)", file=name)
        out.append(Label(row_id, str(item.get("from_name")), choices[0],
                         None if annotator is None else str(annotator),
                         _text(chosen.get("updated_at") or chosen.get("created_at")),
                         _text(data.get("reason")), _weight(data.get("weight"), where, name), where))
    return out


def _from_flat(t: dict[str, Any], where: str, name: str) -> list[Label]:
    row_id = _row_id(t.get(ROW_ID), where, name)
    skip = {ROW_ID, TEXT, "reason", "weight", "confidence", "id", "annotator", "annotation_id", "created_at",
            "updated_at",
            "lead_time"}
    out = []
    for key, value in t.items():
        if key in skip or key.startswith("model_") or value in (None, ""):
            continue
        if isinstance(value, dict) and isinstance(value.get("choices"), list):
            value = value["choices"][0] if len(value["choices"]) == 1 else value
        if not isinstance(value, (str, bool)):
            raise InputError(f"{where}: {key!r} holds {value!r}; one choice per field is expected", file=name)
        out.append(Label(row_id, key, str(value).lower() if isinstance(value, bool) else value,
                         _text(t.get("annotator")), _text(t.get("updated_at") or t.get("created_at")),
                         _text(t.get("reason")), _weight(t.get("weight"), where, name), where))
    return out


def _from_csv(data: bytes, name: str) -> tuple[list[Label], int]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text ({exc}); save the CSV as UTF-8", file=name) from None
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or ROW_ID not in reader.fieldnames:
        raise InputError(f"no {ROW_ID!r} column in the header ({', '.join(reader.fieldnames or [])}); use the CSV "
                         "`pipeline review export` wrote, or Label Studio's CSV export of its tasks", file=name)
    labels: list[Label] = []
    lines = 0
    for lines, row in enumerate(reader, 1):
        labels += _from_flat({k: v.strip() if isinstance(v, str) else v for k, v in row.items() if k},
                             f"line {lines + 1}", name)
    return labels, lines


def _row_id(value: Any, where: str, name: str) -> str:
    if value is None or isinstance(value, (dict, list)) or str(value) == "":
        raise InputError(f"{where} has no data.{ROW_ID}; were these tasks made by `pipeline review export`?",
                         file=name)
    return str(value)


def _weight(value: Any, where: str, name: str) -> float | None:
    """The exported weight (a number >= 1), or None when the file has none (then every row weighs 1)."""
    if value in (None, ""):
        return None
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = float("nan")
    if not weight >= 1.0 or weight == float("inf"):
        raise InputError(f"{where}: weight {value!r} is not a number >= 1; keep the weight column as exported",
                         file=name)
    return weight


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
