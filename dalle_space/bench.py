"""Benchmark the image-token sampler: parallel vs serial super-conditioning, optionally vs upstream dalle-mini.

    python -m dalle_space.bench --preset mini --images 1,4 --modes parallel,serial --upstream --json bench-mini.json

Every configuration (implementation, mode, images per prompt) is measured in a fresh subprocess, so its peak
RSS is its own, and the configurations of one image count run back to back, so their ratios are measured
side by side. One prompt is used throughout (``bench_upstream.PROMPT_TOKENS``); image j gets the key
``PRNGKey(seed + j)``. ``--upstream`` runs ``dalle_space.bench_upstream`` in its own virtualenv (see
requirements-upstream.txt) on the same weights: random ones from ``dallebart.init_params(preset, seed)``, or
the same checkpoint folder with ``--model``. Timings: ``compile_s`` is ahead-of-time compilation,
``first_call_s`` compilation plus the first run, ``s_per_call`` the median of ``--repeats`` further calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .bench_upstream import PROMPT_TOKENS, add_sampling_options, int_list, machine_info, make_row, peak_rss_mb, prompt_inputs

REPO = Path(__file__).resolve().parents[1]
DEFAULT_UPSTREAM_PYTHON = ".venv-upstream/bin/python"
UPSTREAM_SETUP = ("python3 -m venv .venv-upstream && .venv-upstream/bin/pip install -r requirements-upstream.txt"
                  " && .venv-upstream/bin/pip install --no-deps dalle-mini==0.1.5")


# ------------------------------------------------------------------------------------------------
# Measuring our sampler (in this process)


def build_engine(args, max_images: int):
    """A tokens-only engine: the checkpoint of ``--model`` or random weights for ``--preset``."""
    import jax

    from .engine import Engine

    # Both constructors turn on the on-disk compilation cache, which would hide the compile times measured here.
    jax.config.update("jax_enable_compilation_cache", False)
    if args.model:
        engine = Engine.from_pretrained(model=args.model, vqgan=None, dtype=args.dtype, max_images=max_images)
    else:
        engine = Engine.from_random(args.preset, dtype=args.dtype, seed=args.seed, max_images=max_images)
    jax.block_until_ready(engine.params)  # drawn asynchronously: "loaded" RSS must wait for the weights
    return engine


def measure_ours(engine, mode: str, images: int, args, loaded_rss_mb: float) -> dict[str, Any]:
    from .engine import seed_keys

    config = engine.config
    inputs = prompt_inputs(1, config.max_text_length)
    keys = seed_keys([args.seed + j for j in range(images)])

    def call():
        return engine.sample_tokens(inputs["input_ids"], inputs["attention_mask"], keys,
                                    condition_scale=args.condition_scale, mode=mode, top_k=args.top_k,
                                    top_p=args.top_p,
                                    temperature=1.0 if args.temperature is None else args.temperature)

    compiled_before = engine.cache_info().compile_seconds
    start = time.perf_counter()
    tokens = call()  # returns host numpy: the work is done
    first_call_s = time.perf_counter() - start
    compile_s = engine.cache_info().compile_seconds - compiled_before
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return make_row("ours", mode, images, compile_s, first_call_s, times, config.image_length, tokens[0],
                    loaded_rss_mb)


def run_sweep(args) -> None:
    """``--sweep``: the Space's Benchmark tab from the command line (``dalle_space.experiment``)."""
    from . import experiment

    images = int_list(args.images)
    engine = build_engine(args, max(images + [args.fit_limit]))
    result = experiment.sweep(engine, images, args.modes.split(","), condition_scale=args.condition_scale,
                              repeats=args.repeats, fit_limit=args.fit_limit or None,
                              progress=lambda done, total, what: print(f"[{done}/{total}] {what}", file=sys.stderr))
    if args.json:
        out = {"settings": {"preset": None if args.model else args.preset, "model": args.model, "dtype": args.dtype},
               "machine": machine_info(), **result.as_dict()}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(experiment.markdown(result))


