"""The page's options reach the sampler, through gradio_client against ``python app.py`` (the bundled tiny
model with random DalleBart weights, conftest's ``untrained_tiny``, so that every setting moves the images): the
seed and "Randomise seed", every sampling setting, the page's examples, and the ``compiled`` flag with the note
the page shows for it."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from dalle_space.engine import Result, Timings

APP = Path(__file__).resolve().parent.parent / "app.py"
BASE = dict(prompt="a red bicycle", condition_scale=10, n_seeds=1, sampler="parallel", seed=7,
            randomize_seed=False, top_k=50, top_p=1.0, temperature=1.0)


@pytest.fixture(scope="module")
def client(launch_app, untrained_tiny) -> Client:
    return Client(launch_app(DALLE_MODEL=str(untrained_tiny)).url, verbose=False)


def generate(client: Client, **changes):
    return client.predict(**{**BASE, **changes}, api_name="/generate")


def pixels(item) -> np.ndarray:
    with Image.open(item["image"]) as picture:
        return np.asarray(picture, dtype=int)


def differ(a: np.ndarray, b: np.ndarray) -> bool:
    """Different images, not rounding: other image tokens move pixels by 30-45 levels on average here."""
    return np.abs(a - b).mean() > 10


def seed_of(item) -> int:
    """The seed in a caption "#1 · seed 42 · prompt"."""
    return int(item["caption"].split(" · ")[1].removeprefix("seed "))


def test_compiled_is_reported_for_a_new_shape_only(client):
    """Two images of one prompt: a shape the app's start-up does not compile. The module's first test, so
    that the shape is new here; later tests of this shape then find it warm."""
    _, first = generate(client, n_seeds=2, seed=1)
    _, again = generate(client, n_seeds=2, seed=2)
    assert first["timings"]["parallel"]["compiled"] is True and first["timings"]["parallel"]["compile_s"] > 0
    assert again["timings"]["parallel"]["compiled"] is False and again["timings"]["parallel"]["compile_s"] == 0


@pytest.fixture(scope="module")
def base(client):
    images, _ = generate(client)
    return pixels(images[0])


def test_randomised_seeds_differ_and_the_returned_one_reproduces_the_image(client):
    first, first_info = generate(client, randomize_seed=True, seed=0)
    second, second_info = generate(client, randomize_seed=True, seed=0)
    assert first_info["seed"] != second_info["seed"]
    assert seed_of(first[0]) == first_info["seed"] and seed_of(second[0]) == second_info["seed"]
    again, again_info = generate(client, randomize_seed=False, seed=first_info["seed"])
    assert again_info["seed"] == first_info["seed"]
    np.testing.assert_array_equal(pixels(again[0]), pixels(first[0]))
    assert differ(pixels(second[0]), pixels(first[0]))


def test_a_given_seed_is_used_and_image_j_has_seed_plus_j(client):
    images, summary = generate(client, seed=1234, n_seeds=2)
    assert summary["seed"] == 1234 and [seed_of(item) for item in images] == [1234, 1235]
    alone, _ = generate(client, seed=1235)
    # The VQGAN's convolutions may round differently by batch size: pixels may differ by one level.
    assert np.abs(pixels(images[1]) - pixels(alone[0])).max() <= 1
    assert differ(pixels(images[0]), pixels(images[1]))


@pytest.mark.parametrize("changes", [dict(condition_scale=3), dict(temperature=0.5), dict(top_k=5),
                                     dict(top_p=0.3), dict(seed=8)], ids=repr)
def test_every_sampling_setting_reaches_the_sampler(client, base, changes):
    images, _ = generate(client, **changes)
    assert differ(pixels(images[0]), base)


def test_samplers_draw_the_same_image(client, base):
    images, summary = generate(client, sampler="serial")
    assert set(summary["timings"]) == {"serial"}
    np.testing.assert_array_equal(pixels(images[0]), base)


def _examples() -> list[list]:
    """app.EXAMPLES, read from the source: importing app would load a second engine here. The page shows them
    for any model but the bundled one (test_app_api.py checks that one's)."""
    tree = ast.parse(APP.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "EXAMPLES")
    return ast.literal_eval(node.value)


@pytest.mark.parametrize("example", _examples(), ids=lambda example: example[0][:24])
def test_every_example_on_the_page_runs(client, example):
    prompt, condition_scale, n_seeds, sampler = example
    images, summary = generate(client, prompt=prompt, condition_scale=condition_scale, n_seeds=n_seeds,
                               sampler=sampler)
    prompts = prompt.splitlines()
    assert [item["caption"].split(" · ")[2] for item in images] == [p for p in prompts for _ in range(n_seeds)]
    assert set(summary["timings"]) == ({"serial", "parallel"} if sampler == "compare" else {sampler})
    if sampler == "compare":
        assert summary["identical_images"] is True


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def app_module(monkeypatch_module):
    """app.py imported here (it loads the tiny engine), for what the page shows but no endpoint returns."""
    monkeypatch_module.setenv("DALLE_MODEL", "tiny")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.syspath_prepend(str(APP.parent))
    return importlib.import_module("app")


def _result(mode: str, compile_s: float, tokens) -> Result:
    timings = Timings(tokenize_s=0.01, encode_s=0.1, sample_s=1.0, vqgan_s=0.1, compile_s=compile_s,
                      total_s=2.0, per_image_s=2.0, compiled=compile_s > 0)
    return Result(images=np.zeros((1, 64, 64, 3), np.uint8), tokens=np.asarray([tokens]), prompts=("a cat",),
                  prompt_index=(0,), seeds=(3,), mode=mode, notices=(), timings=timings)


def test_the_compile_note_names_only_the_samplers_that_compiled(app_module):
    request = app_module.Request(prompts=["a cat"], n_seeds=1, condition_scale=10.0, modes=("serial", "parallel"),
                                 seed=3, top_k=50, top_p=None, temperature=1.0)
    warm = app_module._outcome(request, [_result("serial", 0.0, [1, 2]), _result("parallel", 0.0, [1, 2])])
    assert "Compiled code" not in warm.markdown
    assert warm.summary["identical_images"] is True
    cold = app_module._outcome(request, [_result("serial", 0.0, [1, 2]), _result("parallel", 0.75, [1, 3])])
    assert ("Compiled code for a new batch shape (0.75 s parallel, counted in the stages above); "
            "later requests of this shape reuse it.") in cold.markdown
    assert cold.summary["identical_images"] is False
    assert "Both samplers drew different images." in cold.markdown
