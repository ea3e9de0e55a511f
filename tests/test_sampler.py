"""The sampling loop with hand-computable fake models, the warpers, and the row order of guidance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_space import sampler
from dalle_space.engine import seed_keys

VOCAB = 8
LENGTH = 6


def _state(n, caches=()):
    return sampler.SamplingState(
        position=jnp.int32(0), tokens=jnp.full((n,), VOCAB - 1, jnp.int32), keys=jnp.asarray(seed_keys(range(n))),
        finished=jnp.zeros((n,), bool), sequences=jnp.full((n, LENGTH), -1, jnp.int32), caches=caches)


def _warping(scale=1.0, temperature=1.0, top_p=1.0):
    return sampler.Warping(jnp.float32(scale), jnp.float32(temperature), jnp.float32(top_p))


def _run(logits_fn, n, spec_kwargs=None, warping=None, eos=VOCAB - 1, pad=VOCAB - 1):
    spec = sampler.SamplerSpec(**{"n_prompts": 1, "n_seeds": n, "mode": "parallel", "top_k": 1,
                                  "use_top_p": False, **(spec_kwargs or {})})
    run = jax.jit(lambda s, w: sampler.sample_positions(s, logits_fn, spec, w, LENGTH, eos, pad))
    return np.asarray(run(_state(n), warping or _warping()).sequences)


def test_loop_feeds_back_the_sampled_token():
    """A fake model whose best next token is (input + 1) mod 7 walks 0, 1, 2, ... from the start token 7."""

    def logits_fn(tokens, position, caches):
        cond = jax.nn.one_hot((tokens + 1) % (VOCAB - 1), VOCAB)
        return cond, jnp.zeros_like(cond), caches

    np.testing.assert_array_equal(_run(logits_fn, 2), [[1, 2, 3, 4, 5, 6]] * 2)


def test_guidance_mixes_cond_and_uncond_with_the_scale():
    """cond favours token 1 a little, uncond favours token 2 strongly: scale 1 keeps cond's choice,
    scale 3 pushes away from uncond's token (uncond + 3 (cond - uncond) = 3 cond - 2 uncond)."""

    def logits_fn(tokens, position, caches):
        cond = jnp.zeros((tokens.shape[0], VOCAB)).at[:, 1].set(2.0).at[:, 2].set(1.9)
        uncond = jnp.zeros((tokens.shape[0], VOCAB)).at[:, 2].set(3.0).at[:, 3].set(2.0)
        return cond, uncond, caches

    assert (_run(logits_fn, 1, warping=_warping(scale=1.0)) == 1).all()
    assert (_run(logits_fn, 1, warping=_warping(scale=3.0)) == 1).all()
    assert (_run(logits_fn, 1, warping=_warping(scale=0.0)) == 2).all()


def test_scale_one_returns_cond_exactly():
    cond = jnp.asarray([0.1, 0.7, -3.3])
    uncond = jnp.asarray([0.3, -1e6, 2.0])
    assert (sampler.guide(cond, uncond, jnp.float32(1.0)) == cond).all()
    np.testing.assert_allclose(sampler.guide(cond, uncond, jnp.float32(2.0)), 2 * cond - uncond, rtol=1e-6)


def test_eos_ends_a_row_with_padding():
    """Row 0 hits eos (token 5 here) at its third step and emits pad (6) afterwards; row 1 never does."""

    def logits_fn(tokens, position, caches):
        row0 = jax.nn.one_hot(jnp.where(position == 2, 5, 1), VOCAB)
        cond = jnp.stack([row0, jax.nn.one_hot(3, VOCAB)])
        return cond, cond, caches

    np.testing.assert_array_equal(_run(logits_fn, 2, eos=5, pad=6), [[1, 1, 6, 6, 6, 6], [3, 3, 3, 3, 3, 3]])


