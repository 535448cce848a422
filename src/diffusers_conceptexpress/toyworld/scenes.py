"""Procedural toy scenes with exact ground truth: objects of known shape, colour and texture, their masks.

A scene is a 64x64 RGB picture of 1-3 flat objects (6 shapes x 8 colours, optionally striped) on a muted,
textured background (noise, gradient, stripes or checks of low saturation), plus the visible mask of every
object (painter's order: later objects cover earlier ones; visible parts are disjoint) and a caption in the
method's prompt template, e.g. ``"a photo of a red circle and a blue striped star"``.

Everything is a pure function of the seed (``numpy.random.default_rng(seed)``), so ``render_scene(s)`` is
the same picture on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "IMAGE_SIZE",
    "PALETTE",
    "SHAPES",
    "TEXTURES",
    "Scene",
    "caption_for",
    "object_phrase",
    "render_scene",
    "shape_mask",
]

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
TEXTURES = ("plain", "striped")
BACKGROUNDS = ("noise", "gradient", "stripes", "checks")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (40, 175, 60),
    "cyan": (30, 200, 215),
    "blue": (40, 70, 225),
    "purple": (145, 55, 205),
    "pink": (245, 110, 185),
}
STRIPED_PROB = 0.25
MIN_VISIBLE = 0.6  # an object keeps at least this share of its area visible
# object radius in pixels at 64 px (scaled with ``size``): alone, and in scenes of several objects. The first
# world drew several objects at (10, 15): too small for the attention grid (docs/toyworld.md, "World").
#: bumped whenever ``render_scene``'s output for a seed changes (benchmark caches are keyed by it)
WORLD_VERSION = 4
SINGLE_RADIUS = (12.0, 19.0)
MULTI_RADIUS = (14.0, 19.0)  # 2-3 objects
CROWDED_RADIUS = (10.0, 15.0)  # 4 objects (larger ones often cannot all stay 60% visible)
RIM_WIDTH = 2  # pixels at 64 px: the rim world's dark outline inside every object (``render_scene(rim=...)``)
RIM_SHADE = 0.35  # the rim's colour is this share of the object's colour
# a striped object's dark bands are this share of its colour: 0.8 since the fourth world (session 14). The third
# world's 0.55 bands were close to the rim's 0.35, which then no longer outlined striped objects.
STRIPE_SHADE = 0.8


@dataclass
class Scene:
    """One rendered scene.

    Attributes:
        image: the picture, PIL RGB, ``IMAGE_SIZE`` x ``IMAGE_SIZE``.
        masks: one bool array (H, W) per object: its visible pixels; disjoint, non-empty.
        objects: one dict per object (same order as ``masks``): "shape", "color", "texture",
            "center" (x, y in pixels), "size" (radius in pixels), "angle" (degrees).
        caption: "a photo of a red circle and a blue striped star" (objects in ``objects`` order).
        background: dict with the background "kind" and its "rgb" base colour.
        seed: the seed it was rendered from.
    """

    image: Image.Image
    masks: list[np.ndarray]
    objects: list[dict]
    caption: str
    background: dict = field(default_factory=dict)
    seed: int = 0


def object_phrase(obj: dict) -> str:
    """'red circle' or 'red striped circle'."""
    texture = obj.get("texture", "plain")
    return f"{obj['color']} {texture + ' ' if texture != 'plain' else ''}{obj['shape']}"


def caption_for(objects: list[dict]) -> str:
    """The method's prompt template naming every object: 'a photo of a red circle and a blue star'."""
    return "a photo of " + " and ".join("a " + object_phrase(o) for o in objects)


