"""The bundled ``tiny`` model: a DalleBart and a VQGAN trained on the synthetic scenes of ``scenes.py``
(training/), shipped inside the package in the hub's folder format, so that it works offline and loads through
the same code as the real models.

It knows only the words of its scenes' captions, so the page offers prompts in them and says what it draws.
Shipping another training run is a copy of its two folders over these, then ``--only more`` of
tests/fixtures/make_upstream_fixtures.py, whose text rows are sampled from this model.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).parent / "models" / "tiny"
DALLEBART = FOLDER / "dallebart"  # config.json, flax_model.msgpack and tokenizer files
VQGAN = FOLDER / "vqgan"  # config.json and flax_model.msgpack

# Captions as the scenes are captioned (size, colour, shape, position, background), of colour-shape pairs
# seen in training; the first two leave out what it reads as big and in the centre (scenes.DEFAULT_SIZE,
# DEFAULT_POSITION), as people type them.
PROMPTS: tuple[str, ...] = (
    "a red square on a blue background",
    "a blue circle on an orange background",
    "a small orange triangle at the bottom on a purple background",
    "a big green circle in the top right, black background",
)

# What it draws, said after "it draws" (one sentence on the page; tests hold it to scenes.py's vocabulary).
DRAWS = "one to three circles, squares, triangles or stars in eight colours on a plain background"
