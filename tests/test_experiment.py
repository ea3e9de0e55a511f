"""The experiment behind the Benchmark tab: the weight-streaming floor, memory measurement, the
largest-batch search, product counts, and the sweep's rows, on the bundled tiny model."""

import re
import time

import numpy as np
import pytest

from dalle_space import dallebart, experiment, memory
from dalle_space.config import DALLEBART_PRESETS
from dalle_space.engine import Engine
from dalle_space.sampler import SamplerSpec


@pytest.fixture(scope="module")
def tiny():
    return Engine.from_pretrained("tiny")


def test_step_weight_bytes_counts_what_a_decoder_step_reads(tiny):
    """Per layer: q, k, v, out of self-attention, q and out of cross-attention (its k / v are applied once
    per prompt), the GLU's three matrices, and the norms' vectors; then the final norm and the lm head."""
    config = DALLEBART_PRESETS["tiny"]
    d, ffn = config.d_model, config.decoder_ffn_dim
    norms = 4 * d + 2 * d + d + ffn  # LayerNorm_0..3 (two with a scale), GLU's two norms
    per_layer = 6 * d * d + 3 * d * ffn + norms
    expected = 4 * (config.decoder_layers * per_layer + d + d * config.decoder_vocab_size)
    assert dallebart.step_weight_bytes(tiny.params) == expected


def test_the_floor_is_weight_bytes_times_positions_over_bandwidth():
    assert experiment.floor_seconds(800_000_000, 256, 20.0) == pytest.approx(10.24)


def test_bandwidth_probe_is_plausible():
    assert 0.5 < experiment.memory_bandwidth_gbs(probe_bytes=64 << 20, repeats=2) < 5000


def test_peak_memory_growth_sees_an_allocation_made_during_the_call():
    def allocate():
        block = np.ones(64 << 20, np.uint8)  # 64 MiB, touched
        time.sleep(0.1)  # held for many polls, as a sampler's buffers are, even on a busy machine
        return int(block[::4096].sum())

    result, grown = memory.peak_growth(allocate)
    assert result == 16384
    assert 60 << 20 <= grown < 200 << 20


def test_buffers_grow_with_images_and_the_conditional_sampler_needs_half(tiny):
    """Per image, past the encoder's fixed share: linear in the images, half as much for one row per image."""
    one, four, eight = (_xla_sampler_bytes(tiny, 1, n, "parallel") for n in (1, 4, 8))
    assert four > one and eight - four == pytest.approx(4 / 3 * (four - one), rel=0.1)
    conditional = {n: _xla_sampler_bytes(tiny, 1, n, "conditional") for n in (4, 8)}
    assert conditional[8] - conditional[4] == pytest.approx((eight - four) / 2, rel=0.1)


@pytest.mark.parametrize("fits, limit, expected", [(37, 256, 37), (0, 8, 0), (None, 100, 100), (64, 64, 64)])
def test_the_largest_batch_is_the_most_images_the_guard_accepts(tiny, monkeypatch, fits, limit, expected):
    free = 10**15 if fits is None else 1000 if fits == 0 else tiny.memory_needed(1, fits, "parallel") + 1
    monkeypatch.setattr(memory, "free_bytes", lambda: free)
    assert tiny.most_images_that_fit(1, "parallel", limit) == expected


def test_serial_steps_have_about_twice_the_products_of_parallel(tiny):
    counts = {mode: experiment.products_per_step(tiny, mode) for mode in ("serial", "parallel", "conditional")}
    assert counts["parallel"] == counts["conditional"] > 0
    assert counts["serial"] >= 2 * counts["parallel"] - 4


@pytest.mark.parametrize("mode, rows", [("parallel", 2), ("serial", 1)])
def test_the_logits_product_reads_the_lm_head_as_stored(tiny, mode, rows):
    """Logits come from weight (vocab, d) @ states (d, rows), transposed afterwards. Had XLA folded a transpose
    into the product (states.T @ kernel), XLA:CPU would pack a copy of the weight for each thread from two rows
    on (mini: 24-35 MiB that the memory estimate does not hold) and run it 3-5x slower."""
    _, advance = tiny.compile_for_shape(SamplerSpec(1, 1, mode, 50, False), positions=1)
    vocab = tiny.config.decoder_vocab_size
    products = re.findall(rf"= f32\[([\d,]*\b{vocab}\b[\d,]*)\]\S* dot\(.*?\), (lhs_contracting_dims=\{{\d\}})",
                          advance.as_text())
    assert products and set(products) == {(f"{vocab},{rows}", "lhs_contracting_dims={1}")}


