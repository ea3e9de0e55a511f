"""bfloat16 and float16 (``DALLE_DTYPE``) end to end: an engine in half precision generates through the
KV-cached step and the sampler, and its cached decoder step stays close to upstream's float32 logits."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dalle_space import bundled, checkpoints, dallebart, sampler
from dalle_space.engine import Engine, seed_keys

FIXTURE = Path(__file__).parent / "fixtures" / "dallebart-tiny"

# Cached decoder step over all 256 positions of the fixture against upstream's float32 logits (|logit| up
# to 0.70). Measured: bfloat16 max 0.0053, mean 0.00077; float16 max 0.00068, mean 0.00010 (float32: max
# 3e-7). Bounds are those figures with under 3x headroom.
STEP_ERROR_BOUNDS = {"bfloat16": (0.015, 0.002), "float16": (0.002, 0.0003)}


@pytest.mark.parametrize("dtype, mode", [("bfloat16", "parallel"), ("float16", "serial")])
def test_a_half_precision_engine_generates(dtype, mode):
    """Both guided cache layouts, one per dtype: a cache of another dtype than the model's makes every
    request fail. (Scale 1's unguided cache: test_kv_cache_dtype_follows_the_compute_dtype.)"""
    engine = Engine.from_pretrained("tiny", dtype=dtype)
    assert engine.info.dtype == dtype
    assert dallebart.compute_dtype(engine.params) == jnp.dtype(dtype)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(engine.vqgan_params)} == {jnp.dtype(dtype)}
    # Prompts it was trained on: an unknown one gets a plain picture, one code everywhere, whatever the seed.
    result = engine.generate(list(bundled.PROMPTS[:2]), n_seeds=2, condition_scale=10.0, mode=mode, seed=5)
    assert result.images.shape == (4, 64, 64, 3) and result.images.dtype == np.uint8
    assert result.tokens.shape == (4, 256) and result.tokens.dtype == np.int32
    assert ((result.tokens >= 0) & (result.tokens <= engine.config.pad_token_id)).all()
    assert len({row.tobytes() for row in result.tokens}) == 4


@pytest.mark.parametrize("mode", [*sampler.MODES, "conditional"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_kv_cache_dtype_follows_the_compute_dtype(dtype, mode):
    config, params = checkpoints.load_dallebart(FIXTURE, dtype=dtype)
    ids = jnp.zeros((1, config.max_text_length), jnp.int32)
    state, contexts = jax.eval_shape(
        lambda p, i, k: sampler.prepare(config, p, i, i, i, i, k, mode), params, ids, jnp.asarray(seed_keys([0, 1])))
    caches = jax.tree_util.tree_leaves(state.caches)
    assert caches and {leaf.dtype for leaf in caches} == {jnp.dtype(dtype)}
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(contexts)} == {jnp.dtype(dtype)}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cached_step_in_half_precision_is_close_to_float32(dtype):
    expected = np.load(FIXTURE / "expected.npz")
    config, params = checkpoints.load_dallebart(FIXTURE, dtype=dtype)

    @jax.jit
    def all_positions(params, states, mask, inputs):
        context = dallebart.cross_context(config, params, states, mask)

        def step(cache, position):
            logits, cache = dallebart.decoder_step(config, params, inputs[:, position], position, cache, context)
            return cache, logits

        cache = dallebart.KVCache.zeros(config, inputs.shape[0], dallebart.compute_dtype(params))
        _, logits = lax.scan(step, cache, jnp.arange(config.image_length))
        return jnp.moveaxis(logits, 0, 1)

    logits = all_positions(params, expected["encoder_last_hidden_state"], expected["attention_mask"],
                           expected["decoder_input_ids"])
    assert logits.dtype == jnp.dtype(dtype)
    error = np.abs(np.asarray(logits, np.float32) - expected["decoder_logits"])
    max_bound, mean_bound = STEP_ERROR_BOUNDS[dtype]
    assert error.max() < max_bound and error.mean() < mean_bound, (error.max(), error.mean())
