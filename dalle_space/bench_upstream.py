"""Time upstream dalle-mini 0.1.5 ``DalleBart.generate`` for the comparison in ``dalle_space.bench``.

Runs ONLY in the separate upstream virtualenv (see ``requirements-upstream.txt``), because dalle-mini needs
transformers 4.x with Flax BART while the project runs on transformers 5. ``dalle_space.bench --upstream``
starts it as a subprocess and merges the JSON it writes::

    .venv-upstream/bin/python -m dalle_space.bench_upstream --preset mini --images 1,4 --json OUT.json

Random weights come from ``dalle_space.dallebart.init_params`` so both implementations sample with the very
same parameters. This module's top level imports only the standard library and numpy: ``dalle_space.bench``
reuses the input and machine helpers below from the project's own environment.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import sys
import time
import types
from typing import Any

import numpy as np

# One fixed prompt (BART ids: <s> = 0, </s> = 2, <pad> = 1), the same in every benchmark row.
PROMPT_TOKENS = [0, *range(5, 19), 2]
TEXT_LENGTH = 64
INPUT_ORDER = ("input_ids", "attention_mask", "input_ids_uncond", "attention_mask_uncond")


def prompt_inputs(n: int, text_length: int = TEXT_LENGTH) -> dict[str, np.ndarray]:
    """input ids / masks for ``n`` copies of the fixed prompt plus the empty prompt (int32, (n, text_length))."""

    def rows(tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.ones((n, text_length), np.int32)
        mask = np.zeros((n, text_length), np.int32)
        ids[:, : len(tokens)] = tokens
        mask[:, : len(tokens)] = 1
        return ids, mask

    input_ids, attention_mask = rows(PROMPT_TOKENS)
    input_ids_uncond, attention_mask_uncond = rows([0, 2])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "input_ids_uncond": input_ids_uncond,
        "attention_mask_uncond": attention_mask_uncond,
    }


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine_info() -> dict[str, Any]:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "loadavg_1m": os.getloadavg()[0],  # at the start; other work on the machine skews timings
    }


def tokens_digest(tokens) -> str:
    """Short fingerprint of one image's tokens, to check that two implementations sampled the same image."""
    return hashlib.sha1(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:12]


def make_row(impl: str, mode: str, images: int, compile_s: float, first_call_s: float, times: list[float],
             image_length: int, row0_tokens, loaded_rss_mb: float) -> dict[str, Any]:
    """One benchmark row; the same fields for every implementation. ``loaded_rss_mb``: peak RSS once the
    weights were in place, before anything was compiled."""
    per_call = statistics.median(times)
    row = {
        "impl": impl,
        "mode": mode,
        "images": images,
        "compile_s": compile_s,
        "first_call_s": first_call_s,  # compile + first run
        "call_s": times,  # steady-state calls
        "s_per_call": per_call,
        "s_per_image": per_call / images,
        "steps_per_s": image_length * images / per_call,
        "loaded_rss_mb": loaded_rss_mb,
        "peak_rss_mb": peak_rss_mb(),
        "row0_tokens_sha1": tokens_digest(row0_tokens),
        "loadavg_1m": os.getloadavg()[0],  # other work on the machine skews timings
    }
    print(f"{impl}/{mode} images={images}: compile {compile_s:.2f} s, {per_call:.3f} s/call, "
          f"{per_call / images:.3f} s/image, peak RSS {row['peak_rss_mb']:.0f} MiB", file=sys.stderr, flush=True)
    return row


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# ------------------------------------------------------------------------------------------------
# Upstream compatibility (dalle-mini 0.1.5 was written for jax 0.3 / transformers 4.25)