def run_in_process(args) -> list[dict[str, Any]]:
    images = int_list(args.images)
    engine = build_engine(args, max(images))
    loaded_rss_mb = peak_rss_mb()
    return [measure_ours(engine, mode, n, args, loaded_rss_mb) for n in images for mode in args.modes.split(",")]


# ------------------------------------------------------------------------------------------------
# Subprocesses


def _subprocess_json(command: list[str]) -> dict[str, Any]:
    """Run a measuring subprocess from the repo root; its progress lines go to our stderr, its JSON to us."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rows.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        subprocess.run([*command, "--json", str(out)], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def _shared_options(args) -> list[str]:
    options = ["--dtype", args.dtype, "--condition-scale", str(args.condition_scale), "--top-k", str(args.top_k),
               "--seed", str(args.seed), "--repeats", str(args.repeats)]
    if args.top_p is not None:
        options += ["--top-p", str(args.top_p)]
    if args.temperature is not None:
        options += ["--temperature", str(args.temperature)]
    return options


def run_ours_subprocess(args, mode: str, images: int, model: str | None) -> dict[str, Any]:
    source = ["--model", model] if model else ["--preset", args.preset]
    command = [sys.executable, "-m", "dalle_space.bench", "--in-process", *source, "--modes", mode,
               "--images", str(images), *_shared_options(args)]
    return _subprocess_json(command)["rows"][0]


def run_upstream_subprocess(args, python: str, images: int, layout: str, model_folder: str | None) -> dict[str, Any]:
    source = ["--model", model_folder] if model_folder else ["--preset", args.preset]
    command = [python, "-m", "dalle_space.bench_upstream", *source, "--images", str(images), "--layout", layout,
               *_shared_options(args)]
    return _subprocess_json(command)


# ------------------------------------------------------------------------------------------------
# Report


def _label(row: dict[str, Any]) -> str:
    return row["mode"] if row["impl"] == "ours" else f"upstream-{row['mode']}"


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per image count, from rows of the same run: speed-ups ``"a/b"`` = b's seconds per call over a's
    (> 1: a is faster), and whether a and b sampled the same tokens for image 0."""
    out = []
    for n in sorted({r["images"] for r in rows}):
        by_label = {_label(r): r for r in rows if r["images"] == n}
        pairs = [(a, b) for i, a in enumerate(by_label) for b in list(by_label)[i + 1:] if by_label[a]["impl"] == "ours"]
        out.append({
            "images": n,
            "speedup": {f"{a}/{b}": by_label[b]["s_per_call"] / by_label[a]["s_per_call"] for a, b in pairs},
            "same_row0_tokens": {f"{a}/{b}": by_label[a]["row0_tokens_sha1"] == by_label[b]["row0_tokens_sha1"]
                                 for a, b in pairs},
        })
    return out


