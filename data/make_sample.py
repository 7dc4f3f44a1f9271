"""Regenerate the sample review data (deterministic): python data/make_sample.py"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PRODUCTS = {
    "electronics": ["wireless earbuds", "4K monitor", "mechanical keyboard", "USB-C hub", "smart speaker",
                    "noise-cancelling headphones", "portable SSD", "webcam"],
    "kitchen": ["espresso machine", "chef's knife", "air fryer", "cast iron skillet", "blender", "kettle"],
    "outdoors": ["hiking backpack", "tent", "headlamp", "trail running shoes", "water filter"],
    "home": ["desk lamp", "office chair", "memory foam pillow", "robot vacuum", "standing desk"],
}
GOOD = ["works exactly as described", "the build quality is excellent", "setup took two minutes",
        "battery life is better than advertised", "arrived a day early", "great value for the price",
        "customer support answered within an hour", "it feels premium"]
BAD = ["stopped working after a week", "the instructions were useless", "it arrived with a cracked case",
       "battery barely lasts a morning", "way too loud", "the app keeps disconnecting",
       "refund took a month", "smells of plastic even after airing it out"]
MIXED = ["does the job but", "nice design, however", "good for the money although", "I wanted to love it but"]


def review(rng: random.Random, i: int) -> dict[str, object]:
    category = rng.choice(list(PRODUCTS))
    product = rng.choice(PRODUCTS[category])
    stars = rng.choices([1, 2, 3, 4, 5], weights=[2, 1, 2, 3, 4])[0]
    if stars >= 4:
        text = f"The {product} {rng.choice(GOOD)}, and {rng.choice(GOOD)}."
    elif stars <= 2:
        text = f"The {product} {rng.choice(BAD)}. Also, {rng.choice(BAD)}."
    else:
        text = f"The {product} {rng.choice(MIXED)} {rng.choice(BAD)}; still, {rng.choice(GOOD)}."
    if rng.random() < 0.3:
        text += f" Bought it for {rng.choice(['my office', 'a gift', 'camping', 'my kitchen', 'travel'])}."
    return {"review_id": f"R{i:05d}", "product": product, "category": category, "stars": stars,
            "text": text, "verified": rng.random() < 0.8}


def main() -> None:
    rng = random.Random(7)
    rows = [review(rng, i) for i in range(1, 241)]
    here = Path(__file__).parent
    with open(here / "reviews.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), here / "reviews.parquet")


if __name__ == "__main__":
    main()