def test_guidance_row_order_is_cond_then_uncond():
    cond, uncond = jnp.ones((2, 3)), jnp.zeros((2, 3))
    rows = sampler.stack_guidance_rows(cond, uncond)
    np.testing.assert_array_equal(rows[:2], cond)
    np.testing.assert_array_equal(rows[2:], uncond)
    back = sampler.split_guidance_rows(rows)
    np.testing.assert_array_equal(back[0], cond)
    np.testing.assert_array_equal(back[1], uncond)


def test_top_k_keeps_exactly_k():
    logits = jnp.asarray([[0.0, 5.0, 1.0, 3.0, 2.0], [4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = sampler.apply_top_k(logits, 2)
    np.testing.assert_array_equal(np.isfinite(kept), [[0, 1, 0, 1, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(kept[np.isfinite(kept)], [5.0, 3.0, 4.0, 3.0])
    assert np.isfinite(sampler.apply_top_k(logits, 99)).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probabilities = jnp.asarray([[0.5, 0.3, 0.15, 0.05]])
    logits = jnp.log(probabilities)
    np.testing.assert_array_equal(np.isfinite(sampler.apply_top_p(logits, 0.5)), [[1, 0, 0, 0]])
    np.testing.assert_array_equal(np.isfinite(sampler.apply_top_p(logits, 0.7)), [[1, 1, 0, 0]])
    np.testing.assert_array_equal(np.isfinite(sampler.apply_top_p(logits, 0.9)), [[1, 1, 1, 0]])
    np.testing.assert_array_equal(np.isfinite(sampler.apply_top_p(logits, 1.0)), [[1, 1, 1, 1]])
    np.testing.assert_array_equal(np.isfinite(sampler.apply_top_p(logits, 0.01)), [[1, 0, 0, 0]])


def test_temperature_sharpens_sampling():
    """At a very low temperature sampling becomes argmax; at a high one it spreads over the vocabulary."""

    def logits_fn(tokens, position, caches):
        cond = jnp.tile(jnp.arange(VOCAB, dtype=jnp.float32) * 0.1, (tokens.shape[0], 1))
        return cond, cond, caches

    spec = {"top_k": VOCAB}
    cold = _run(logits_fn, 16, spec, _warping(temperature=1e-3), eos=-1)
    hot = _run(logits_fn, 16, spec, _warping(temperature=100.0), eos=-1)
    assert (cold == VOCAB - 1).all()
    assert len(np.unique(hot)) >= 5


def test_each_image_key_is_split_like_upstream():
    """Image i's first draw uses split(PRNGKey(seed_i))[0], whatever the batch: the same logits give the
    same token for a seed alone and inside a batch."""

    def logits_fn(tokens, position, caches):
        cond = jnp.zeros((tokens.shape[0], VOCAB))
        return cond, cond, caches

    spec = {"top_k": VOCAB}
    batch = _run(logits_fn, 4, spec, eos=-1)
    first = jax.random.categorical(jax.random.split(jax.random.PRNGKey(2))[0], jnp.zeros((1, VOCAB)))
    assert batch[2, 0] == int(first[0])
    assert len({tuple(row) for row in batch}) == 4


def test_seed_keys_equal_prng_keys():
    seeds = [0, 1, 7, 2**31 - 1]
    np.testing.assert_array_equal(seed_keys(seeds), np.stack([jax.random.PRNGKey(s) for s in seeds]))


@pytest.mark.parametrize("mode, rows", [("parallel", [6]), ("serial", [3, 3]), ("conditional", [3])])
def test_caches_follow_the_mode(mode, rows):
    from dalle_space.config import DALLEBART_PRESETS

    config = DALLEBART_PRESETS["tiny"]
    caches = sampler.initial_caches(config, 3, mode, jnp.float32)
    assert [c.keys[0].shape[0] // config.decoder_attention_heads for c in caches] == rows


def test_only_scale_one_picks_the_conditional_sampler():
    assert sampler.sampler_mode("serial", 1.0) == sampler.sampler_mode("parallel", 1.0) == "conditional"
    assert [sampler.sampler_mode(m, s) for m in sampler.MODES for s in (0.0, 0.999, 3.0)] == \
        ["parallel"] * 3 + ["serial"] * 3