def _fmt(value, spec: str = ".2f") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| impl | mode | images | compile s | first call s | s / call | s / image | steps / s | RSS loaded MiB |"
        " peak RSS MiB | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['impl']} | {r['mode']} | {r['images']} | {_fmt(r['compile_s'])} | "
                     f"{_fmt(r['first_call_s'])} | {_fmt(r['s_per_call'], '.3f')} | {_fmt(r['s_per_image'], '.3f')} | "
                     f"{_fmt(r['steps_per_s'], '.1f')} | {_fmt(r['loaded_rss_mb'], '.0f')} | "
                     f"{_fmt(r['peak_rss_mb'], '.0f')} | {_fmt(r.get('loadavg_1m'), '.1f')} |")
    pairs = list(dict.fromkeys(pair for q in result["ratios"] for pair in q["speedup"]))
    if pairs:
        lines += ["", "Speed-up a/b (> 1: a is faster), and whether image 0 got the same tokens:", "",
                  "| images | " + " | ".join(f"{pair} speed-up | {pair} same tokens" for pair in pairs) + " |",
                  "|---:|" + "---:|---|" * len(pairs)]
        for q in result["ratios"]:
            cells = [f"{_fmt(q['speedup'].get(pair))}× | {_fmt(q['same_row0_tokens'].get(pair))}" for pair in pairs]
            lines.append(f"| {q['images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines).replace("–×", "–")


# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dalle_space.bench", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", default="mini", choices=["tiny", "mini", "mega"],
                        help="random weights of this architecture (default mini)")
    source.add_argument("--model", help="real weights: a checkpoint folder or hub id, as Engine.from_pretrained takes")
    p.add_argument("--images", default="1,2,4,8,16", help="comma-separated images per prompt (one prompt)")
    p.add_argument("--modes", default="parallel,serial",
                   help="comma-separated: parallel, serial; with --sweep also conditional (condition scale 1)")
    p.add_argument("--sweep", action="store_true",
                   help="the Space's Benchmark tab: in-process sweep with memory per image and the weight-streaming "
                        "floor (dalle_space.experiment); no upstream")
    p.add_argument("--fit-limit", type=int, default=0,
                   help="with --sweep: search each mode's largest batch up to this many images (0: no search)")
    add_sampling_options(p)
    p.add_argument("--repeats", type=int, default=1, help="steady-state calls timed after the first (median)")
    p.add_argument("--json", help="write the full results here")
    p.add_argument("--upstream", action="store_true", help="also time upstream dalle-mini in its own venv")
    p.add_argument("--upstream-layouts", default="scan",
                   help="comma-separated: scan (upstream's default nn.scan over layers), unscan (DalleBart.unscan)")
    p.add_argument("--upstream-python", default=DEFAULT_UPSTREAM_PYTHON,
                   help=f"python of the upstream venv, relative to the repo root (default {DEFAULT_UPSTREAM_PYTHON})")
    p.add_argument("--in-process", action="store_true",
                   help="measure our configurations in this process (peak RSS is then cumulative); no upstream")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    bad = set(args.modes.split(",")) - {"parallel", "serial", *(("conditional",) if args.sweep else ())}
    if bad:
        p.error(f"unknown mode(s): {', '.join(sorted(bad))}")
    bad = set(args.upstream_layouts.split(",")) - {"scan", "unscan"}
    if bad:
        p.error(f"unknown upstream layout(s): {', '.join(sorted(bad))}")
    if (args.in_process or args.sweep) and args.upstream:
        p.error("--upstream runs in subprocesses; drop --in-process / --sweep")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.sweep:
        return run_sweep(args)
    machine = machine_info()
    images = int_list(args.images)
    modes = args.modes.split(",")
    upstream_info = None
    if args.in_process:
        rows = run_in_process(args)
    else:
        model_folder = python = None
        if args.model:
            from .checkpoints import locate_dallebart

            model_folder = str(locate_dallebart(args.model)[0])
        if args.upstream:
            python = str(REPO / args.upstream_python) if not os.path.isabs(args.upstream_python) else args.upstream_python
            if not os.path.exists(python):
                sys.exit(f"no upstream python at {python}; create the venv from the repo root:\n  {UPSTREAM_SETUP}")
        rows = []
        for n in images:
            rows += [run_ours_subprocess(args, mode, n, model_folder) for mode in modes]
            for layout in args.upstream_layouts.split(",") if args.upstream else ():
                upstream = run_upstream_subprocess(args, python, n, layout, model_folder)
                rows += upstream["rows"]
                upstream_info = {k: upstream[k] for k in ("versions", "machine")}

    import flax
    import jax
    import numpy

    result = {
        "settings": {"preset": None if args.model else args.preset, "model": args.model, "images": images,
                     "modes": modes, "dtype": args.dtype, "condition_scale": args.condition_scale,
                     "top_k": args.top_k, "top_p": args.top_p, "temperature": args.temperature,
                     "seed": args.seed, "repeats": args.repeats, "fresh_process_per_row": not args.in_process,
                     "upstream_layouts": args.upstream_layouts.split(",") if args.upstream else [],
                     "prompt_tokens": PROMPT_TOKENS},
        "machine": machine,
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "numpy": numpy.__version__},
        "upstream": upstream_info,
        "rows": rows,
        "ratios": ratios(rows),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