def shape_mask(
    shape: str, cx: float, cy: float, size: float, angle: float, n: int = IMAGE_SIZE
) -> np.ndarray:
    """Bool (n, n) mask of a shape centred at (cx, cy) with radius ``size`` pixels, rotated by ``angle`` deg.

    Pixel centres are sampled at +0.5 (no anti-aliasing: the masks are exact).
    """
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    a = math.radians(angle)
    dx, dy = xx - cx, yy - cy
    u = (dx * math.cos(a) + dy * math.sin(a)) / size  # rotated, unit radius coordinates
    v = (-dx * math.sin(a) + dy * math.cos(a)) / size
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.82) & (np.abs(v) <= 0.82)
    if shape == "triangle":  # pointing up in its own frame (v grows downwards)
        return _polygon(u, v, [(math.sin(t), -math.cos(t)) for t in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)])
    if shape == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.45
            t = i * math.pi / 5
            pts.append((r * math.sin(t), -r * math.cos(t)))
        return _polygon(u, v, pts)
    if shape == "cross":
        w = 0.33
        return ((np.abs(u) <= w) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= w) & (np.abs(u) <= 0.95))
    if shape == "heart":
        x, y = u * 1.25, -(v * 1.25) + 0.15
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    raise ValueError(f"Unknown shape {shape!r}; choose one of {SHAPES}.")


