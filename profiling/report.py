"""Reports of a profiling run: markdown tables, JSON, and horizontal bar charts as PNG.

The charts are drawn with Pillow so profiling needs no plotting library.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

from PIL import Image, ImageDraw

COLOURS = [(70, 110, 180), (220, 130, 50), (90, 160, 90), (180, 70, 70), (140, 100, 170), (120, 120, 120),
           (200, 180, 60)]


def markdown_table(rows: List[dict], columns: Sequence[str], formats: Sequence[str],
                   headers: Sequence[str] = ()) -> str:
    """Rows as a markdown table; a value of None prints as an em dash."""
    head = "| " + " | ".join(headers or columns) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join("—" if r.get(c) is None else fmt.format(r[c]) for c, fmt in zip(columns, formats))
            + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n")


def bar_chart_png(path: str, labels: Sequence[str], values: Sequence[float], title: str,
                  unit: str = "ms", width: int = 900) -> None:
    """A horizontal bar chart, one bar per label, value printed at its end."""
    if len(labels) != len(values):
        raise ValueError(f"labels ({len(labels)}) and values ({len(values)}) differ in length")
    stacked_bar_chart_png(path, labels, {"": list(values)}, title, unit, width)


def stacked_bar_chart_png(path: str, labels: Sequence[str], segments: Dict[str, Sequence[float]], title: str,
                          unit: str = "ms", width: int = 900) -> None:
    """Horizontal bars made of named segments (e.g. forward + backward), with a legend when
    there is more than one segment; the row's total is printed at the bar's end."""
    for name, vals in segments.items():
        if len(vals) != len(labels):
            raise ValueError(f"labels ({len(labels)}) and values of {name!r} ({len(vals)}) differ in length")
    row_h, left, right, top = 22, 300, 130, 40 + (18 if len(segments) > 1 else 0)
    height = top + row_h * max(len(labels), 1) + 20
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black")
    if len(segments) > 1:
        x = 10
        for k, name in enumerate(segments):
            draw.rectangle([x, 30, x + 12, 42], fill=COLOURS[k % len(COLOURS)])
            draw.text((x + 16, 30), name, fill="black")
            x += 30 + 7 * len(name)
    totals = [sum(max(float(vals[i]), 0.0) for vals in segments.values()) for i in range(len(labels))]
    vmax = max(totals) if totals and max(totals) > 0 else 1.0
    span = width - left - right
    for i, label in enumerate(labels):
        y = top + i * row_h
        text = str(label) if len(str(label)) <= 45 else f"{str(label)[:20]}...{str(label)[-22:]}"  # both ends say what it is
        draw.text((10, y + 4), text, fill="black")
        x = left
        for k, vals in enumerate(segments.values()):
            w = int(span * max(float(vals[i]), 0.0) / vmax)
            if w > 0:
                draw.rectangle([x, y + 3, x + w, y + row_h - 3], fill=COLOURS[k % len(COLOURS)])
            x += w
        draw.text((max(x, left) + 6, y + 4), f"{totals[i]:.2f} {unit}", fill="black")
    img.save(path)
