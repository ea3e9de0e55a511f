"""The adherence measurement (dalle_space.adherence) and its plot: rates from checks, the fixed prompt set,
sampling and judging against a stand-in engine whose pictures are known, the command line on the bundled
tiny model, and the PNG."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image

from dalle_space import adherence
from dalle_space.adherence import MEASURES, Judged, prompt_set, rates, summarise
from dalle_space.judge import Checks, Found, Verdict, check
from dalle_space.sampler import DEFAULT_CONDITION_SCALE
from dalle_space.scenes import COLOURS, HELD_OUT, Scene, Shape, render
from training import data

REPO = Path(__file__).resolve().parent.parent


def _checks(*wrong: str) -> Checks:
    return Checks(**{measure: measure not in wrong for measure in MEASURES})


# --------------------------------------------------------------------------- rates


def test_rates_are_the_fraction_of_checks_passed_per_measure():
    checks = [_checks(), _checks("colour", "all"), _checks("colour", "position", "all"),
              _checks("colour", "shape", "size", "position", "all")]
    assert rates(checks) == {"colour": 0.25, "shape": 0.75, "count": 1.0, "size": 0.75, "position": 0.5, "all": 0.25}


def test_summarise_rates_each_group_and_scale_apart():
    nothing = Verdict("red", ())

    def judged(group, scale, checks):
        return Judged(group, 0, scale, 0, nothing, checks)

    items = [judged("held_out", 3.0, _checks("all")), judged("seen", 3.0, _checks()), judged("seen", 1.0, _checks()),
             judged("seen", 3.0, _checks("count", "all")), judged("held_out", 3.0, _checks("count", "all"))]
    rows = summarise(items)
    assert [(r["group"], r["scale"], r["images"]) for r in rows] == [
        ("seen", 3.0, 2), ("seen", 1.0, 1), ("held_out", 3.0, 2)]
    assert [(r["count"], r["all"], r["shape"]) for r in rows] == [(0.5, 0.5, 1.0), (1.0, 1.0, 1.0), (0.5, 0.0, 1.0)]


# --------------------------------------------------------------------------- prompts


def test_prompt_set_is_fixed_by_its_seed_and_holds_both_kinds_of_pair():
    prompts = prompt_set(6, seed=0)
    assert prompts == prompt_set(6, seed=0)
    assert [p.caption for p in prompts] != [p.caption for p in prompt_set(6, seed=1)]
    assert prompt_set(3, seed=0) == [p for p in prompts if p.group == "seen"][:3] + \
        [p for p in prompts if p.group == "held_out"][:3]  # a larger set keeps the smaller one
    assert [p.group for p in prompts] == ["seen"] * 6 + ["held_out"] * 6
    pairs = {group: {(s.colour, s.kind) for p in prompts if p.group == group for s in p.scene.shapes}
             for group in ("seen", "held_out")}
    assert pairs["seen"] and pairs["seen"].isdisjoint(HELD_OUT)
    assert pairs["held_out"] and pairs["held_out"] <= HELD_OUT
    assert all(p.scene.background in p.caption for p in prompts)
    training_scenes = data.make_scenes(0, 6, 64).scenes  # what training draws from the same seed
    assert {p.scene for p in prompts}.isdisjoint(training_scenes)


def test_the_app_default_scale_is_measured_by_default():
    assert adherence.parse_args([]).scales == list(adherence.DEFAULT_SCALES)
    assert {1.0, DEFAULT_CONDITION_SCALE} <= set(adherence.DEFAULT_SCALES)


# --------------------------------------------------------------------------- sampling


class DrawsWhenGuided:
    """Stands in for an Engine: draws each caption's scene exactly at condition scale 3 and above, and only its
    background below, so every rate the measurement reports is known in advance."""

    def __init__(self, prompts):
        self.scenes = {p.caption: p.scene for p in prompts}
        self.calls = []

    def generate(self, prompts, n_seeds, condition_scale, seed, top_k):
        self.calls.append((tuple(prompts), n_seeds, condition_scale, seed, top_k))
        scene = self.scenes[prompts[0]]
        picture = render(scene, 64) if condition_scale >= 3 else np.full((64, 64, 3), COLOURS[scene.background],
                                                                          np.uint8)
        return types.SimpleNamespace(images=np.stack([picture] * n_seeds),
                                     seeds=tuple(seed + j for j in range(n_seeds)))


def test_sampling_judges_every_image_against_its_own_prompt():
    prompts = prompt_set(2, seed=0)
    engine = DrawsWhenGuided(prompts)
    judged = adherence.sample(engine, prompts, scales=[1.0, 3.0], images=2, seed=7, top_k=5)
    assert engine.calls == [((p.caption,), 2, scale, 7, 5) for scale in (1.0, 3.0) for p in prompts]
    assert [(j.group, j.prompt, j.scale, j.seed) for j in judged] == [
        (p.group, i, scale, 7 + k) for scale in (1.0, 3.0) for i, p in enumerate(prompts) for k in range(2)]
    rows = {(r["group"], r["scale"]): r for r in summarise(judged)}
    for group in ("seen", "held_out"):
        assert rows[group, 3.0] == {"group": group, "scale": 3.0, "images": 4, **{m: 1.0 for m in MEASURES}}
        assert rows[group, 1.0]["count"] == rows[group, 1.0]["all"] == 0.0  # a bare background: no shapes


# --------------------------------------------------------------------------- command line and plot


def test_command_line_writes_the_rows_of_its_judged_images(tmp_path, capsys):
    out = tmp_path / "adherence.json"
    adherence.main(["--prompts", "1", "--images", "1", "--scales", "3,5", "--seed", "5", "--json", str(out)])
    result = json.loads(out.read_text())
    prompts = prompt_set(1, seed=5)
    assert [p["caption"] for p in result["prompts"]] == [p.caption for p in prompts]
    assert result["settings"]["default_scale"] == DEFAULT_CONDITION_SCALE
    assert result["settings"]["top_k"] == 3  # the bundled model's default, as the app samples it
    images = result["images"]
    assert [(i["group"], i["prompt"], i["scale"], i["seed"]) for i in images] == [
        (p.group, n, scale, 5) for scale in (3.0, 5.0) for n, p in enumerate(prompts)]
    for item in images:  # each verdict was checked against its own prompt's scene
        verdict = Verdict(item["verdict"]["background"], tuple(Found(**f) for f in item["verdict"]["shapes"]))
        scene = result["prompts"][item["prompt"]]["scene"]
        scene = Scene(scene["background"], tuple(Shape(**s) for s in scene["shapes"]))
        assert Checks(**item["checks"]) == check(verdict, scene)
    recomputed = summarise(Judged(i["group"], i["prompt"], i["scale"], i["seed"], None, Checks(**i["checks"]))
                           for i in images)
    assert result["rows"] == recomputed and len(recomputed) == 4
    table = capsys.readouterr().out
    assert "top-k 3" in table and "| seen | 3 | 1 |" in table and "| held-out | 5 | 1 |" in table


def test_plot_writes_a_png(tmp_path):
    rows = [{"group": group, "scale": scale, "images": 8, **{m: rate for m in MEASURES}}
            for group, rate in (("seen", 0.8), ("held_out", 0.4)) for scale in (1.0, 3.0, 10.0)]
    settings = {"model": "tiny", "prompts_per_group": 2, "images_per_prompt": 4, "seed": 0,
                "default_scale": DEFAULT_CONDITION_SCALE, "measures": list(MEASURES)}
    source, png = tmp_path / "adherence.json", tmp_path / "adherence.png"
    source.write_text(json.dumps({"settings": settings, "rows": rows}))
    subprocess.run([sys.executable, "benchmarks/plot_adherence.py", str(source), str(png)], cwd=REPO, check=True,
                   timeout=120)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert min(Image.open(png).size) > 300