def _patch_environment() -> None:
    """Name aliases dalle-mini's modules need at import time; call before importing ``dalle_mini``."""
    import jax
    import jax.experimental
    import jax.numpy as jnp
    import jax.sharding

    if not hasattr(jnp, "DeviceArray"):  # removed from jax; upstream uses it in type hints only
        jnp.DeviceArray = jax.Array
    if not hasattr(jax.experimental, "PartitionSpec"):  # moved to jax.sharding
        jax.experimental.PartitionSpec = jax.sharding.PartitionSpec
    try:  # only used to download wandb artifacts (names with ':'), never here
        import wandb  # noqa: F401
    except ImportError:
        sys.modules["wandb"] = types.ModuleType("wandb")


def _patch_generation(cls) -> None:
    """Give ``cls`` the keyword-argument logits-processor builders of transformers 4.25.1.

    Newer transformers take a ``GenerationConfig`` instead, which dalle-mini's ``generate`` does not pass.
    Fall-backs to the config are those of 4.25.1: min_length is used only when passed (dalle-mini passes
    None, so the eos token is never masked), forced bos/eos only when passed or set in the config.
    """
    from transformers.generation.flax_logits_process import (
        FlaxForcedBOSTokenLogitsProcessor,
        FlaxForcedEOSTokenLogitsProcessor,
        FlaxLogitsProcessorList,
        FlaxMinLengthLogitsProcessor,
        FlaxTemperatureLogitsWarper,
        FlaxTopKLogitsWarper,
        FlaxTopPLogitsWarper,
    )

    def config_value(model, name, default):
        return getattr(model.config, name, default)

    def get_logits_warper(self, top_k=None, top_p=None, temperature=None):
        top_k = top_k if top_k is not None else config_value(self, "top_k", 50)
        top_p = top_p if top_p is not None else config_value(self, "top_p", 1.0)
        temperature = temperature if temperature is not None else config_value(self, "temperature", 1.0)
        warpers = FlaxLogitsProcessorList()
        if temperature is not None and temperature != 1.0:
            warpers.append(FlaxTemperatureLogitsWarper(temperature))
        if top_k is not None and top_k != 0:
            warpers.append(FlaxTopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p is not None and top_p < 1.0:
            warpers.append(FlaxTopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
        return warpers

    def get_logits_processor(
        self, no_repeat_ngram_size, min_length, max_length, eos_token_id, forced_bos_token_id, forced_eos_token_id
    ):
        # no_repeat_ngram_size: 4.25.1 read it but had no Flax processor for it.
        eos_token_id = eos_token_id if eos_token_id is not None else config_value(self, "eos_token_id", None)
        if forced_bos_token_id is None:
            forced_bos_token_id = config_value(self, "forced_bos_token_id", None)
        if forced_eos_token_id is None:
            forced_eos_token_id = config_value(self, "forced_eos_token_id", None)
        processors = FlaxLogitsProcessorList()
        if min_length is not None and eos_token_id is not None and min_length > -1:
            processors.append(FlaxMinLengthLogitsProcessor(min_length, eos_token_id))
        if forced_bos_token_id is not None:
            processors.append(FlaxForcedBOSTokenLogitsProcessor(forced_bos_token_id))
        if forced_eos_token_id is not None:
            processors.append(FlaxForcedEOSTokenLogitsProcessor(max_length, forced_eos_token_id))
        return processors

    cls._get_logits_warper = get_logits_warper
    cls._get_logits_processor = get_logits_processor


def load_upstream():
    """Import dalle-mini's model classes with the compatibility patches applied."""
    _patch_environment()
    from dalle_mini.model.configuration import DalleBartConfig
    from dalle_mini.model.modeling import DalleBart

    _patch_generation(DalleBart)
    return DalleBart, DalleBartConfig


def jitted_generate(model, condition_scale: float, top_k: int | None, top_p: float | None = None,
                    temperature: float | None = None):
    """``model.generate`` compiled once: (params, ids, mask, ids_uncond, mask_uncond, key) -> sequences.

    ``condition_scale`` stays a Python float (upstream branches on ``condition_scale != 1.0``).
    """
    import jax

    def run(params, input_ids, attention_mask, input_ids_uncond, attention_mask_uncond, prng_key):
        return model.generate(
            input_ids,
            attention_mask=attention_mask,
            prng_key=prng_key,
            params=params,
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            condition_scale=float(condition_scale),
            input_ids_uncond=input_ids_uncond,
            attention_mask_uncond=attention_mask_uncond,
        ).sequences

    return jax.jit(run)


# ------------------------------------------------------------------------------------------------


def build_model(args):
    """(model, params, weights description) for ``--model`` or a random ``--preset``."""
    import jax
    import jax.numpy as jnp

    DalleBart, UpstreamConfig = load_upstream()
    dtype = jnp.dtype(args.dtype)
    if args.model:
        model, params = DalleBart.from_pretrained(args.model, dtype=dtype, _do_init=False)
        weights = f"checkpoint {args.model}"
    else:
        from dalle_space.config import DALLEBART_PRESETS
        from dalle_space.dallebart import init_params

        ours = DALLEBART_PRESETS[args.preset]
        raw = {k: v for k, v in ours.to_dict().items() if k != "model_type"}
        config = UpstreamConfig(**{**raw, "use_scan": True})
        model = DalleBart(config, dtype=dtype, _do_init=False)
        params = init_params(ours, args.seed)
        weights = f"dalle_space.dallebart.init_params(preset={args.preset!r}, seed={args.seed})"
    if args.layout == "unscan":  # upstream's own conversion; it also sets config.use_scan = False
        params = model.unscan(params)
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else jnp.asarray(x),
        params,
    )
    return model, jax.block_until_ready(params), weights


def run(args) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    machine = machine_info()
    model, params, weights = build_model(args)
    loaded_rss_mb = peak_rss_mb()
    generate = jitted_generate(model, args.condition_scale, args.top_k, args.top_p, args.temperature)
    image_length = model.config.image_length
    rows = []
    for n in int_list(args.images):
        inputs = prompt_inputs(n, model.config.max_text_length)
        call_args = (params, *(jnp.asarray(inputs[k]) for k in INPUT_ORDER), jax.random.PRNGKey(args.seed))
        t0 = time.perf_counter()
        compiled = generate.lower(*call_args).compile()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sequences = compiled(*call_args).block_until_ready()  # first run, not counted as steady state
        first_run_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            compiled(*call_args).block_until_ready()
            times.append(time.perf_counter() - t0)
        layout = "scan" if model.config.use_scan else "unscan"  # a checkpoint may come unscanned
        rows.append(make_row("upstream", layout, n, compile_s, compile_s + first_run_s, times,
                             image_length, np.asarray(sequences)[0, 1:], loaded_rss_mb))

    import dalle_mini
    import flax
    import transformers

    return {
        "settings": {
            "preset": None if args.model else args.preset, "model": args.model, "weights": weights,
            "dtype": args.dtype, "layout": args.layout, "condition_scale": args.condition_scale, "top_k": args.top_k,
            "top_p": args.top_p, "temperature": args.temperature, "seed": args.seed, "repeats": args.repeats,
        },
        "versions": {"dalle_mini": dalle_mini.__version__, "transformers": transformers.__version__,
                     "flax": flax.__version__},
        "machine": machine,
        "rows": rows,
    }


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """The options both benchmark sides take, so that one run gives them the same settings."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--condition-scale", type=float, default=3.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="mini", help="random weights for this preset (tiny, mini, mega)")
    src.add_argument("--model", help="a saved upstream checkpoint folder instead of random weights")
    p.add_argument("--images", default="1", help="comma-separated images per prompt, e.g. 1,4")
    p.add_argument("--layout", default="scan", choices=["scan", "unscan"],
                   help="encoder and decoder layers as one nn.scan (upstream default) or unrolled (DalleBart.unscan)")
    add_sampling_options(p)
    p.add_argument("--repeats", type=int, default=1, help="timed calls after the compile call")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
