"""Training data: seeded captioned scenes, rendered once and held in memory (a few MB at 64 x 64)."""

from __future__ import annotations

import dataclasses

import numpy as np

from dalle_space import scenes


@dataclasses.dataclass(frozen=True)
class SceneSet:
    images: np.ndarray  # uint8 (N, side, side, 3)
    captions: tuple[str, ...]
    scenes: tuple[scenes.Scene, ...]


def make_scenes(seed: int, n: int, resolution: int, held_out: bool = False) -> SceneSet:
    """n scenes, their captions and pixels, the same for a seed; training sets never hold a HELD_OUT pair."""
    rng = np.random.default_rng(seed)
    drawn, captions = [], []
    for _ in range(n):
        scene = scenes.sample_scene(rng, held_out=held_out)
        drawn.append(scene)
        captions.append(scenes.caption(scene, rng))
    images = np.stack([scenes.render(scene, resolution) for scene in drawn])
    return SceneSet(images, tuple(captions), tuple(drawn))


def recaption(scene_set: SceneSet, seed: int, rounds: int, unsaid_defaults: float = 0.0) -> tuple[str, ...]:
    """``rounds`` more captions of every scene, round after round, from a stream of their own seed: the same
    pictures said in other templates, orders and phrases, so the DalleBart reads a new wording of a scene on
    most visits instead of memorising one; ``unsaid_defaults`` as in scenes.caption."""
    rng = np.random.default_rng([seed, 1])
    return tuple(scenes.caption(scene, rng, unsaid_defaults) for _ in range(rounds) for scene in scene_set.scenes)


def flat_colours(images: np.ndarray, cell: int) -> np.ndarray:
    """int (N, cells) index into scenes.COLOURS of each cell x cell block whose pixels all have that one
    colour, -1 for the others (a shape's edge); blocks in row-major order, the order of a VQGAN's codes when
    ``cell`` is its downsampling factor."""
    n, side = len(images), images.shape[1] // cell
    blocks = images.reshape(n, side, cell, side, cell, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, side * side, -1, 3)
    out = np.full((n, side * side), -1)
    for index, rgb in enumerate(scenes.COLOURS.values()):
        out[(blocks == np.array(rgb, images.dtype)).all((2, 3))] = index
    return out


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 pixels as float32 in [0, 1], the range the VQGAN reads and writes."""
    return images.astype(np.float32) / 255.0
