"""What the README says, each statement checked: decoder calls per step, work done once per batch and per
prompt, the bounded LRU of compiled samplers, the persistent compilation cache, the ``compiled`` flag and the
``DALLE_MODEL`` values the loader accepts. Rows spread over devices: test_multidevice.py."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_space import bundled, checkpoints, dallebart, sampler
from dalle_space.config import DALLEBART_PRESETS
from dalle_space.engine import CompiledCache, Engine, seed_keys

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "dallebart-tiny"


@pytest.fixture(scope="module")
def model():
    return checkpoints.load_dallebart(FIXTURE)


def _counting(monkeypatch, name: str, rows_of) -> list[int]:
    """Replace ``dallebart.<name>`` by a wrapper that records the rows of every call while tracing."""
    calls: list[int] = []
    real = getattr(dallebart, name)

    def counted(*args):
        calls.append(rows_of(*args))
        return real(*args)

    monkeypatch.setattr(dallebart, name, counted)
    return calls


def _prepare(model, mode: str, n_prompts: int, n_seeds: int):
    """(state, contexts) of sampler.prepare, traced only (shapes, no computation)."""
    config, params = model
    ids = jnp.zeros((n_prompts, config.max_text_length), jnp.int32)
    empty = jnp.zeros((1, config.max_text_length), jnp.int32)
    keys = jnp.asarray(seed_keys(range(n_prompts * n_seeds)))
    return jax.eval_shape(lambda p: sampler.prepare(config, p, ids, ids, empty, empty, keys, mode), params)


@pytest.mark.parametrize("mode, rows_per_call", [("parallel", [2 * 6]), ("serial", [6, 6]), ("conditional", [6])])
def test_decoder_calls_per_step(monkeypatch, model, mode, rows_per_call):
    """Parallel: one decoder call per step on the cond and uncond rows together; serial: two, of N rows;
    condition scale 1 (unguided): one, on the N conditioned rows. ``lax.scan`` traces the step once, so the
    calls recorded are those of one step."""
    config, params = model
    state, contexts = _prepare(model, mode, n_prompts=2, n_seeds=3)
    steps = _counting(monkeypatch, "decoder_step", lambda config, params, tokens, *_: tokens.shape[0])
    contexts_in_loop = _counting(monkeypatch, "cross_context", lambda config, params, states, mask: states.shape[0])
    spec = sampler.SamplerSpec(2, 3, mode, 50, False)
    warping = sampler.Warping(jnp.float32(3), jnp.float32(1), jnp.float32(1))
    jax.eval_shape(lambda p, s, c: sampler.advance(config, p, s, c, warping, spec, 4), params, state, contexts)
    assert steps == rows_per_call
    assert contexts_in_loop == []  # cross-attention keys / values are never recomputed per position


@pytest.mark.parametrize("mode, rows, context_prompts", [
    ("parallel", [2, 1], [2 + 2]), ("serial", [2, 1], [2, 1]), ("conditional", [2], [2])])
def test_empty_prompt_encoded_once_and_cross_context_once_per_prompt(monkeypatch, model, mode, rows,
                                                                      context_prompts):
    """Two prompts with three images each: the encoder sees the 2 prompts and the empty one once (not per
    image; not at all unguided), cross-attention keys / values are projected for those rows only, and the
    decoder's contexts hold one entry per prompt (parallel repeats the empty prompt's, not recomputing it)."""
    encoded = _counting(monkeypatch, "encode", lambda config, params, ids, mask: ids.shape[0])
    projected = _counting(monkeypatch, "cross_context", lambda config, params, states, mask: states.shape[0])
    state, contexts = _prepare(model, mode, n_prompts=2, n_seeds=3)
    assert encoded == rows
    assert projected == rows
    assert [context.num_prompts for context in contexts] == context_prompts
    assert state.tokens.shape == (6,)


def test_lru_evicts_the_least_recently_used_at_the_bound():
    cache = CompiledCache(max_entries=2)
    double = jax.jit(lambda x: 2 * x)
    x = jnp.ones(3)
    for key in ("a", "b", "a", "c"):  # "a" used again before "c" arrives: "b" is the oldest
        cache.get(key, double, x)
    assert cache.info().entries == 2 and cache.info().misses == 3 and cache.info().hits == 1
    compiled, seconds = cache.get("a", double, x)
    assert seconds == 0.0 and cache.info().hits == 2
    np.testing.assert_array_equal(compiled(x), 2 * x)
    _, seconds = cache.get("b", double, x)
    assert seconds > 0 and cache.info().misses == 4  # evicted, so compiled again
    assert cache.info().entries == 2


PERSISTENT_CACHE_SCRIPT = """
import jax, jax.numpy as jnp
from dalle_space.engine import Engine
Engine.from_pretrained("tiny", vqgan=None)
# Write every executable, however quickly it compiled, so the check does not depend on the machine's speed.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: 2 * x + 1).lower(jnp.ones(3)).compile()
"""


def test_loading_an_engine_turns_on_the_persistent_cache_under_dalle_space_cache(tmp_path):
    """After ``Engine.from_pretrained`` every compiled executable lands in ``$DALLE_SPACE_CACHE/jax-compilation``,
    which is what makes a restarted app skip recompiling its samplers."""
    env = {**os.environ, "DALLE_SPACE_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", PERSISTENT_CACHE_SCRIPT], cwd=REPO, env=env, check=True, timeout=300)
    assert [p for p in (tmp_path / "jax-compilation").rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def warmed():
    """The engine as the app starts it: tiny model, default shape compiled by ``warmup``."""
    engine = Engine.from_pretrained("tiny")
    engine.warmup()
    return engine


def test_default_shape_is_compiled_at_start_up(warmed):
    for mode in sampler.MODES:
        result = warmed.generate(["a red bicycle"], mode=mode, seed=1)
        assert result.timings.compiled is False and result.timings.compile_s == 0.0, mode


def test_compiled_is_true_for_a_new_shape_and_false_once_warm(warmed):
    first = warmed.generate(["a cat", "a dog"], n_seeds=2, seed=1)
    assert first.timings.compiled is True and first.timings.compile_s > 0
    again = warmed.generate(["a fox", "an owl"], n_seeds=2, seed=2)
    assert again.timings.compiled is False and again.timings.compile_s == 0.0


@pytest.fixture
def downloads(monkeypatch, tmp_path):
    """Hub fetches recorded instead of made: (repo id, revision, files)."""
    calls = []

    def fake_download(repo_id, revision, files):
        calls.append((repo_id, revision, files))
        return tmp_path, "0123abcd"

    monkeypatch.setattr(checkpoints, "_download", fake_download)
    return calls


@pytest.mark.parametrize("source, revision, repo_id", [
    ("mini", None, "dalle-mini/dalle-mini"),
    ("mega", None, "dalle-mini/dalle-mega"),
    ("mega", "v1.0", "dalle-mini/dalle-mega"),
    ("someone/my-dalle", "main", "someone/my-dalle"),
])
def test_dalle_model_hub_names_resolve_to_their_repos(downloads, tmp_path, source, revision, repo_id):
    assert checkpoints.locate_dallebart(source, revision) == (tmp_path, "0123abcd")
    assert downloads == [(repo_id, revision, checkpoints.DALLEBART_FILES)]


def test_vqgan_is_fetched_at_the_pinned_commit(downloads):
    checkpoints.locate_vqgan("f16_16384")
    assert downloads == [("dalle-mini/vqgan_imagenet_f16_16384", "e93a26e7707683d349bf5d5c41c5b0ef69b677a9",
                          checkpoints.VQGAN_FILES)]


def test_dalle_model_tiny_and_local_folders_load_without_the_hub(downloads, tmp_path):
    folder, revision = checkpoints.locate_dallebart("tiny")
    assert (folder, revision) == (bundled.DALLEBART, "bundled")
    local = tmp_path / "my-model"
    shutil.copytree(folder, local)
    assert checkpoints.locate_dallebart(str(local), "abc") == (local, "abc")
    config, _ = checkpoints.load_dallebart(local)
    assert config == DALLEBART_PRESETS["tiny"]
    # A local copy of the tiny model pairs with the bundled VQGAN (its 256 codes), not the hub's.
    assert Engine.from_pretrained(str(local)).vqgan_config.n_embed == 256
    assert downloads == []


@pytest.mark.parametrize("source", ["minii", "./not-there", "a/b/c"])
def test_other_dalle_model_values_are_refused_by_name(downloads, source):
    with pytest.raises(checkpoints.CheckpointError, match="neither a preset .*tiny, mini, mega.*, a local folder"):
        checkpoints.locate_dallebart(source)
    assert downloads == []
