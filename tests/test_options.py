"""Every sampling option a user can set changes what it should, through the Engine on the bundled tiny
model with random DalleBart weights (conftest's ``untrained_tiny``, whose near-uniform steps every option
moves): top-k, top-p, temperature, condition scale, seed, images per prompt, sampler mode and previews.

Each distinct request is made once per module (``run`` memoises it) and shared by the tests that need it,
so the module compiles only a handful of samplers. Scale 1 is avoided: it runs its own sampler.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from dalle_space import sampler
from dalle_space.engine import PROGRESS_CHUNKS, Engine

PROMPT = "a red bicycle"
OTHER = "a lighthouse at night"
BASE = dict(condition_scale=3.0, seed=1, top_k=50)  # no top-p, temperature 1, parallel


@pytest.fixture(scope="module")
def tiny(untrained_tiny):
    return Engine.from_pretrained(untrained_tiny)


@pytest.fixture(scope="module")
def run(tiny):
    """``run(*prompts, **changes)``: the Result of ``generate`` with BASE changed by ``changes``."""

    @functools.cache
    def generate(prompts, settings):
        return tiny.generate(list(prompts), **dict(settings))

    def run(*prompts, **changes):
        return generate(prompts or (PROMPT,), tuple(sorted({**BASE, **changes}.items())))

    return run


def different(a, b) -> int:
    """How many image tokens differ between two results."""
    return int((a.tokens != b.tokens).sum())


def test_top_k_one_is_greedy_whatever_the_seed(run):
    np.testing.assert_array_equal(run(top_k=1, seed=1).tokens, run(top_k=1, seed=2).tokens)
    assert different(run(top_k=1), run()) > 0


def test_a_smaller_top_k_changes_the_tokens(run):
    assert different(run(top_k=5), run()) > 0


def test_top_p_changes_the_tokens_and_one_keeps_every_token(run):
    assert different(run(top_p=0.3), run()) > 0
    np.testing.assert_array_equal(run(top_p=1.0).tokens, run().tokens)


def test_temperature_changes_the_tokens_and_a_cold_one_is_greedy(run):
    assert different(run(temperature=0.5), run()) > 0
    for seed in (1, 2):
        np.testing.assert_array_equal(run(temperature=1e-6, seed=seed).tokens, run(top_k=1).tokens)


def test_condition_scale_changes_the_tokens(run):
    assert different(run(condition_scale=2.0), run(condition_scale=10.0)) > 0


def test_scale_zero_keeps_only_the_unconditional_logits(run):
    """uncond + 0 * (cond - uncond) is the empty prompt's logits: every prompt draws the same image, which
    a guided scale does not. Catches swapped guidance rows and a prompt that never reaches the decoder."""
    np.testing.assert_array_equal(run(PROMPT, condition_scale=0.0).tokens, run(OTHER, condition_scale=0.0).tokens)
    assert different(run(PROMPT, condition_scale=10.0), run(OTHER, condition_scale=10.0)) > 0


def test_warpers_apply_in_upstream_order():
    """Temperature, then top-k, then top-p over what top-k kept (transformers' order, which upstream uses)."""
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]]))

    def kept(top_k, temperature, top_p):
        spec = sampler.SamplerSpec(1, 1, "parallel", top_k, True)
        warped = sampler.warp(logits, spec, sampler.Warping(jnp.float32(1), jnp.float32(temperature),
                                                            jnp.float32(top_p)))
        return np.isfinite(np.asarray(warped[0])), np.asarray(warped[0])

    # Temperature 0.5 sharpens 0.4 to 0.53 before top-p 0.5 looks: only the first token stays (not two).
    mask, values = kept(top_k=4, temperature=0.5, top_p=0.5)
    np.testing.assert_array_equal(mask, [True, False, False, False])
    np.testing.assert_allclose(values[0], np.log(0.4) / 0.5, rtol=1e-6)
    # After top-k 2 the first token holds 0.57 of the mass, enough for top-p 0.55 alone.
    np.testing.assert_array_equal(kept(top_k=2, temperature=1.0, top_p=0.55)[0], [True, False, False, False])


def test_different_seeds_draw_different_images(run):
    # Independent draws from the tiny model's near-uniform 256 codes agree at a few positions at most.
    assert different(run(seed=1), run(seed=2)) > 200


@pytest.fixture(scope="module")
def batch(run):
    """Two prompts, three images each, from seed 10."""
    return run(PROMPT, OTHER, n_seeds=3, seed=10)


def test_images_per_prompt_shape_and_seeds(batch):
    assert batch.images.shape == (6, 64, 64, 3) and batch.images.dtype == np.uint8
    assert batch.tokens.shape == (6, 256) and batch.tokens.dtype == np.int32
    assert batch.seeds == (10, 11, 12, 10, 11, 12)
    assert batch.prompt_index == (0, 0, 0, 1, 1, 1)
    assert batch.prompts == (PROMPT,) * 3 + (OTHER,) * 3
    assert len({row.tobytes() for row in batch.tokens}) == 6


@pytest.mark.parametrize("index", [2, 4])
def test_the_reported_seed_reproduces_an_image_alone(run, batch, index):
    alone = run(batch.prompts[index], seed=batch.seeds[index])
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[index])
    # The VQGAN's convolutions round differently by batch size: pixels may differ by one level.
    assert np.abs(alone.images[0].astype(int) - batch.images[index]).max() <= 1


def test_serial_draws_the_parallel_images_with_its_own_sampler(run, batch):
    serial = run(PROMPT, OTHER, n_seeds=3, seed=10, mode="serial")
    np.testing.assert_array_equal(serial.tokens, batch.tokens)
    assert (batch.mode, serial.mode) == ("parallel", "serial")
    assert serial.timings.compiled is True  # a sampler of its own, not the warm parallel one


@pytest.mark.parametrize("preview", [False, True])
def test_progress_gets_previews_only_when_asked(tiny, run, preview):
    calls = []
    result = tiny.generate([PROMPT], **BASE, preview=preview,
                           progress=lambda done, total, images: calls.append((done, total, images)))
    np.testing.assert_array_equal(result.tokens, run().tokens)
    assert [(done, total) for done, total, _ in calls] == [
        (256 * (i + 1) // PROGRESS_CHUNKS, 256) for i in range(PROGRESS_CHUNKS)]
    if not preview:
        assert all(images is None for *_, images in calls)
        return
    assert all(images.shape == (1, 64, 64, 3) and images.dtype == np.uint8 for *_, images in calls)
    np.testing.assert_array_equal(calls[-1][2], result.images)  # the last preview is the finished image
    assert not np.array_equal(calls[0][2], result.images)
