"""Synthetic captioned scenes: one to three flat shapes on a plain background, drawn from a seed.

They are what the bundled model is trained on and what its prompt adherence is judged against, so the
vocabulary is small, every word maps to something measurable in pixels (colours far apart in RGB, shapes with
distinct fill ratios, positions on a 3 x 3 grid of cells) and some colour-shape pairs are kept out of
training to measure generalisation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

# Named colours, at least 127 apart in RGB so a nearest-colour match survives blur and noise.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 180, 0),
    "blue": (0, 0, 255),
    "purple": (140, 0, 200),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "big")
# Cells of a 3 x 3 grid in reading order; POSITIONS[3 * row + col].
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)
MAX_SHAPES = 3
# What a caption that leaves out a size or a lone shape's place means (scenes.caption's unsaid_defaults).
DEFAULT_SIZE = "big"
DEFAULT_POSITION = "centre"
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three")

# Colour-shape pairs never drawn for training; one per kind, each with a different colour.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("red", "star"), ("blue", "triangle"), ("yellow", "circle"), ("green", "square")})

# Side of a shape's bounding box as a fraction of the image side, before jitter; the judge splits
# small from big halfway between the jittered ranges. Small is 12 pixels at 64 x 64: at 9.6 the bundled VQGAN's
# 4-pixel codes returned a small shape's kind in only 40% of scenes (training/README.md, seventh run).
EXTENT: dict[str, float] = {"small": 0.19, "big": 0.25}
SCALE_JITTER = 0.08  # a shape's extent varies by up to this fraction
MARGIN = 0.03  # least gap between a shape and its cell's edge, as a fraction of the image side
_SUPERSAMPLE = 4  # drawn this many times larger, then averaged down: anti-aliased edges, as a model draws


@dataclasses.dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    size: str
    position: str
    dx: float = 0.0  # offset of the centre from its cell's centre, as a fraction of the image side
    dy: float = 0.0
    scale: float = 1.0  # multiplies the size's extent

    def __post_init__(self):
        for value, allowed in ((self.colour, COLOURS), (self.kind, KINDS), (self.size, SIZES),
                               (self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {list(allowed)}")


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    def __post_init__(self):
        if self.background not in COLOURS:
            raise ValueError(f"{self.background!r} is not one of {list(COLOURS)}")
        if not 1 <= len(self.shapes) <= MAX_SHAPES:
            raise ValueError(f"a scene has 1 to {MAX_SHAPES} shapes, not {len(self.shapes)}")
        if len({s.position for s in self.shapes}) != len(self.shapes):
            raise ValueError("two shapes share a cell")
        if any(s.colour == self.background for s in self.shapes):
            raise ValueError("a shape has the background's colour")


def cell_centre(position: str) -> tuple[float, float]:
    """Centre (x, y) of a position's cell, as fractions of the image side."""
    row, col = divmod(POSITIONS.index(position), 3)
    return (col + 0.5) / 3, (row + 0.5) / 3


def _max_offset(extent: float) -> float:
    """How far a shape of this extent may move from its cell's centre and still keep MARGIN to the cell edge."""
    return max(0.0, 1 / 6 - extent / 2 - MARGIN)


def _outline(kind: str, cx: float, cy: float, extent: float) -> list[tuple[float, float]]:
    """Polygon of a triangle or star whose bounding box is extent wide and centred on (cx, cy)."""
    half = extent / 2
    if kind == "triangle":  # apex up, as tall as wide
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if kind == "star":  # five points, one up; outer radius set by the width, 2 r sin 72
        outer = half / math.sin(math.radians(72))
        inner = outer * math.sin(math.radians(18)) / math.sin(math.radians(54))  # a regular pentagram's
        height = outer * (1 + math.cos(math.radians(36)))
        centre_y = cy - height / 2 + outer
        points = []
        for i in range(10):
            radius = outer if i % 2 == 0 else inner
            angle = math.radians(-90 + 36 * i)
            points.append((cx + radius * math.cos(angle), centre_y + radius * math.sin(angle)))
        return points
    raise ValueError(f"{kind!r} is not a polygon")


def _draw(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, extent: float, fill) -> None:
    box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(_outline(kind, cx, cy, extent), fill=fill)


def _fill_ratio(kind: str) -> float:
    """Area of a kind drawn with extent 1 (its box is 1 x 1; the star's is a little less tall)."""
    if kind == "circle":
        return math.pi / 4
    if kind == "square":
        return 1.0
    xs, ys = np.array(_outline(kind, 0.0, 0.0, 1.0)).T
    return float(abs(xs @ np.roll(ys, 1) - ys @ np.roll(xs, 1)) / 2)  # shoelace formula


# Area of each kind drawn with extent 1, so an extent can be read back from an area.
FILL: dict[str, float] = {kind: _fill_ratio(kind) for kind in KINDS}


def render(scene: Scene, resolution: int) -> np.ndarray:
    """The scene as uint8 pixels (resolution, resolution, 3), anti-aliased."""
    side = resolution * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x, y = cell_centre(shape.position)
        extent = EXTENT[shape.size] * shape.scale * side
        _draw(draw, shape.kind, (x + shape.dx) * side, (y + shape.dy) * side, extent, COLOURS[shape.colour])
    return np.asarray(image.resize((resolution, resolution), Image.Resampling.BOX))


