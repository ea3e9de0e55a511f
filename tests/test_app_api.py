"""The app's public API, through gradio_client against ``python app.py`` serving the bundled tiny model."""

from __future__ import annotations

import ast
import importlib
import json
import time
import urllib.request
from concurrent.futures import wait
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError, Status
from PIL import Image

from dalle_space import bundled
from dalle_space.sampler import sampler_mode

TINY_RESOLUTION = 64
TIMING_FIELDS = {"tokenize_s", "encode_s", "sample_s", "vqgan_s", "compile_s", "total_s", "per_image_s", "compiled"}
APP = Path(__file__).resolve().parent.parent / "app.py"
COLD_START_LIMIT_S = 60  # expected under 30 s on a 2-core CPU; headroom for noisy CI machines
QUEUE_MAX_SIZE = 16  # app.MAX_WAITING

GOOD = dict(
    prompt="a red bicycle", condition_scale=10, n_seeds=1, sampler="parallel", seed=7,
    randomize_seed=False, top_k=50, top_p=1.0, temperature=1.0,
)


@pytest.fixture(scope="module")
def first_request(app_server):
    """The shared server's very first /generate (conftest's FIRST_REQUEST), timed from process spawn."""
    return app_server.first_request


@pytest.fixture(scope="module")
def client(first_request) -> Client:
    return first_request.client


@pytest.fixture(scope="module")
def max_images(client) -> int:
    """engine.max_images, read from the page: the images-per-prompt slider's maximum."""
    sliders = [c for c in client.config["components"]
               if c["type"] == "slider" and c.get("props", {}).get("label") == "Images per prompt"]
    assert len(sliders) == 1, "the page should have exactly one 'Images per prompt' slider"
    return int(sliders[0]["props"]["maximum"])


def generate(client: Client, api_name: str = "/generate", **changes):
    args = {**GOOD, **changes}
    if api_name == "/compare":
        args.pop("sampler")
    return client.predict(**args, api_name=api_name)


def test_cold_start_and_first_request_fit_the_budget(first_request):
    print(f"\ncold start + first tiny /generate: {first_request.seconds_since_spawn:.1f} s")
    assert first_request.seconds_since_spawn < COLD_START_LIMIT_S
    assert len(first_request.images) == 1


def test_generate_returns_the_asked_images_and_every_timing(client):
    images, summary = generate(client, prompt="a red bicycle\na blue boat", n_seeds=2)
    assert len(images) == 4
    for item in images:
        with Image.open(item["image"]) as picture:
            assert picture.size == (TINY_RESOLUTION, TINY_RESOLUTION)
            assert picture.mode == "RGB"
    captions = [item["caption"] for item in images]
    assert captions == [
        "#1 · seed 7 · a red bicycle", "#2 · seed 8 · a red bicycle",
        "#3 · seed 7 · a blue boat", "#4 · seed 8 · a blue boat",
    ]
    assert summary["seed"] == 7 and summary["images"] == 4
    assert set(summary["timings"]) == {"parallel"}
    assert TIMING_FIELDS <= set(summary["timings"]["parallel"])
    assert summary["timings"]["parallel"]["total_s"] > 0


def test_serial_sampler_is_selectable(client):
    _, summary = generate(client, sampler="serial")
    assert set(summary["timings"]) == {"serial"}


def test_compare_reports_both_samplers_and_the_speedup(client):
    images, summary = generate(client, "/compare", n_seeds=2)
    assert len(images) == 2
    serial, parallel = summary["timings"]["serial"], summary["timings"]["parallel"]
    assert TIMING_FIELDS <= set(serial) and TIMING_FIELDS <= set(parallel)
    steady = {name: t["total_s"] - t["compile_s"] for name, t in (("serial", serial), ("parallel", parallel))}
    assert summary["parallel_speedup"] == pytest.approx(steady["serial"] / steady["parallel"], rel=0.01)
    assert summary["identical_images"] is True


def test_random_seed_is_reported_and_reproducible(client):
    images, summary = generate(client, randomize_seed=True, seed=0)
    again, _ = generate(client, seed=summary["seed"])
    assert f"seed {summary['seed']} ·" in images[0]["caption"]
    with Image.open(images[0]["image"]) as first, Image.open(again[0]["image"]) as second:
        assert first.tobytes() == second.tobytes()