def test_sweep_rows_follow_the_plan_and_report_progress(tiny):
    calls = []
    result = experiment.sweep(tiny, [1, 2], ("serial", "parallel", "conditional"), repeats=1,
                              progress=lambda done, total, what: calls.append((done, total, what)))
    assert [(r.mode, r.images) for r in result.rows] == [
        ("serial", 1), ("parallel", 1), ("conditional", 1), ("serial", 2), ("parallel", 2), ("conditional", 2)]
    assert [c[0] for c in calls] == list(range(7)) and {c[1] for c in calls} == {6}
    assert set(result.speedups[2]) == {"parallel vs serial", "conditional vs parallel"}
    by_key = {(r.mode, r.images): r for r in result.rows}
    assert result.speedups[2]["parallel vs serial"] == pytest.approx(
        by_key[("serial", 2)].s_per_call / by_key[("parallel", 2)].s_per_call)
    table = experiment.markdown(result)
    assert table.count("\n| conditional |") == 2 and "parallel vs serial" in table


def test_sweep_at_scale_one_runs_only_the_conditional_sampler(tiny):
    result = experiment.sweep(tiny, [1], condition_scale=1.0, repeats=1)
    assert [r.mode for r in result.rows] == ["conditional"] and result.speedups == {}


def _xla_sampler_bytes(engine, n_prompts, n_seeds, mode) -> int:
    """What XLA allocates besides the weights to sample a batch at its peak: the encoder's outputs (state, KV
    caches, contexts), live through sampling, plus the larger of the encoder's working buffers and what one
    chunk adds (its outputs reuse the donated state)."""
    prepare, advance = (c.memory_analysis() for c in engine.compile_for_shape(
        SamplerSpec(n_prompts, n_seeds, mode, 50, False)))
    added = advance.temp_size_in_bytes + advance.output_size_in_bytes - advance.alias_size_in_bytes
    return prepare.output_size_in_bytes + max(prepare.temp_size_in_bytes, added)


@pytest.mark.parametrize("mode", ["parallel", "serial", "conditional"])
@pytest.mark.parametrize("n_prompts, n_seeds", [(1, 1), (1, 4), (2, 8)])
def test_the_memory_estimate_is_within_a_quarter_of_xlas_buffers(tiny, mode, n_prompts, n_seeds):
    estimate = memory.sampler_bytes(tiny.config, n_prompts, n_prompts * n_seeds, mode, 4)
    assert estimate == pytest.approx(_xla_sampler_bytes(tiny, n_prompts, n_seeds, mode), rel=0.25)


@pytest.mark.parametrize("n_images", [1, 4])
def test_the_vqgan_estimate_is_within_a_quarter_of_xlas_buffers(tiny, n_images):
    import jax

    from dalle_space import vqgan

    codes = jax.ShapeDtypeStruct((n_images, tiny.vqgan_config.grid_side ** 2), np.int32)
    compiled = jax.jit(vqgan.decode_codes, static_argnums=0).lower(tiny.vqgan_config, tiny.vqgan_params,
                                                                  codes).compile().memory_analysis()
    xla = compiled.temp_size_in_bytes + compiled.output_size_in_bytes
    assert memory.vqgan_bytes(tiny.vqgan_config, n_images, 4) == pytest.approx(xla, rel=0.25)


def test_a_request_that_would_not_fit_is_refused_with_the_count_that_would(tiny, monkeypatch):
    needed = {n: tiny.memory_needed(1, n, "parallel") for n in (2, 3)}
    monkeypatch.setattr(memory, "free_bytes", lambda: needed[2] + 1)
    misses = tiny.cache_info().misses
    with pytest.raises(ValueError, match=r"^3 images need about .* GiB of memory but .* GiB are free: "
                                         r"at most 2 \(2 per prompt\) would fit now\.$"):
        tiny.generate(["a red bicycle"], n_seeds=3, condition_scale=3.0)
    assert tiny.cache_info().misses == misses  # refused before anything compiled or ran
    assert tiny.generate(["a red bicycle"], n_seeds=2, condition_scale=3.0).images.shape[0] == 2
    monkeypatch.setattr(memory, "free_bytes", lambda: 1000)
    with pytest.raises(ValueError, match="not even one image per prompt fits now"):
        tiny.generate(["a red bicycle"], condition_scale=3.0)
