"""The Space's experiment: serial versus parallel super-conditioning, swept over images per prompt.

For each (sampler, images per prompt) of one fixed prompt: steady-state seconds per image (compilation
timed apart), memory per image, and the time against this machine's own limit. One image's step reads
every decoder weight once, so ``floor_s`` = weight bytes read per step x image positions / memory
bandwidth (measured here with a large XLA reduction) is the fastest any sampler could be; ``floor_fraction``
says how much of that limit a row reaches. The page's Benchmark tab, its ``/benchmark`` endpoint and
``python -m dalle_space.bench --sweep`` all run :func:`sweep`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from . import dallebart, memory
from .bench_upstream import prompt_inputs
from .engine import Engine, seed_keys
from .sampler import SamplerSpec, sampler_mode

# progress(done, total, what is running now)
SweepProgress = Callable[[int, int, str], None]

BANDWIDTH_PROBE_BYTES = 1 << 30  # far beyond any last-level cache, so the reduction streams from memory
RATIOS = (("parallel", "serial"), ("conditional", "parallel"))  # (a, b): how many times faster a ran than b


@dataclasses.dataclass(frozen=True)
class SweepRow:
    mode: str  # parallel, serial, or conditional (condition scale 1: nothing to parallelise)
    images: int  # images of the one prompt, sampled together
    compile_s: float  # compiling this shape, the first time it ran; 0 when already compiled
    s_per_call: float  # median of the steady-state calls (compilation excluded)
    s_per_image: float
    memory_mib: float | None  # peak memory growth of one steady-state call (see ``memory_source``)
    memory_per_image_mib: float | None
    estimate_mib: float  # the engine's estimate of the sampling buffers (memory.sampler_bytes), to set beside it
    floor_s: float  # weight-streaming floor of the call: step weight bytes x positions / bandwidth
    floor_fraction: float  # floor_s / s_per_call: 1.0 is the machine's limit

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Sweep:
    rows: tuple[SweepRow, ...]
    speedups: dict[int, dict[str, float]]  # images -> {"a vs b": b's s / a's s}, side by side in this run
    bandwidth_gbs: float  # measured memory bandwidth, GB/s
    step_weight_mb: float  # decoder weights one step reads, MB
    memory_source: str  # what memory_mib measures on this backend
    condition_scale: float
    products_per_step: dict[str, int]  # mode -> matrix products (dots) in one optimised decoding step
    largest_fit: dict[str, int] | None  # mode -> most images of one prompt that fit, when searched
    fit_limit: int | None  # the search's upper bound

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rows"] = [row.as_dict() for row in self.rows]
        out["speedups"] = [{"images": n, **ratios} for n, ratios in self.speedups.items()]  # JSON: str keys
        return out


# ------------------------------------------------------------------------------------------------
# The machine's limits


@functools.cache
def memory_bandwidth_gbs(probe_bytes: int = BANDWIDTH_PROBE_BYTES, repeats: int = 5) -> float:
    """Bytes per second one XLA reduction streams from memory (the best of ``repeats``), in GB/s.
    Measured once per process: the same compiler and threads the sampler uses."""
    values = jax.jit(lambda: jnp.arange(probe_bytes // 4, dtype=jnp.float32))()  # not constant pages
    total = jax.jit(jnp.sum)
    total(values).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        total(values).block_until_ready()
        best = min(best, time.perf_counter() - start)
    del values
    return probe_bytes / best / 1e9


def floor_seconds(step_weight_bytes: int, positions: int, bandwidth_gbs: float) -> float:
    return step_weight_bytes * positions / (bandwidth_gbs * 1e9)


def products_per_step(engine: Engine, mode: str) -> int:
    """Matrix products (HLO ``dot`` operations, fused ones included) in one image position of the
    optimised sampler: whether the compiler keeps serial's two decoder calls apart or merges the
    products that share a weight is what separates the two modes' costs."""
    _, advance = engine.compile_for_shape(SamplerSpec(1, 1, mode, 50, False), positions=1)
    return len(re.findall(r"\bdot\(", advance.as_text()))


# ------------------------------------------------------------------------------------------------
# The sweep