def test_every_picture_is_a_file_of_its_own_that_says_what_made_it(client):
    """The same request twice at once, each with the same picture twice (a prompt the bundled model does not know
    draws one plain picture whatever the seed). Gradio caches a picture under its bytes and rewrites a file of
    equal bytes in place, cutting short a concurrent download of it; so every picture's file must differ, while
    its pixels stay what the seed draws."""
    request = {**GOOD, "prompt": "a plain request", "n_seeds": 2, "condition_scale": 3}
    jobs = [client.submit(**request, api_name="/generate") for _ in range(2)]
    pictures = [(item, Image.open(item["image"])) for job in jobs for item in job.result(timeout=120)[0]]
    for (item, picture), seed in zip(pictures, [7, 8, 7, 8]):
        assert picture.text["prompt"] == "a plain request" and picture.text["seed"] == str(seed)
        assert (picture.text["condition_scale"], picture.text["top_k"], picture.text["model"]) == ("3", "50", "tiny")
        assert item["caption"].startswith(f"#{1 + (seed - 7)} · seed {seed}")
    assert len({picture.text["image_id"] for _, picture in pictures}) == 4
    assert len({Path(item["image"]).parent.name for item, _ in pictures}) == 4, "two pictures shared a cached file"
    assert pictures[0][1].tobytes() == pictures[2][1].tobytes()


def test_same_shape_again_does_not_recompile(client):
    generate(client, prompt="a cat\na dog", n_seeds=2, seed=1)
    _, summary = generate(client, prompt="a fox\nan owl", n_seeds=2, seed=2)
    assert summary["timings"]["parallel"]["compiled"] is False


BAD_INPUTS = [
    (dict(prompt=""), "Please enter a prompt"),
    (dict(prompt="  \n\t\n"), "Please enter a prompt"),
    (dict(prompt=None), "The prompt must be text."),
    (dict(prompt="a\nb\nc\nd\ne"), "You entered 5 prompts; one request takes at most 4"),
    (dict(n_seeds=0), "Images per prompt must be between 1 and"),
    (dict(n_seeds=1.5), "Images per prompt must be a whole number"),
    (dict(condition_scale="NaN"), "Condition scale must be a finite number"),
    (dict(condition_scale="inf"), "Condition scale must be a finite number"),
    (dict(condition_scale=-1), "Condition scale must be between 1 and 20, not -1."),
    (dict(condition_scale=21), "Condition scale must be between 1 and 20, not 21."),
    (dict(condition_scale="ten"), "Condition scale must be a number between 1 and 20, not 'ten'."),
    (dict(sampler="fastest"), "Sampler must be one of 'parallel', 'serial', 'compare'"),
    (dict(seed=-1), "Seed must be between 0 and"),
    (dict(top_k=0), "Top-k must be between 1 and 16384, not 0."),
    (dict(top_k=2.5), "Top-k must be a whole number"),
    (dict(top_p=0), "Top-p must be between 0.01 and 1, not 0."),
    (dict(top_p=1.5), "Top-p must be between 0.01 and 1, not 1.5."),
    (dict(temperature=0), "Temperature must be between 0.1 and 2, not 0."),
]


@pytest.mark.parametrize("changes, message", BAD_INPUTS, ids=[repr(c) for c, _ in BAD_INPUTS])
def test_bad_input_gets_a_readable_error(client, changes, message):
    with pytest.raises(AppError) as raised:
        generate(client, **changes)
    assert message in str(raised.value)
    assert "Traceback" not in str(raised.value)


def test_too_many_images_in_total_is_refused(client, max_images):
    with pytest.raises(AppError, match=f"That asks for {2 * max_images} images .* at most {max_images}"):
        generate(client, prompt="a cat\na dog", n_seeds=max_images)


def test_compare_validates_too(client):
    with pytest.raises(AppError, match="Please enter a prompt"):
        generate(client, "/compare", prompt="")


