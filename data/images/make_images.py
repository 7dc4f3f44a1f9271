"""Regenerate the image-labelling sample (deterministic): python data/images/make_images.py

Writes a dozen small pictures of coloured shapes in every accepted format (PNG, JPEG, WEBP, GIF), and
two inputs over the same rows: shapes.jsonl names the files by path relative to itself (one row a
list of two, one row an https URL), shapes.parquet carries the image bytes themselves in a binary
column. configs/vision-demo.yaml reads either.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 70), "blue": (40, 80, 210), "yellow": (235, 200, 30),
           "purple": (130, 60, 170)}
SHAPES = ("circle", "square", "triangle")
# (file name, format, size): sizes chosen to exercise the tile rule, one above prompt.image_max_side.
PICTURES = [
    ("p01.png", "PNG", (640, 480)), ("p02.jpg", "JPEG", (300, 300)), ("p03.webp", "WEBP", (256, 256)),
    ("p04.gif", "GIF", (128, 128)), ("p05.png", "PNG", (1600, 900)), ("p06.jpg", "JPEG", (800, 1200)),
    ("p07.webp", "WEBP", (512, 384)), ("p08.png", "PNG", (200, 150)), ("p09.jpg", "JPEG", (1024, 1024)),
    ("p10.gif", "GIF", (96, 160)),
]
URL = "https://upload.wikimedia.org/wikipedia/commons/3/3f/Fronalpstock_big.jpg"


def draw(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, dict[str, object]]:
    w, h = size
    img = Image.new("RGB", size, (245, 245, 240))
    pen = ImageDraw.Draw(img)
    count = rng.randint(1, 3)
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    for i in range(count):
        r = min(w, h) // (3 + count)
        cx, cy = (i + 1) * w // (count + 1), h // 2
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            pen.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            pen.rectangle(box, fill=COLOURS[colour])
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return img, {"shape": shape, "colour": colour, "count": count}


def main() -> None:
    rng = random.Random(7)
    rows: list[dict[str, object]] = []
    for i, (name, fmt, size) in enumerate(PICTURES, 1):
        img, truth = draw(rng, size)
        save = {"quality": 70} if fmt in ("JPEG", "WEBP") else {}
        img.save(HERE / name, format=fmt, **save)
        rows.append({"image_id": f"img{i:02d}", "source": f"camera-{'ab'[i % 2]}", "image": name, "truth": truth})
    rows[-1]["image"] = [rows[-1]["image"], "p01.png"]  # a row with two images
    rows.append({"image_id": "img11", "source": "web", "image": URL, "truth": None})
    with open(HERE / "shapes.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    files = [r["image"] if isinstance(r["image"], str) else r["image"][0] for r in rows if r["truth"]]
    table = pa.table({
        "image_id": [r["image_id"] for r in rows if r["truth"]],
        "source": [r["source"] for r in rows if r["truth"]],
        "image": pa.array([(HERE / str(f)).read_bytes() for f in files], pa.binary()),
    })
    pq.write_table(table, HERE / "shapes.parquet", compression="zstd")


if __name__ == "__main__":
    main()