def measure(engine: Engine, mode: str, images: int, condition_scale: float, floor_s: float, repeats: int = 2,
            seed: int = 0) -> SweepRow:
    """One row: compile (if this shape is new) and one warm call, then ``repeats`` timed calls of the one
    fixed prompt the upstream benchmark also samples."""
    prompt = prompt_inputs(1, engine.config.max_text_length)
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    keys = seed_keys(range(seed, seed + images))
    scale = 1.0 if mode == "conditional" else condition_scale

    def call():
        return engine.sample_tokens(ids, mask, keys, condition_scale=scale,
                                    mode="parallel" if mode == "conditional" else mode)

    compiled_before = engine.cache_info().compile_seconds
    call()
    compile_s = engine.cache_info().compile_seconds - compiled_before
    times, growth = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        _, grown = memory.peak_growth(call)
        times.append(time.perf_counter() - start)
        growth.append(grown)
    per_call = statistics.median(times)
    grown_mib = None if None in growth else max(growth) / 2**20
    return SweepRow(mode=mode, images=images, compile_s=compile_s, s_per_call=per_call,
                    s_per_image=per_call / images, memory_mib=grown_mib,
                    memory_per_image_mib=None if grown_mib is None else grown_mib / images,
                    estimate_mib=engine.sampler_bytes(1, images, mode) / 2**20,
                    floor_s=floor_s, floor_fraction=floor_s / per_call)


def sweep(engine: Engine, images: Sequence[int], modes: Sequence[str] = ("serial", "parallel"),
          condition_scale: float = 3.0, repeats: int = 2, fit_limit: int | None = None,
          progress: SweepProgress | None = None) -> Sweep:
    """Every mode at every image count, the modes of one count back to back so their ratio is measured
    side by side. At condition scale 1 only the conditional sampler runs: there is no unconditional
    pass to parallelise. ``fit_limit`` also searches each mode's largest batch up to that bound."""
    modes = tuple(dict.fromkeys(sampler_mode(mode, condition_scale) for mode in modes))
    bandwidth = memory_bandwidth_gbs()
    step_bytes = dallebart.step_weight_bytes(engine.params)
    floor = floor_seconds(step_bytes, engine.config.image_length, bandwidth)
    plan = [(n, mode) for n in images for mode in modes]
    total = len(plan) + (len(modes) if fit_limit else 0)
    rows = []
    for done, (n, mode) in enumerate(plan):
        if progress:
            progress(done, total, f"{mode}, {n} image{'s' * (n > 1)}")
        rows.append(measure(engine, mode, n, condition_scale, floor, repeats))
    fits = None
    if fit_limit:
        fits = {}
        for done, mode in enumerate(modes, len(plan)):
            if progress:
                progress(done, total, f"largest batch for {mode}, up to {fit_limit}")
            fits[mode] = engine.most_images_that_fit(1, mode, fit_limit)
    products = {mode: products_per_step(engine, mode) for mode in modes}
    if progress:
        progress(total, total, "done")
    by_key = {(r.mode, r.images): r.s_per_call for r in rows}
    speedups = {n: {f"{a} vs {b}": by_key[(b, n)] / by_key[(a, n)] for a, b in RATIOS
                    if (a, n) in by_key and (b, n) in by_key} for n in images}
    speedups = {n: ratios for n, ratios in speedups.items() if ratios}
    return Sweep(rows=tuple(rows), speedups=speedups, bandwidth_gbs=bandwidth,
                 step_weight_mb=step_bytes / 1e6, memory_source=memory.source(),
                 condition_scale=condition_scale, products_per_step=products, largest_fit=fits,
                 fit_limit=fit_limit)


def markdown(result: Sweep) -> str:
    """The sweep as a table (the plots' numbers, for copying and screen readers), then the speed-ups."""
    lines = [
        "| sampler | images | s / image | s / call | compile s | memory MiB | MiB / image | estimate MiB | floor s |"
        " of the limit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.rows:
        measured = "– | –" if r.memory_mib is None else f"{r.memory_mib:.1f} | {r.memory_per_image_mib:.1f}"
        lines.append(f"| {r.mode} | {r.images} | {r.s_per_image:.3g} | {r.s_per_call:.3g} | {r.compile_s:.3g} | "
                     f"{measured} | {r.estimate_mib:.1f} | {r.floor_s:.3g} | {100 * r.floor_fraction:.0f}% |")
    names = list(dict.fromkeys(name for ratios in result.speedups.values() for name in ratios))
    if names:
        lines += ["", "| images | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        lines += [f"| {n} | " + " | ".join(f"{ratios[k]:.2f}×" if k in ratios else "–" for k in names) + " |"
                  for n, ratios in result.speedups.items()]
    if result.largest_fit:
        lines += ["", "Largest batch that fits (one prompt, the engine's memory estimate against free memory, up to "
                  f"{result.fit_limit}): " + ", ".join(f"{m} {n}" for m, n in result.largest_fit.items()) + "."]
    lines += ["", f"Memory: {result.memory_source}. Floor: {result.step_weight_mb:.3g} MB of decoder weights read "
              f"per step at {result.bandwidth_gbs:.1f} GB/s (measured here). Matrix products in one optimised step: "
              + ", ".join(f"{m} {n}" for m, n in result.products_per_step.items()) + "."]
    return "\n".join(lines)
