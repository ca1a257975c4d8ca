"""Class colors for masks and overlays: a deterministic default palette and ``--palette FILE``.

A palette is a uint8 array ``[N, 3]`` (one RGB color per class, in class order). A palette file is
either JSON (an object mapping class name to color, or a list of colors in class order) or plain
text with one color per line (blank lines and lines starting with ``#`` followed by a space are
skipped). A color is ``"#rrggbb"``, ``[r, g, b]`` or, in text files, ``r,g,b``.
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np

from gsnet_deploy.errors import GSNetError

# Hand-picked, well separated colors (ISPRS-like first: surfaces, building, vegetation, tree, car, clutter).
_BASE_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255),
    (0, 0, 255),
    (0, 255, 255),
    (0, 255, 0),
    (255, 255, 0),
    (255, 0, 0),
    (255, 128, 0),
    (128, 0, 255),
    (255, 0, 255),
    (0, 128, 128),
    (128, 64, 0),
    (128, 128, 128),
    (0, 0, 128),
    (128, 128, 0),
    (0, 128, 0),
    (128, 0, 0),
    (255, 160, 200),
    (160, 200, 255),
    (200, 255, 160),
    (64, 64, 64),
)


def default_palette(num_classes: int) -> np.ndarray:
    """Deterministic distinct colors: 20 hand-picked ones, then golden-ratio hues.

    Returns:
        uint8 ``[num_classes, 3]``.

    """
    colors = list(_BASE_COLORS[:num_classes])
    k = 0
    while len(colors) < num_classes:
        hue = (k * 0.618033988749895) % 1.0
        sat = 0.55 + 0.4 * ((k // 7) % 2)
        val = 0.95 - 0.3 * ((k // 3) % 2)
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
        k += 1
    return np.asarray(colors, dtype=np.uint8).reshape(num_classes, 3)  # [N, 3]


def parse_color(value: object, where: str) -> tuple[int, int, int]:
    """Parse ``"#rrggbb"``, ``"r,g,b"`` or ``[r, g, b]`` into an RGB triple.

    Args:
        value: the color as read from the palette file.
        where: location for the error message (file and entry).

    Raises:
        GSNetError: the color is malformed or out of range.

    """
    triple: list[int] | None = None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("#") and len(text) == 7:
            try:
                triple = [int(text[i : i + 2], 16) for i in (1, 3, 5)]
            except ValueError:
                triple = None
        else:
            parts = [p for p in text.replace(",", " ").split() if p]
            if len(parts) == 3 and all(p.isdigit() for p in parts):
                triple = [int(p) for p in parts]
    elif (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        triple = [int(v) for v in value]
    if triple is None or not all(0 <= v <= 255 for v in triple):
        raise GSNetError(f"palette {where}: color {value!r} is not '#rrggbb' or [r, g, b] with 0..255; fix the entry")
    return triple[0], triple[1], triple[2]


def _for_class(class_names: list[str], index: int) -> str:
    """`` (class 'name')`` for the class an entry colors, or nothing for entries beyond the classes."""
    return f" (class {class_names[index]!r})" if index < len(class_names) else ""


def load_palette(path: str | Path, class_names: list[str]) -> np.ndarray:
    """Read a palette file and return one color per class.

    Args:
        path: ``.json`` file (name -> color object, or a list of colors) or a text file with one
            color per line in class order.
        class_names: the run's classes, in order.

    Returns:
        uint8 ``[N, 3]``.

    Raises:
        GSNetError: the file is missing or malformed, a class has no color, or there are fewer
            colors than classes.

    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GSNetError(f"cannot read palette file {path} ({exc}); check --palette") from exc
    stripped = text.lstrip()
    colors: list[tuple[int, int, int]]
    if path.suffix.lower() == ".json" or stripped.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GSNetError(f"palette file {path} is not valid JSON ({exc}); fix it or use one color per line") from exc
        if isinstance(data, dict):
            missing = [name for name in class_names if name not in data]
            if missing:
                raise GSNetError(
                    f"palette file {path} has no color for class {missing[0]!r}"
                    f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; add it to the file"
                )
            colors = [parse_color(data[name], f"{path} [{name!r}]") for name in class_names]
        elif isinstance(data, list):
            colors = [parse_color(v, f"{path} [{i}]{_for_class(class_names, i)}") for i, v in enumerate(data)]
        else:
            raise GSNetError(f"palette file {path} holds a JSON {type(data).__name__}; use an object or a list")
    else:
        lines = [ln.strip() for ln in text.splitlines()]
        entries = [(i, ln) for i, ln in enumerate(lines, 1) if ln and not ln.startswith("# ")]
        colors = [parse_color(ln, f"{path}:{i}{_for_class(class_names, k)}") for k, (i, ln) in enumerate(entries)]
    if len(colors) < len(class_names):
        raise GSNetError(f"palette file {path} has {len(colors)} colors for {len(class_names)} classes; add one color per class")
    return np.asarray(colors[: len(class_names)], dtype=np.uint8).reshape(len(class_names), 3)  # [N, 3]


def resolve_palette(class_names: list[str], path: str | Path | None = None) -> np.ndarray:
    """The palette of a run: from ``path`` when given, else the default palette."""
    if path is None:
        return default_palette(len(class_names))
    return load_palette(path, class_names)