def _polygon(u: np.ndarray, v: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the grid."""
    inside = np.zeros(u.shape, dtype=bool)
    m = len(pts)
    for i in range(m):
        x1, y1 = pts[i]
        x2, y2 = pts[(i + 1) % m]
        if y1 == y2:
            continue
        cond = (v >= min(y1, y2)) & (v < max(y1, y2))
        xc = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= cond & (u < xc)
    return inside


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Pixels whose (2r + 1)^2 neighbourhood lies inside ``mask``; the canvas edge is not an outline."""
    h, w = mask.shape
    padded = np.pad(mask, r, mode="edge")
    out = mask.copy()
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out &= padded[dy : dy + h, dx : dx + w]
    return out


def _same_colour_apart(objects: list[dict], full: list[np.ndarray]) -> bool:
    """Objects of the same colour must not touch (3 px gap), so every object stays a separate region."""
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            if objects[i]["color"] == objects[j]["color"] and (_dilate(full[i], 3) & full[j]).any():
                return False
    return True


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _background(rng: np.random.Generator, n: int) -> tuple[np.ndarray, dict]:
    """Muted (low saturation) textured background, float (n, n, 3) in [0, 1]."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    base = _hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.22), rng.uniform(0.35, 0.75))
    other = np.clip(base * rng.uniform(0.8, 0.92) + rng.uniform(-0.03, 0.03, 3), 0, 1)
    yy, xx = np.mgrid[0:n, 0:n] / n
    if kind == "noise":
        weight = np.zeros((n, n))
    elif kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        g = xx * math.cos(a) + yy * math.sin(a)
        weight = (g - g.min()) / max(np.ptp(g), 1e-6)
    elif kind == "stripes":
        a = rng.uniform(0, math.pi)
        period = rng.uniform(0.12, 0.3)
        weight = (np.floor((xx * math.cos(a) + yy * math.sin(a)) / (period / 2)) % 2).astype(float)
    else:
        cell = int(rng.integers(6, 13))
        ii, jj = np.mgrid[0:n, 0:n] // cell
        weight = ((ii + jj) % 2).astype(float)
    bg = base[None, None] * (1 - weight[..., None]) + other[None, None] * weight[..., None]
    bg = bg + rng.normal(0.0, rng.uniform(0.01, 0.04), (n, n, 3))
    return bg, {"kind": kind, "rgb": tuple(int(c) for c in np.round(base * 255))}


def _default_radius(num_objects: int) -> tuple[float, float]:
    if num_objects == 1:
        return SINGLE_RADIUS
    return MULTI_RADIUS if num_objects <= 3 else CROWDED_RADIUS


def render_scene(
    seed: int,
    num_objects: int | None = None,
    size: int = IMAGE_SIZE,
    radius_range: tuple[float, float] | None = None,
    rim: int = RIM_WIDTH,
    stripe_shade: float = STRIPE_SHADE,
    keep: Sequence[int] | None = None,
) -> Scene:
    """Render scene number ``seed`` (deterministic) with ``num_objects`` objects (default: 1-3 at random).

    Objects may overlap, but each keeps at least 60% of its area visible. In about 1 scene in 4 with
    several objects, two objects share a colour (different shapes). Object radii are drawn uniformly from
    ``radius_range`` (pixels at 64 px, scaled with ``size``; default ``SINGLE_RADIUS`` for one object,
    ``MULTI_RADIUS`` for 2-3, ``CROWDED_RADIUS`` for 4; ``(10.0, 15.0)`` with ``rim=0`` gives the first world's 2-3-object
    scenes).

    ``rim`` (pixels at 64 px, scaled with ``size``) draws a dark outline (``RIM_SHADE`` of the colour) along
    the inside of every object's own outline, like a sticker, so that the object's shape shows inside its
    visible mask (also where an occluder cuts it). The default ``RIM_WIDTH`` came with the third world and is kept
    by the fourth, the shipped model's (docs/toyworld.md, "The rim world"). It adds no random draw: ``rim=0`` renders the same scene
    without rims, the second world, pixel for pixel.

    ``stripe_shade`` is the colour of a striped object's dark bands as a share of its colour (default
    ``STRIPE_SHADE``, 0.8, the fourth world's, the shipped model's); like ``rim`` it adds no random draw, so other
    values change only those bands (0.55: the third world's darker stripes, the eighth model's, docs/toyworld.md).

    ``keep`` (object indices; a diagnostic): only these objects stay in the picture; every other object's
    visible pixels show the scene's background instead. ``masks``, ``objects`` and ``caption`` stay the whole
    scene's and no random draw changes, so a kept object has exactly its pixels and visible mask of the full
    scene (where it was occluded, the background shows).
    """
    if num_objects is not None and not 1 <= num_objects <= 4:
        raise ValueError("num_objects must be between 1 and 4")
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 4)) if num_objects is None else int(num_objects)
    canvas, bg_info = _background(rng, size)
    background = canvas.copy()
    scale = size / 64.0
    for _attempt in range(200):
        objects, full = [], []
        for i in range(k):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            if i > 0 and rng.random() < 0.25:
                color = objects[int(rng.integers(i))]["color"]  # same colour, different shape
                shape = rng.choice([s for s in SHAPES if s not in {o["shape"] for o in objects}])
            else:
                color = COLORS[int(rng.integers(len(COLORS)))]
            texture = "striped" if rng.random() < STRIPED_PROB else "plain"
            radius = rng.uniform(*(radius_range or _default_radius(k)))
            radius *= scale
            cx, cy = rng.uniform(radius * 0.9, size - radius * 0.9, 2)
            angle = rng.uniform(-25.0, 25.0)
            objects.append(
                {
                    "shape": str(shape),
                    "color": str(color),
                    "texture": texture,
                    "center": (float(cx), float(cy)),
                    "size": float(radius),
                    "angle": float(angle),
                }
            )
            full.append(shape_mask(str(shape), cx, cy, radius, angle, size))
        visible = []
        for i, m in enumerate(full):
            later = np.zeros_like(m)
            for m2 in full[i + 1 :]:
                later |= m2
            visible.append(m & ~later)
        if all(
            v.sum() >= MIN_VISIBLE * f.sum() and f.sum() > 0 for v, f in zip(visible, full, strict=True)
        ) and _same_colour_apart(objects, full):
            break
    else:  # pragma: no cover - practically unreachable with these sizes
        raise RuntimeError(f"Could not place {k} objects for seed {seed}")

    yy, xx = np.mgrid[0:size, 0:size]
    for obj, m in zip(objects, full, strict=True):
        rgb = np.array(PALETTE[obj["color"]], dtype=np.float64) / 255.0
        rgb = np.clip(rgb * rng.uniform(0.92, 1.05), 0, 1)
        if obj["texture"] == "striped":
            a = math.radians(obj["angle"] + 45.0)
            period = 5.0 * scale
            band = np.floor((xx * math.cos(a) + yy * math.sin(a)) / period) % 2
            color_map = np.where(band[..., None] > 0, rgb[None, None] * stripe_shade, rgb[None, None])
        else:
            color_map = np.broadcast_to(rgb, (size, size, 3))
        if rim > 0:
            inner = _erode(m, max(1, round(rim * scale)))
            color_map = np.where(inner[..., None], color_map, color_map * RIM_SHADE)
        canvas[m] = color_map[m] + rng.normal(0.0, 0.015, (int(m.sum()), 3))
    if keep is not None:
        for i, v in enumerate(visible):
            if i not in keep:
                canvas[v] = background[v]
    image = Image.fromarray(np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8), "RGB")
    return Scene(
        image=image,
        masks=visible,
        objects=objects,
        caption=caption_for(objects),
        background=bg_info,
        seed=int(seed),
    )
