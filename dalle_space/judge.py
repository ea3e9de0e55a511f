"""Judges a picture of a scene from its pixels alone: background colour, and each shape's colour, kind, size
and position, so prompt adherence can be measured on what a model drew, without trusting the model.

The background is the border's colour; shapes are the connected regions that differ from it. Edges are
anti-aliased (and blurred in model output), so each pixel counts by its coverage, how far it lies from the
background towards the shape's colour, rather than by a hard mask. The kind is the one whose template, drawn
with the same area and centre as the region, differs least from it; size follows from that area.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from dalle_space.scenes import COLOURS, EXTENT, FILL, KINDS, POSITIONS, SCALE_JITTER, Scene, coverage

_RGB = np.array(list(COLOURS.values()), np.float32)
_NAMES = tuple(COLOURS)
FOREGROUND_DISTANCE = 50.0  # RGB distance from the background above which a pixel belongs to a shape
MIN_AREA = 0.0025  # components smaller than this fraction of the image are specks, not shapes
# Small and big extents split halfway between their jittered ranges.
BIG_EXTENT = (EXTENT["small"] * (1 + SCALE_JITTER) + EXTENT["big"] * (1 - SCALE_JITTER)) / 2
_BLOCK = np.ones((3, 3), bool)  # 8-connectivity
# Gaussian blurs (pixels) tried on each template: model output is softer than the renderer's edges.
BLURS: tuple[float, ...] = (0.0, 0.5, 0.8, 1.1, 1.4)


@dataclasses.dataclass(frozen=True)
class Found:
    colour: str
    kind: str
    size: str
    position: str


@dataclasses.dataclass(frozen=True)
class Verdict:
    background: str
    shapes: tuple[Found, ...]  # in reading order of their centres


@dataclasses.dataclass(frozen=True)
class Checks:
    """What a verdict got right about a scene; each attribute compares the multisets over all shapes."""

    colour: bool  # background and shape colours
    shape: bool
    count: bool
    size: bool
    position: bool
    all: bool  # background right and the shapes equal one to one in every attribute


def _nearest(rgb: np.ndarray, exclude: str | None = None) -> str:
    distance = np.linalg.norm(_RGB - rgb, axis=-1)
    if exclude is not None:
        distance[_NAMES.index(exclude)] = np.inf
    return _NAMES[int(np.argmin(distance))]


def _border(pixels: np.ndarray) -> np.ndarray:
    width = max(1, pixels.shape[0] // 32)
    return np.concatenate([pixels[:width].reshape(-1, 3), pixels[-width:].reshape(-1, 3),
                           pixels[:, :width].reshape(-1, 3), pixels[:, -width:].reshape(-1, 3)])


def _centroid(weights: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(weights.shape) + 0.5  # pixel centres, in the units shapes are drawn in
    return float((weights * xs).sum() / weights.sum()), float((weights * ys).sum() / weights.sum())


def _template(kind: str, area: float, cx: float, cy: float, side: int) -> tuple[np.ndarray, float]:
    """Coverage of a kind drawn with this area and centroid, and its extent."""
    extent = float(np.sqrt(area / FILL[kind]))
    tx, ty = _centroid(coverage(kind, cx, cy, extent, side))  # the box centre is not the centroid
    return coverage(kind, 2 * cx - tx, 2 * cy - ty, extent, side), extent


def _shape(pixels: np.ndarray, background_rgb: np.ndarray, labels: np.ndarray, index: int,
           background: str) -> tuple[float, float, Found]:
    """One region's centroid (x, y) and what it shows."""
    side = labels.shape[0]
    mask = labels == index
    offset = pixels - background_rgb
    # The shape's colour from its core, the pixels farthest from the background.
    distance = np.linalg.norm(offset[mask], axis=-1)
    tone = np.median(offset[mask][distance >= np.quantile(distance, 0.8)], axis=0)
    colour = _nearest(background_rgb + tone, exclude=background)
    # Coverage is measured towards the named colour: a small blurred shape's core never reaches it.
    tone = _RGB[_NAMES.index(colour)] - background_rgb
    near = ndimage.binary_dilation(mask, _BLOCK, iterations=2) & ((labels == 0) | mask)
    cover = np.clip(offset @ tone / (tone @ tone), 0.0, 1.0) * near
    if not cover.any():  # a smeared region (model output) may lean away from its nearest named colour
        cover = mask.astype(np.float32)
    area = float(cover.sum())
    cx, cy = _centroid(cover)
    scores = {}
    for kind in KINDS:
        template, extent = _template(kind, area, cx, cy, side)
        error = min(((cover - ndimage.gaussian_filter(template, blur)) ** 2).sum() for blur in BLURS)
        scores[kind] = (float(error), extent)
    kind = min(scores, key=lambda k: scores[k][0])
    size = "big" if scores[kind][1] > BIG_EXTENT * side else "small"
    row, col = (min(int(3 * c / side), 2) for c in (cy, cx))
    return cx, cy, Found(colour, kind, size, POSITIONS[3 * row + col])


def judge(pixels: np.ndarray) -> Verdict:
    """The verdict on uint8 (H, W, 3) pixels of a square image."""
    pixels = np.asarray(pixels, np.float32)
    side = pixels.shape[0]
    if pixels.shape != (side, side, 3):
        raise ValueError(f"expected square RGB pixels (side, side, 3), got {pixels.shape}")
    background_rgb = np.median(_border(pixels), axis=0)
    background = _nearest(background_rgb)
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    labels, n = ndimage.label(distance > FOREGROUND_DISTANCE, structure=_BLOCK)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, range(1, n + 1))
    found = [_shape(pixels, background_rgb, labels, i + 1, background)
             for i in range(n) if areas[i] >= MIN_AREA * side * side]
    found.sort(key=lambda item: (item[1], item[0]))
    return Verdict(background, tuple(f for _, _, f in found))


def check(verdict: Verdict, scene: Scene) -> Checks:
    """Compare a verdict with the scene it should show."""
    def same(get) -> bool:
        return sorted(map(get, verdict.shapes)) == sorted(map(get, scene.shapes))

    background = verdict.background == scene.background
    colour = background and same(lambda s: s.colour)
    words = same(lambda s: (s.colour, s.kind, s.size, s.position))
    return Checks(colour=colour, shape=same(lambda s: s.kind), count=len(verdict.shapes) == len(scene.shapes),
                  size=same(lambda s: s.size), position=same(lambda s: s.position), all=background and words)
