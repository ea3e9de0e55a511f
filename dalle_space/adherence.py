"""Prompt adherence against condition scale: how often the model draws what its caption says, judged from the
pixels alone, for colour-shape pairs seen in training and for the HELD_OUT ones.

    python -m dalle_space.adherence --model DIR/dallebart --vqgan DIR/vqgan --prompts 160 --images 2 --json F

The prompts are scenes drawn with a fixed seed: N whose shapes use only training pairs ("seen") and N whose
shapes use only HELD_OUT pairs ("held_out"), one caption each. At every condition scale each prompt gets K
images from one ``Engine.generate`` call, image j with seed ``seed + j``, so every scale samples from the same
random draws and differences between scales come from the guidance, not from luck. Each image is judged by
``dalle_space.judge`` and checked against its scene; a rate is the fraction of images that got one attribute
right (``judge.Checks``: colour, shape, count, size, position, and all of them at once).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from .judge import Checks, Verdict, check, judge
from .sampler import DEFAULT_CONDITION_SCALE
from .scenes import Scene, caption, sample_scene

GROUPS = ("seen", "held_out")  # prompts whose pairs were in training, and prompts of HELD_OUT pairs only
MEASURES = tuple(field.name for field in dataclasses.fields(Checks))
DEFAULT_SCALES = (1.0, 3.0, 5.0, DEFAULT_CONDITION_SCALE, 20.0)  # 1: no guidance; the app's default among them


@dataclasses.dataclass(frozen=True)
class Prompt:
    group: str
    scene: Scene
    caption: str


@dataclasses.dataclass(frozen=True)
class Judged:
    """One sampled image: which prompt, scale and seed drew it, what the judge saw and what it got right."""

    group: str
    prompt: int  # index into the prompt set
    scale: float
    seed: int
    verdict: Verdict
    checks: Checks


def prompt_set(n: int, seed: int) -> list[Prompt]:
    """n seen prompts, then n held-out ones; each group from its own stream spawned from ``seed``, so a larger n
    keeps the smaller set as its prefix and neither stream is the one ``default_rng(seed)`` gives training."""
    prompts = []
    for group, stream in zip(GROUPS, np.random.SeedSequence(seed).spawn(len(GROUPS))):
        rng = np.random.default_rng(stream)
        for _ in range(n):
            scene = sample_scene(rng, held_out=group == "held_out")
            prompts.append(Prompt(group, scene, caption(scene, rng)))
    return prompts


def rates(checks: Sequence[Checks]) -> dict[str, float]:
    """The fraction of checks that passed, per measure."""
    if not checks:
        raise ValueError("no checks to rate")
    return {measure: sum(getattr(c, measure) for c in checks) / len(checks) for measure in MEASURES}


def summarise(judged: Iterable[Judged]) -> list[dict[str, Any]]:
    """One row per (group, scale) that has images, groups in GROUPS order and scales in the order sampled:
    the number of images and each measure's rate."""
    cells: dict[tuple[str, float], list[Checks]] = {}
    for item in judged:
        cells.setdefault((item.group, item.scale), []).append(item.checks)
    return [{"group": group, "scale": scale, "images": len(checks), **rates(checks)}
            for group in GROUPS for (cell_group, scale), checks in cells.items() if cell_group == group]


def sample(engine, prompts: Sequence[Prompt], scales: Sequence[float], images: int, seed: int,
           top_k: int | None = None) -> list[Judged]:
    """Draw and judge ``images`` images of every prompt at every scale, one generate call per prompt and scale,
    at ``top_k`` (None: the model's default, as the app samples)."""
    judged = []
    with tqdm(total=len(scales) * len(prompts), desc="adherence", unit="prompt") as bar:
        for scale in scales:
            bar.set_postfix(scale=f"{scale:g}")
            for index, prompt in enumerate(prompts):
                result = engine.generate([prompt.caption], n_seeds=images, condition_scale=scale, seed=seed,
                                         top_k=top_k)
                for pixels, image_seed in zip(result.images, result.seeds):
                    verdict = judge(pixels)
                    judged.append(Judged(prompt.group, index, scale, image_seed, verdict, check(verdict, prompt.scene)))
                bar.update()
    return judged


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rates as percentages, one row per (group, scale); the app's default scale is marked."""
    lines = ["| pairs | condition scale | images | " + " | ".join(MEASURES) + " |",
             "|---|---:|---:|" + "---:|" * len(MEASURES)]
    for row in rows:
        scale = f"{row['scale']:g}" + (" (app default)" if row["scale"] == DEFAULT_CONDITION_SCALE else "")
        cells = " | ".join(f"{100 * row[m]:.0f}%" for m in MEASURES)
        lines.append(f"| {row['group'].replace('_', '-')} | {scale} | {row['images']} | {cells} |")
    return "\n".join(lines)


def _scales(text: str) -> list[float]:
    scales = [float(part) for part in text.split(",")]
    if any(not np.isfinite(s) or s < 0 for s in scales) or len(set(scales)) != len(scales):
        raise argparse.ArgumentTypeError("distinct finite scales of at least 0, comma-separated")
    return scales


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dalle_space.adherence", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny",
                   help="DalleBart: a checkpoint folder, hub id or preset, as Engine.from_pretrained takes "
                        "(default: the bundled tiny model, as the app loads it offline)")
    p.add_argument("--vqgan", default="auto",
                   help="VQGAN folder, hub id or preset (default auto: the one whose codebook size the model uses)")
    # Many prompts, few images each: images of one prompt succeed or fail together, and sets of 20 prompts with 8
    # images differed by 13 points of seen colours between seeds (docs/benchmarks.md, "Prompt adherence").
    p.add_argument("--prompts", type=int, default=160, help="prompts per group, seen and held-out (default 160)")
    p.add_argument("--images", type=int, default=2, help="images per prompt and scale (default 2)")
    p.add_argument("--scales", type=_scales, default=list(DEFAULT_SCALES),
                   help="comma-separated condition scales (default " + ",".join(f"{s:g}" for s in DEFAULT_SCALES) + ")")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompt set and the images' seeds (default 0)")
    p.add_argument("--top-k", type=int, help="codes kept at each position (default: the model's, as the app "
                                             "samples; the bundled model's is 3)")
    p.add_argument("--json", help="write the settings, prompts, rows and every image's verdict here")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.images < 1 or (args.top_k is not None and args.top_k < 1):
        p.error("--prompts, --images and --top-k must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    from .engine import Engine

    args = parse_args(argv)
    engine = Engine.from_pretrained(model=args.model, vqgan=args.vqgan, max_images=args.images)
    prompts = prompt_set(args.prompts, args.seed)
    top_k = engine.effective_top_k(args.top_k)
    judged = sample(engine, prompts, args.scales, args.images, args.seed, top_k)
    rows = summarise(judged)
    if args.json:
        result = {
            "settings": {"model": args.model, "vqgan": args.vqgan, "revision": engine.info.revision,
                         "device": engine.info.device, "prompts_per_group": args.prompts,
                         "images_per_prompt": args.images, "scales": args.scales, "seed": args.seed, "top_k": top_k,
                         "default_scale": DEFAULT_CONDITION_SCALE, "resolution": engine.resolution,
                         "measures": list(MEASURES)},
            "prompts": [dataclasses.asdict(p) for p in prompts],
            "rows": rows,
            "images": [dataclasses.asdict(item) for item in judged],
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"top-k {top_k}")
    print(markdown(rows))


if __name__ == "__main__":
    main()
