"""The bundled ``tiny`` model as the package ships it: its folders load through the loader every checkpoint goes
through and are what the presets say, and what the page tells people about it is in its scenes' vocabulary."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dalle_space import bundled, checkpoints, judge, scenes, text
from dalle_space.config import DALLEBART_PRESETS, VQGAN_PRESETS


def test_shipped_folders_load_through_the_loader_and_are_the_presets():
    assert checkpoints.locate_dallebart("tiny") == (bundled.DALLEBART, "bundled")
    assert checkpoints.locate_vqgan("tiny") == (bundled.VQGAN, "bundled")
    tokenizer = checkpoints.load_tokenizer(bundled.DALLEBART)
    config, params = checkpoints.load_dallebart("tiny")  # checks every parameter's path and shape
    vqgan_config, _ = checkpoints.load_vqgan("tiny")
    assert config == DALLEBART_PRESETS["tiny"] and vqgan_config == VQGAN_PRESETS["tiny"]
    checkpoints.check_pair(config, vqgan_config, bundled.VQGAN)
    assert len(tokenizer) == config.encoder_vocab_size
    assert config.image_length == vqgan_config.grid_side**2 and vqgan_config.resolution == 64
    assert params["lm_head"]["weight"].shape == (config.decoder_vocab_size, config.d_model)


@pytest.fixture(scope="module")
def captions() -> list[str]:
    """Full training captions (every size and place said, the longest kind) of enough seeded scenes to say
    every word."""
    rng = np.random.default_rng(0)
    return [scenes.caption(scenes.sample_scene(rng), rng) for _ in range(3000)]


@pytest.fixture(scope="module")
def caption_words(captions) -> set[str]:
    """Every word the training captions use."""
    return set(re.findall(r"[a-z]+", " ".join(captions)))


def test_its_tokenizer_reads_every_caption_word_whole_and_every_caption_fits(captions, caption_words):
    """Trained on the training captions too (training/train.py), the tokenizer gives each scene word one token, so
    the longest caption fits the preset's 40; the general corpus alone cut "square" in three and needed 57."""
    tokenizer = checkpoints.load_tokenizer(bundled.DALLEBART)
    pieces = {word: len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) for word in caption_words}
    assert {word for word, n in pieces.items() if n > 1} == set()
    assert not any(text.encode_prompts(tokenizer, captions, DALLEBART_PRESETS["tiny"].max_text_length, None).truncated)


@pytest.mark.parametrize("prompt", bundled.PROMPTS)
def test_prompts_say_only_what_the_model_was_trained_on(prompt, caption_words):
    assert set(re.findall(r"[a-z]+", prompt)) <= caption_words
    plural = {kind + "s": kind for kind in scenes.KINDS}
    pairs = re.findall(rf"({'|'.join(scenes.COLOURS)}) ({'|'.join([*scenes.KINDS, *plural])})\b", prompt)
    assert pairs and not {(colour, plural.get(kind, kind)) for colour, kind in pairs} & scenes.HELD_OUT


def test_what_it_draws_is_the_scenes_vocabulary():
    assert scenes.COUNT_WORDS[scenes.MAX_SHAPES - 1] == "three" and "one to three " in bundled.DRAWS
    assert len(scenes.COLOURS) == 8 and " eight colours " in bundled.DRAWS
    assert all(re.search(rf"\b{kind}s\b", bundled.DRAWS) for kind in scenes.KINDS)


def _share_nearest(pixels: np.ndarray, colour: str) -> float:
    """Share of the pixels whose nearest named colour is ``colour``."""
    names = list(scenes.COLOURS)
    table = np.array(list(scenes.COLOURS.values()), np.float32)
    nearest = np.argmin(np.linalg.norm(pixels.reshape(-1, 1, 3).astype(np.float32) - table, axis=-1), axis=-1)
    return float(np.mean(nearest == names.index(colour)))


def test_the_issues_prompt_at_a_fixed_seed_has_a_blue_border_and_a_red_centre(tiny):
    """What the bundled model is for, at the app's default scale: the issue's terse prompt, as people type one,
    read the way its training captions leave details out (scenes.DEFAULT_SIZE, DEFAULT_POSITION)."""
    image = np.asarray(tiny.generate(["a red square on a blue background"], seed=0).images[0])
    border = np.concatenate([image[:4].reshape(-1, 3), image[-4:].reshape(-1, 3),
                             image[:, :4].reshape(-1, 3), image[:, -4:].reshape(-1, 3)])
    side = image.shape[0]
    centre = image[side * 3 // 8:side * 5 // 8, side * 3 // 8:side * 5 // 8]
    assert _share_nearest(border, "blue") >= 0.8
    assert _share_nearest(centre, "red") >= 0.6


# Terse prompts of every shape kind, and the background said first, as people type them.
TERSE = (("a red square on a blue background", "blue", "red", "square"),
         ("on a blue background, a red square", "blue", "red", "square"),
         ("a green circle on a white background", "white", "green", "circle"),
         ("a blue circle on an orange background", "orange", "blue", "circle"),
         ("an orange triangle on a purple background", "purple", "orange", "triangle"),
         ("a yellow star on a black background", "black", "yellow", "star"))


def test_terse_prompts_are_mostly_drawn_as_asked(tiny):
    """Eight seeds of each terse prompt at the app's default scale, judged from the pixels: the asked background
    and exactly one shape of the asked colour and kind, big and in the centre, in at least two images of three.
    One seed per prompt would hold a retrained model to the luck of that seed; the count is what people see."""
    counts = {}
    for prompt, background, colour, kind in TERSE:
        asked = scenes.Scene(background, (scenes.Shape(colour, kind, scenes.DEFAULT_SIZE, scenes.DEFAULT_POSITION),))
        images = tiny.generate([prompt], n_seeds=8, seed=0).images
        counts[prompt] = sum(judge.check(judge.judge(np.asarray(image)), asked).all for image in images)
    assert sum(counts.values()) >= 2 / 3 * 8 * len(TERSE), counts


def test_it_samples_at_its_own_top_k_unless_asked_otherwise(tiny):
    """Its config.json keeps 3 codes at each position (top-k 3 drew colours right in 88% of seen-pair pictures
    against 78% at 50); ``generate`` without a top-k samples so, and the app's warmup compiled that sampler."""
    assert tiny.config.top_k == 3
    before = tiny.cache_info()
    tiny.generate(["a red square on a blue background"], seed=1)
    assert tiny.cache_info().misses == before.misses  # the app's default request finds its sampler compiled
    unguided = [tiny.generate(["a red square on a blue background"], condition_scale=1.0, seed=1, top_k=top_k).tokens
                for top_k in (None, 3, 50)]  # unguided, so the codes past the third are likely enough to be drawn
    np.testing.assert_array_equal(unguided[0], unguided[1])
    assert not np.array_equal(unguided[0], unguided[2])
