"""Reports of a profiling run: markdown tables, JSON, and horizontal bar charts as PNG.

The bar chart is drawn with Pillow so profiling needs no plotting library.
"""
from __future__ import annotations

import json
import os
from typing import List, Sequence

from PIL import Image, ImageDraw


def markdown_table(rows: List[dict], columns: Sequence[str], formats: Sequence[str]) -> str:
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt.format(r[c]) for c, fmt in zip(columns, formats)) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def bar_chart_png(path: str, labels: Sequence[str], values: Sequence[float], title: str,
                  unit: str = "ms", width: int = 900) -> None:
    """A horizontal bar chart, longest bar first, labels on the left and values on the right."""
    if len(labels) != len(values):
        raise ValueError(f"labels ({len(labels)}) and values ({len(values)}) differ in length")
    row_h, left, right, top = 22, 300, 110, 40
    height = top + row_h * max(len(labels), 1) + 20
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black")
    vmax = max(values) if values else 1.0
    span = width - left - right
    for i, (label, value) in enumerate(zip(labels, values)):
        y = top + i * row_h
        draw.text((10, y + 4), label[-45:], fill="black")
        w = int(span * (value / vmax)) if vmax > 0 else 0
        draw.rectangle([left, y + 3, left + max(w, 1), y + row_h - 3], fill=(70, 110, 180))
        draw.text((left + w + 6, y + 4), f"{value:.2f} {unit}", fill="black")
    img.save(path)
