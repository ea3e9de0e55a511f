"""The engine end to end on the upstream fixture model: golden tokens, serial = parallel, batching
invariance, the compiled-sampler cache, argument checks, progress and full generate()."""

import math
from pathlib import Path

import numpy as np
import pytest

from dalle_space import text
from dalle_space.engine import PROGRESS_CHUNKS, seed_keys

FIXTURE = Path(__file__).parent / "fixtures" / "dallebart-tiny"


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIXTURE / "expected.npz"))


@pytest.mark.parametrize("mode", ["parallel", "serial"])
@pytest.mark.parametrize("seed", [0, 1])
def test_one_image_equals_upstream_sample(engine, expected, mode, seed):
    tokens = engine.sample_tokens(expected["input_ids"][:1], expected["attention_mask"][:1], seed_keys([seed]),
                                  condition_scale=3.0, mode=mode, top_k=50)
    np.testing.assert_array_equal(tokens[0], expected[f"sample_k50_cs3_seed{seed}"][0, 1:])


@pytest.mark.parametrize("mode", ["parallel", "serial"])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_greedy_equals_upstream_for_every_prompt(engine, expected, mode, scale):
    tokens = engine.sample_tokens(expected["input_ids"], expected["attention_mask"], seed_keys([0, 0, 0]),
                                  condition_scale=scale, mode=mode, top_k=1)
    np.testing.assert_array_equal(tokens, expected[f"greedy_cs{scale:.0f}"][:, 1:])


@pytest.mark.parametrize("n_prompts, n_seeds", [(1, 1), (1, 4), (3, 2)])
def test_parallel_and_serial_give_identical_tokens(engine, expected, n_prompts, n_seeds):
    args = (expected["input_ids"][:n_prompts], expected["attention_mask"][:n_prompts],
            seed_keys(range(10, 10 + n_prompts * n_seeds)))
    parallel = engine.sample_tokens(*args, condition_scale=4.0, mode="parallel", top_k=50, top_p=0.9)
    serial = engine.sample_tokens(*args, condition_scale=4.0, mode="serial", top_k=50, top_p=0.9)
    assert parallel.shape == (n_prompts * n_seeds, 256)
    np.testing.assert_array_equal(parallel, serial)


def test_an_image_does_not_change_with_the_batch(engine, expected):
    ids, mask = expected["input_ids"][1:2], expected["attention_mask"][1:2]
    batch = engine.sample_tokens(ids, mask, seed_keys(range(100, 108)), condition_scale=3.0)
    for i in (0, 5):
        alone = engine.sample_tokens(ids, mask, seed_keys([100 + i]), condition_scale=3.0)
        np.testing.assert_array_equal(alone[0], batch[i])
    assert len({tuple(row) for row in batch}) == 8


def test_traced_settings_never_recompile_and_a_new_shape_compiles_once(engine, expected):
    ids, mask = expected["input_ids"][:2], expected["attention_mask"][:2]
    engine.sample_tokens(ids, mask, seed_keys(range(2)), condition_scale=3.0)
    misses = engine.cache_info().misses
    for scale, temperature, top_p in [(2.0, 1.0, None), (7.5, 0.5, None), (0.0, 2.0, None)]:
        engine.sample_tokens(ids, mask, seed_keys([5, 6]), condition_scale=scale, temperature=temperature, top_p=top_p)
    assert engine.cache_info().misses == misses
    engine.sample_tokens(ids, mask, seed_keys([5, 6]), condition_scale=3.0, top_p=0.3)  # top-p on: new sampler
    engine.sample_tokens(ids, mask, seed_keys([5, 6]), condition_scale=9.0, top_p=0.8)
    assert engine.cache_info().misses == misses + 1
    engine.sample_tokens(ids[:1], mask[:1], seed_keys(range(3)), condition_scale=3.0)  # new shape
    after_new_shape = engine.cache_info()
    assert after_new_shape.misses == misses + 3  # prepare + advance
    engine.sample_tokens(ids[:1], mask[:1], seed_keys(range(3, 6)), condition_scale=5.0)
    assert engine.cache_info().misses == after_new_shape.misses
    assert engine.cache_info().hits > after_new_shape.hits