def coverage(kind: str, cx: float, cy: float, extent: float, resolution: int) -> np.ndarray:
    """Float32 (resolution, resolution) map of how much of each pixel one shape covers, 0 to 1, as render
    draws it; centre and extent in pixels. Templates for the judge."""
    image = Image.new("L", (resolution * _SUPERSAMPLE,) * 2, 0)
    _draw(ImageDraw.Draw(image), kind, cx * _SUPERSAMPLE, cy * _SUPERSAMPLE, extent * _SUPERSAMPLE, 255)
    small = image.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, held_out: bool = False) -> Scene:
    """A random scene: 1 to 3 shapes in distinct cells, half the multi-shape scenes a count of one kind.

    ``held_out=False`` draws only training pairs (never a pair in HELD_OUT); ``held_out=True`` draws every
    shape from HELD_OUT, for measuring generalisation.
    """
    pairs = sorted(HELD_OUT) if held_out else [
        (c, k) for c in COLOURS for k in KINDS if (c, k) not in HELD_OUT]
    n = int(rng.integers(1, MAX_SHAPES + 1))
    same = n > 1 and rng.random() < 0.5  # a count: n copies of one colour, kind and size
    looks = []
    for _ in range(n):
        looks.append(looks[0] if same and looks else (*_pick(rng, pairs), _pick(rng, SIZES)))
    background = _pick(rng, [c for c in COLOURS if c not in {colour for colour, _, _ in looks}])
    cells = rng.permutation(len(POSITIONS))[:n]
    shapes = []
    for (colour, kind, size), cell in zip(looks, cells):
        scale = 1 + rng.uniform(-SCALE_JITTER, SCALE_JITTER)
        reach = _max_offset(EXTENT[size] * scale)
        dx, dy = rng.uniform(-reach, reach, size=2)
        shapes.append(Shape(colour, kind, size, POSITIONS[cell], float(dx), float(dy), float(scale)))
    return Scene(background, tuple(shapes))


# --------------------------------------------------------------------------- captions

_PLURAL = {kind: kind + "s" for kind in KINDS}
# How a position is said after a shape ("a red circle in the top left").
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "at the top left"),
    "top": ("at the top", "in the top middle"),
    "top right": ("in the top right", "at the top right"),
    "left": ("on the left", "at the left"),
    "centre": ("in the centre", "in the middle"),
    "right": ("on the right", "at the right"),
    "bottom left": ("in the bottom left", "at the bottom left"),
    "bottom": ("at the bottom", "in the bottom middle"),
    "bottom right": ("in the bottom right", "at the bottom right"),
}
# Where in the caption the background goes, and how it is said; {a} is the article before the colour.
_CAPTIONS = (
    "{shapes} on {a} {background} background",
    "{a} {background} background with {shapes}",
    "{shapes}, {background} background",
    "on {a} {background} background, {shapes}",
)
_INVERTIBLE = (0, 2, 3)  # templates where a lone shape may be said position first: "in the top left, a ..."


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _size_and_colour(size: str, colour: str, unsaid: Callable[[], bool]) -> str:
    return colour if size == DEFAULT_SIZE and unsaid() else f"{size} {colour}"


def _group_phrase(rng: np.random.Generator, look: tuple[str, str, str], positions: list[str],
                  unsaid: Callable[[], bool]) -> str:
    colour, kind, size = look
    n = len(positions)
    words = _size_and_colour(size, colour, unsaid)
    if n == 1:
        what = f"{_pick(rng, ('a', 'one'))} {words} {kind}"
    else:
        what = f"{COUNT_WORDS[n - 1]} {words} {_PLURAL[kind]}"
    if positions == [DEFAULT_POSITION] and unsaid():
        return what
    return f"{what} {_join([_pick(rng, POSITION_PHRASES[p]) for p in positions])}"


def caption(scene: Scene, rng: np.random.Generator, unsaid_defaults: float = 0.0) -> str:
    """A caption naming every word of the scene, in one of several templates and orders.

    Shapes of the same colour, kind and size are said once with their count ("two big red circles on the
    left and in the centre"); groups come in random order. With ``unsaid_defaults`` > 0, that is the chance a
    big shape's size, and a lone shape's place in the centre, go unsaid: people leave them out ("a red square
    on a blue background"), and a model that has read such captions draws what they imply. At 0 the rng
    draws nothing more, so seeded scenes and their full captions are unchanged.
    """
    def unsaid() -> bool:
        return unsaid_defaults > 0 and rng.random() < unsaid_defaults

    groups: dict[tuple[str, str, str], list[str]] = {}
    for shape in scene.shapes:
        groups.setdefault((shape.colour, shape.kind, shape.size), []).append(shape.position)
    looks = list(groups)
    template = int(rng.integers(len(_CAPTIONS)))
    if len(scene.shapes) == 1 and template in _INVERTIBLE and rng.random() < 0.5:
        shape = scene.shapes[0]
        words = _size_and_colour(shape.size, shape.colour, unsaid)
        said = f"{_pick(rng, POSITION_PHRASES[shape.position])}, a {words} {shape.kind}"
    else:
        said = _join([_group_phrase(rng, looks[i], groups[looks[i]], unsaid) for i in rng.permutation(len(looks))])
    article = "an" if scene.background[0] in "aeiou" else "a"
    return _CAPTIONS[template].format(shapes=said, a=article, background=scene.background)