def test_nan_over_plain_http_is_refused(app_server):
    """gradio_client refuses to send NaN, but JSON from other clients can carry it."""
    body = '{"data": ["a cat", NaN, 1, "parallel", 0, false, 50, 1.0, 1.0]}'.encode()
    post = urllib.request.Request(
        app_server.url + "gradio_api/call/generate", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(post, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{app_server.url}gradio_api/call/generate/{event_id}", timeout=60) as stream:
        events = stream.read().decode()
    assert "event: error" in events
    assert "Condition scale must be a finite number between 1 and 20, not nan." in events


def test_a_request_after_a_failed_one_succeeds(client):
    with pytest.raises(AppError):
        generate(client, prompt="")
    images, summary = generate(client)
    assert len(images) == 1 and summary["images"] == 1


def test_a_full_queue_is_refused_by_gradio_and_the_app_recovers(client, max_images):
    blocker = client.submit(**{**GOOD, "n_seeds": max_images}, api_name="/generate")
    deadline = time.monotonic() + 60
    while blocker.status().code not in (Status.PROCESSING, Status.PROGRESS, Status.FINISHED):
        assert time.monotonic() < deadline, "the first job never started"
        time.sleep(0.05)
    # The same request every time: the same picture, downloaded by several clients at once.
    waiting = [client.submit(**GOOD, api_name="/generate") for _ in range(QUEUE_MAX_SIZE + 2)]
    wait([blocker.future, *(job.future for job in waiting)], timeout=300)

    refused = [job for job in waiting if isinstance(job.exception(), QueueError)]
    served = [job for job in waiting if job.exception() is None]
    assert refused, "the queue took more than its max_size"
    assert all("Queue is full" in str(job.exception()) for job in refused)
    assert len(refused) + len(served) == len(waiting), "\n".join(repr(job.exception()) for job in waiting)
    assert len(blocker.result()[0]) == max_images
    images, _ = generate(client)
    assert len(images) == 1


def test_engine_value_errors_reach_the_person_as_gr_error(monkeypatch):
    """The engine's own argument checks sit behind the app's; should one fire, its sentence is shown."""
    monkeypatch.setenv("DALLE_MODEL", "tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(APP.parent))
    app = importlib.import_module("app")

    def refuse(*args, **kwargs):
        raise ValueError("The seed must be a whole number from 0 to 9, not 12.")

    monkeypatch.setattr(app.engine, "generate", refuse)
    with pytest.raises(gr.Error) as raised:
        list(app.generate(**GOOD))
    assert raised.value.message == "The seed must be a whole number from 0 to 9, not 12."


def test_an_abandoned_request_stops_its_worker_at_the_next_progress_report(monkeypatch):
    """Gradio closes the generator of a cancelled or disconnected request: the worker raises at its next
    report and releases the engine, rather than sampling to the end for nobody."""
    monkeypatch.setenv("DALLE_MODEL", "tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(APP.parent))
    app = importlib.import_module("app")
    reports = []

    def long_call(report):
        for chunk in range(1000):
            time.sleep(0.01)
            report(chunk)
            reports.append(chunk)
        return "finished"

    worker = app._in_worker(long_call)
    assert next(worker) == (0,)
    worker.close()  # what gradio does to an abandoned request's generator
    assert app._engine_lock.acquire(timeout=5), "the abandoned worker kept the engine"
    app._engine_lock.release()
    assert len(reports) < 5


def test_app_is_ui_only_and_never_imports_jax():
    tree = ast.parse(APP.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.split(".")[0] in {"jax", "jaxlib", "flax"}}


def test_unreachable_hub_falls_back_to_tiny_and_says_so_on_the_page(fallback_server):
    """Also: a machine that shows an NVIDIA GPU (the fallback app has a stand-in nvidia-smi) while JAX runs on the
    CPU is named."""
    components = Client(fallback_server.url, verbose=False).config["components"]
    banners = [c for c in components if "fallback-banner" in (c.get("props", {}).get("elem_classes") or [])]
    assert len(banners) == 2, "a banner is missing from the page"
    assert "could not be downloaded" in banners[0]["props"]["value"] and bundled.DRAWS in banners[0]["props"]["value"]
    assert "NVIDIA GPU but JAX samples on the CPU" in banners[1]["props"]["value"]
    model_line = next(c for c in components if c.get("props", {}).get("elem_id") == "model-line")
    assert "Model **tiny**" in model_line["props"]["value"]


def test_no_fallback_banner_when_the_model_loads(client):
    assert not [c for c in client.config["components"]
                if "fallback-banner" in (c.get("props", {}).get("elem_classes") or [])]


def test_the_tiny_models_page_offers_prompts_in_its_vocabulary(client):
    """It knows only its training scenes' words: its examples and the placeholder are said in them."""
    components = client.config["components"]
    examples = next(c for c in components if c["type"] == "dataset")["props"]["samples"]
    assert [line for example in examples for line in example[0].splitlines()] == list(bundled.PROMPTS)
    prompt = next(c for c in components if c["props"].get("label") == "Prompts")
    assert prompt["props"]["placeholder"] == bundled.PROMPTS[0]


def test_the_tiny_models_page_samples_at_its_own_top_k_by_default(client):
    """Its config.json's top-k (3) is the field's starting value, said beside it, and what a gradio_client
    call that leaves top-k out samples with."""
    field = next(c for c in client.config["components"] if c["props"].get("label") == "Top-k")
    assert field["props"]["value"] == 3 and field["props"]["info"] == "3 is this model's default."
    request = {name: value for name, value in GOOD.items() if name != "top_k"}
    images, _ = client.predict(**request, api_name="/generate")
    assert Image.open(images[0]["image"]).text["top_k"] == "3"


def test_every_example_on_the_tiny_models_page_runs(client):
    examples = next(c for c in client.config["components"] if c["type"] == "dataset")["props"]["samples"]
    for prompt, condition_scale, n_seeds, sampler in examples:
        changes = dict(prompt=prompt, condition_scale=condition_scale, n_seeds=n_seeds)
        if sampler == "compare":
            images, summary = generate(client, "/compare", **changes)
        else:
            images, summary = generate(client, sampler=sampler, **changes)
        assert len(images) == n_seeds * len(prompt.splitlines()), prompt
        modes = ("parallel", "serial") if sampler == "compare" else (sampler,)
        assert set(summary["timings"]) == {sampler_mode(mode, condition_scale) for mode in modes}


# ------------------------------------------------------------------------------------------------
# The experiment: scale 1 and the Benchmark tab's endpoint

BENCHMARK_LIMIT_S = 60


def test_compare_at_scale_one_runs_one_sampler_and_says_why(client):
    images, summary = generate(client, "/compare", condition_scale=1)
    assert len(images) == 1
    assert set(summary["timings"]) == {"conditional"}
    assert "parallel_speedup" not in summary
    assert any("nothing to compare" in notice for notice in summary["notices"])


def test_benchmark_returns_rows_for_both_samplers_and_every_batch(client):
    start = time.monotonic()
    result = client.predict(images=[1, 2], condition_scale=3, repeats=1, fit_limit=0, api_name="/benchmark")
    assert time.monotonic() - start < BENCHMARK_LIMIT_S
    assert {(row["mode"], row["images"]) for row in result["rows"]} == {
        (mode, n) for mode in ("serial", "parallel") for n in (1, 2)}
    for row in result["rows"]:
        assert row["s_per_call"] > 0 and row["s_per_image"] == pytest.approx(row["s_per_call"] / row["images"])
        assert row["memory_mib"] > 0 and row["memory_per_image_mib"] > 0
        assert 0 < row["floor_s"] < row["s_per_call"] and row["floor_fraction"] == pytest.approx(
            row["floor_s"] / row["s_per_call"])
    assert [s["images"] for s in result["speedups"]] == [1, 2]
    assert result["bandwidth_gbs"] > 0
    assert result["products_per_step"]["serial"] > result["products_per_step"]["parallel"]


def test_benchmark_at_scale_one_runs_the_conditional_sampler_and_searches_the_largest_batch(client, max_images):
    result = client.predict(images=[1], condition_scale=1, repeats=1, fit_limit=4, api_name="/benchmark")
    assert [row["mode"] for row in result["rows"]] == ["conditional"]
    assert result["largest_fit"] == {"conditional": 4} and result["fit_limit"] == 4


BAD_BENCHMARKS = [
    (dict(images=[]), "Images per prompt: pick at least one of 1, 2, 4"),
    (dict(images=[0]), "Images per prompt must be between 1 and"),
    (dict(images=["two"]), "Images per prompt must be a whole number between 1 and 16, not 'two'."),
    (dict(condition_scale=0), "Condition scale must be between 1 and 20, not 0."),
    (dict(repeats=9), "Timed calls per row must be between 1 and 5, not 9."),
    (dict(fit_limit=10_000), "Search the largest batch up to must be between 0 and 256, not 10000."),
]


@pytest.mark.parametrize("changes, message", BAD_BENCHMARKS, ids=[repr(c) for c, _ in BAD_BENCHMARKS])
def test_bad_benchmark_settings_get_a_readable_error(client, changes, message):
    settings = {"images": [1], "condition_scale": 3, "repeats": 1, "fit_limit": 0, **changes}
    with pytest.raises(AppError) as raised:
        client.predict(**settings, api_name="/benchmark")
    assert message in str(raised.value)