def _guided_tokens(engine, input_ids, attention_mask, keys, mode, **warping):
    """Tokens of a *guided* sampler run whatever the scale: the engine itself sends scale 1 to the
    conditional sampler, so the guided one is driven through the sampler module directly."""
    import jax
    import jax.numpy as jnp

    from dalle_space import sampler

    config = engine.config
    spec = sampler.SamplerSpec(input_ids.shape[0], keys.shape[0] // input_ids.shape[0], mode, 50, False)
    uncond = text.unconditional_ids(engine.tokenizer, config.max_text_length)
    state, contexts = jax.jit(sampler.prepare, static_argnums=(0, 7))(
        config, engine.params, jnp.asarray(input_ids), jnp.asarray(attention_mask), *map(jnp.asarray, uncond),
        jnp.asarray(keys), mode)
    advance = jax.jit(sampler.advance, static_argnums=(0, 5, 6))
    state = advance(config, engine.params, state, contexts, sampler.Warping(**warping), spec, config.image_length)
    return np.asarray(state.sequences)


@pytest.mark.parametrize("mode", ["parallel", "serial"])
def test_scale_one_runs_the_conditional_sampler_with_the_guided_tokens(engine, expected, mode):
    """At scale 1 the engine skips the unconditional rows; its tokens are the guided sampler's at scale 1."""
    import jax.numpy as jnp

    ids, mask, keys = expected["input_ids"][:2], expected["attention_mask"][:2], seed_keys([3, 4, 5, 6])
    fast = engine.sample_tokens(ids, mask, keys, condition_scale=1.0, mode=mode, top_k=50)
    guided = _guided_tokens(engine, ids, mask, keys, mode, condition_scale=jnp.float32(1.0),
                            temperature=jnp.float32(1.0), top_p=jnp.float32(1.0))
    np.testing.assert_array_equal(fast, guided)
    scaled = engine.sample_tokens(ids, mask, keys, condition_scale=3.0, mode=mode, top_k=50)
    assert (fast != scaled).any()  # the scale does reach the guided sampler


def test_scale_one_compiles_one_sampler_and_never_again(engine, expected):
    ids, mask = expected["input_ids"][:1], expected["attention_mask"][:1]
    engine.sample_tokens(ids, mask, seed_keys([7, 8]), condition_scale=3.0)
    before = engine.cache_info().misses
    engine.sample_tokens(ids, mask, seed_keys([7, 8]), condition_scale=1.0)
    assert engine.cache_info().misses - before <= 2  # one sampler: its prepare and advance functions
    after_one = engine.cache_info().misses
    for scale, mode in [(3.0, "parallel"), (1.0, "serial"), (5.0, "parallel"), (1.0, "parallel")]:
        engine.sample_tokens(ids, mask, seed_keys([7, 8]), condition_scale=scale, mode=mode)
    assert engine.cache_info().misses == after_one


def test_scale_one_result_names_the_conditional_sampler(tiny):
    assert tiny.generate(["a red bicycle"], condition_scale=1.0, mode="serial", seed=2).mode == "conditional"
    assert tiny.generate(["a red bicycle"], condition_scale=3.0, mode="serial", seed=2).mode == "serial"


BAD_SETTINGS = [
    (dict(condition_scale=math.nan), "condition scale must be a finite number"),
    (dict(condition_scale=-1.0), "condition scale must be a finite number of at least 0"),
    (dict(top_k=0), "top-k must be a whole number of at least 1"),
    (dict(top_p=0.0), "top-p must be greater than 0 and at most 1"),
    (dict(top_p=1.5), "top-p must be greater than 0 and at most 1"),
    (dict(temperature=0.0), "temperature must be a number greater than 0"),
    (dict(mode="sideways"), "mode must be one of parallel, serial"),
]


@pytest.mark.parametrize("kwargs, message", BAD_SETTINGS)
def test_bad_sampling_arguments_raise_one_clear_error(engine, expected, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.sample_tokens(expected["input_ids"][:1], expected["attention_mask"][:1], seed_keys([0]), **kwargs)


def test_image_counts_are_checked(engine, expected):
    ids, mask = expected["input_ids"][:1], expected["attention_mask"][:1]
    with pytest.raises(ValueError, match="Ask for at least one image"):
        engine.sample_tokens(ids, mask, np.zeros((0, 2), np.uint32))
    with pytest.raises(ValueError, match="At most 8 images fit in one request; 9 were asked for"):
        engine.sample_tokens(ids, mask, seed_keys(range(9)))
    with pytest.raises(ValueError, match="3 keys cannot be shared evenly by 2 prompts"):
        engine.sample_tokens(expected["input_ids"][:2], expected["attention_mask"][:2], seed_keys(range(3)))


def test_generate_returns_images_seeds_and_timings(tiny):
    result = tiny.generate(["a red bicycle", "an avocado armchair"], n_seeds=2, condition_scale=3.0, seed=40)
    assert result.images.shape == (4, 64, 64, 3) and result.images.dtype == np.uint8
    assert result.tokens.shape == (4, 256)
    assert result.seeds == (40, 41, 40, 41)
    assert result.prompt_index == (0, 0, 1, 1)
    assert result.prompts == ("a red bicycle",) * 2 + ("an avocado armchair",) * 2
    assert set(result.timings.as_dict()) == {"tokenize_s", "encode_s", "sample_s", "vqgan_s", "compile_s",
                                             "total_s", "per_image_s", "compiled"}
    alone = tiny.generate(["an avocado armchair"], n_seeds=1, condition_scale=3.0, seed=41)
    np.testing.assert_array_equal(alone.tokens[0], result.tokens[3])
    # The VQGAN's convolutions round differently by batch size: pixels may differ by one level.
    assert np.abs(alone.images[0].astype(int) - result.images[3]).max() <= 1


def test_warm_shape_does_not_compile(tiny):
    result = tiny.generate(["a lighthouse at dusk"], condition_scale=10.0, seed=3)
    assert result.timings.compiled is False and result.timings.compile_s == 0.0


def test_long_prompt_is_truncated_with_a_notice(tiny):
    result = tiny.generate(["a very long prompt " * 60], seed=1)
    assert result.notices == ("Prompt 1 was longer than 40 tokens and was cut short.",)


def test_progress_reports_every_chunk_with_previews(tiny):
    calls = []
    tiny.generate(["a small boat"], progress=lambda done, total, images: calls.append((done, total, images)),
                  preview=True)
    assert [c[0] for c in calls] == [256 * (i + 1) // PROGRESS_CHUNKS for i in range(PROGRESS_CHUNKS)]
    assert all(c[1] == 256 for c in calls)
    assert calls[0][2].shape == (1, 64, 64, 3) and calls[0][2].dtype == np.uint8


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([], {}, "Every prompt needs some text"),
    (["ok", "  "], {}, "Every prompt needs some text"),
    (["ok"], dict(seed=-1), "seed must be a whole number from 0"),
    (["ok"], dict(n_seeds=0), "Ask for at least one image"),
])
def test_generate_argument_errors(tiny, prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny.generate(prompts, **kwargs)


@pytest.mark.parametrize("device_node, smi, warned", [(True, None, True), (False, "/usr/bin/nvidia-smi", True),
                                                       (False, None, False)])
def test_an_nvidia_gpu_unused_by_jax_is_named(monkeypatch, device_node, smi, warned):
    from dalle_space import engine as engine_module

    monkeypatch.setattr(engine_module.os.path, "exists", lambda path: device_node and path == "/dev/nvidia0")
    monkeypatch.setattr(engine_module.shutil, "which", lambda name: smi if name == "nvidia-smi" else None)
    notice = engine_module.unused_gpu_notice()
    assert (notice is not None) == warned
    if warned:
        assert "NVIDIA GPU but JAX samples on the CPU" in notice and "jax[cuda12]==0.10.2" in notice
