"""Deterministic, cheap rendering of the generated shop's product images.

A reference looks like ``synthetic:v1;shape=3;layout=0;color=d62728;pattern=1;seed=123456`` and
holds everything the picture depends on:

- ``shape`` (0..N_SHAPES-1) and ``layout`` (0..N_LAYOUTS-1): the silhouette; the generator maps
  each category to one (shape, layout) pair, so the category is visible;
- ``color``: the fill colour as 6 hex digits (the item's latent colour, plus a small jitter);
- ``pattern``: 0 plain, 1 stripes, 2 dots, drawn in a darker shade of the fill;
- ``seed``: per-item noise (position, size, rotation, background tint, pixel noise), so two items of
  one category are never identical.

Rendering draws at the requested size with PIL ImageDraw, so it costs well under a millisecond.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

PREFIX = "synthetic:"
VERSION = "v1"
SHAPES = (
    "circle", "square", "triangle", "diamond", "star", "cross",
    "ring", "hexagon", "wide_bar", "tall_bar", "chevron", "half_disc",
)  # fmt: skip
N_SHAPES = len(SHAPES)
LAYOUTS = ("single", "pair", "underlined")
N_LAYOUTS = len(LAYOUTS)
N_PATTERNS = 3
_KEYS = ("shape", "layout", "color", "pattern", "seed")


def is_synthetic_ref(ref) -> bool:
    """True for a string that claims to be a synthetic image reference (it may still be malformed)."""
    return isinstance(ref, str) and ref.startswith(PREFIX)


def make_ref(shape: int, layout: int, color: str, pattern: int, seed: int) -> str:
    return f"{PREFIX}{VERSION};shape={shape};layout={layout};color={color};pattern={pattern};seed={seed}"


def parse_ref(ref: str) -> dict:
    """The fields of a reference; raises ValueError saying what is wrong with a malformed one."""
    if not is_synthetic_ref(ref):
        raise ValueError(f"malformed synthetic image ref {ref!r}: must be a string starting with {PREFIX!r}")
    parts = ref[len(PREFIX):].split(";")
    if parts[0] != VERSION:
        raise ValueError(f"malformed synthetic image ref {ref!r}: version {parts[0]!r}, expected {VERSION!r}")
    fields = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep or key not in _KEYS or key in fields:
            raise ValueError(f"malformed synthetic image ref {ref!r}: bad field {part!r}")
        fields[key] = value
    missing = [k for k in _KEYS if k not in fields]
    if missing:
        raise ValueError(f"malformed synthetic image ref {ref!r}: missing fields {missing}")
    try:
        out = {k: int(fields[k]) for k in ("shape", "layout", "pattern", "seed")}
        color = fields["color"]
        if len(color) != 6:
            raise ValueError
        out["color"] = tuple(int(color[i:i + 2], 16) for i in (0, 2, 4))
    except ValueError:
        raise ValueError(f"malformed synthetic image ref {ref!r}: non-numeric or bad colour field") from None
    limits = {"shape": N_SHAPES, "layout": N_LAYOUTS, "pattern": N_PATTERNS}
    for key, limit in limits.items():
        if not 0 <= out[key] < limit:
            raise ValueError(f"malformed synthetic image ref {ref!r}: {key}={out[key]} not in [0, {limit})")
    if out["seed"] < 0:
        raise ValueError(f"malformed synthetic image ref {ref!r}: negative seed")
    return out


def _polygon(cx, cy, r, n, rot, inner=None):
    """A regular polygon (or a star when `inner` is the inner radius ratio)."""
    pts = []
    steps = 2 * n if inner else n
    for k in range(steps):
        a = rot + 2 * math.pi * k / steps - math.pi / 2
        rr = r * (inner if inner and k % 2 else 1.0)
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _rotated_rect(cx, cy, w, h, rot):
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in ((-w, -h), (w, -h), (w, h), (-w, h))]


def _draw_shape(draw, shape, cx, cy, r, rot, fill, outline, width, bg):
    kw = {"fill": fill, "outline": outline, "width": width}
    box = (cx - r, cy - r, cx + r, cy + r)
    name = SHAPES[shape]
    if name == "circle":
        draw.ellipse(box, **kw)
    elif name == "square":
        draw.polygon(_rotated_rect(cx, cy, r * 0.8, r * 0.8, rot), **kw)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rot), **kw)
    elif name == "diamond":
        draw.polygon(_rotated_rect(cx, cy, r * 0.55, r * 0.55, rot + math.pi / 4), **kw)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rot, inner=0.45), **kw)
    elif name == "cross":
        draw.polygon(_rotated_rect(cx, cy, r, r * 0.3, rot), **kw)
        draw.polygon(_rotated_rect(cx, cy, r * 0.3, r, rot), fill=fill)
    elif name == "ring":
        draw.ellipse(box, **kw)
        hole = (cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5)
        draw.ellipse(hole, fill=bg, outline=outline, width=width)
    elif name == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot), **kw)
    elif name == "wide_bar":
        draw.polygon(_rotated_rect(cx, cy, r, r * 0.35, rot), **kw)
    elif name == "tall_bar":
        draw.polygon(_rotated_rect(cx, cy, r * 0.35, r, rot), **kw)
    elif name == "chevron":
        pts = [(-1, -0.9), (0.1, 0), (-1, 0.9), (-0.4, 0.9), (0.8, 0), (-0.4, -0.9)]
        c, s = math.cos(rot), math.sin(rot)
        draw.polygon([(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts], **kw)
    else:  # half_disc
        draw.pieslice(box, 180 + math.degrees(rot), 360 + math.degrees(rot), **kw)


def render_synthetic_image(ref: str, size: int = 64) -> Image.Image:
    """The RGB image of a synthetic reference, identical on every call."""
    spec = parse_ref(ref)
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    rng = random.Random(spec["seed"])
    tint = rng.randint(-8, 8)
    bg = tuple(int(v) for v in np.clip(np.array([226, 224, 220]) + tint + rng.randint(-4, 4), 0, 255))
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    fill = spec["color"]
    dark = tuple(int(v * 0.7) for v in fill)
    outline = (30, 30, 30) if sum(fill) > 200 else (120, 120, 120)
    width = max(1, size // 32)
    rot = math.radians(rng.uniform(-15, 15))
    scale = rng.uniform(0.32, 0.4) * size
    cx = size / 2 + rng.uniform(-0.07, 0.07) * size
    cy = size / 2 + rng.uniform(-0.07, 0.07) * size
    layout = LAYOUTS[spec["layout"]]
    if layout == "pair":
        centres = [
            (cx - scale * 0.5, cy - scale * 0.2, scale * 0.55),
            (cx + scale * 0.5, cy + scale * 0.2, scale * 0.55),
        ]
    elif layout == "underlined":
        centres = [(cx, cy - scale * 0.15, scale * 0.8)]
        draw.rectangle((size * 0.1, size * 0.86, size * 0.9, size * 0.92), fill=outline)
    else:
        centres = [(cx, cy, scale)]
    for x, y, r in centres:
        _draw_shape(draw, spec["shape"], x, y, r, rot, fill, outline, width, bg)
    if spec["pattern"]:
        # texture only where the shape is: draw on a copy and keep pixels that had the fill colour
        mask = Image.new("L", (size, size), 0)
        mdraw = ImageDraw.Draw(mask)
        step = max(3, size // 10)
        if spec["pattern"] == 1:
            for k in range(-size, size, step):
                mdraw.line((k, 0, k + size, size), fill=255, width=max(1, size // 40))
        else:
            for x in range(step // 2, size, step):
                for y in range(step // 2, size, step):
                    mdraw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=255)
        pixels = np.asarray(image)
        on_shape = np.all(pixels == np.array(fill, dtype=np.uint8), axis=-1)
        keep = np.asarray(mask) > 0
        pixels = pixels.copy()
        pixels[on_shape & keep] = dark
        image = Image.fromarray(pixels)
    noise = np.random.default_rng(spec["seed"]).integers(-6, 7, size=(size, size, 3))
    pixels = np.clip(np.asarray(image).astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")
