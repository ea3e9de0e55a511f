"""Gradio front end: text to images with DALL·E mini / mega, serial versus parallel super-conditioning.

UI only. Sampling, compilation and timing live in ``dalle_space.engine``; this module checks requests
against the page's limits, runs them one at a time and shows the images and where the time went.
"""

from __future__ import annotations

import math
import os
import queue
import random
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import gradio as gr
import numpy as np

from dalle_space.engine import MAX_SEED, Result, load_engine

MAX_PROMPTS = 4
MAX_WAITING = 16  # requests the queue holds beyond the running one; gradio refuses the rest itself
SCALE_RANGE = (1.0, 20.0)
TOP_K_RANGE = (1, 16384)  # up to the VQGAN codebook size: "keep every code"
TOP_P_RANGE = (0.01, 1.0)
TEMPERATURE_RANGE = (0.1, 2.0)

# Radio choices as (label, value); the value is what API clients send.
SAMPLERS = [("Parallel", "parallel"), ("Serial", "serial"), ("Compare both", "compare")]
MODES = {"parallel": ("parallel",), "serial": ("serial",), "compare": ("serial", "parallel")}

TIMING_ROWS = [
    ("tokenize", "tokenize_s"),
    ("encode", "encode_s"),
    ("sample", "sample_s"),
    ("VQGAN", "vqgan_s"),
    ("compile", "compile_s"),
    ("total", "total_s"),
    ("s / image", "per_image_s"),
]

EXAMPLES = [
    ["a red bicycle leaning against a brick wall", 10, 2, "compare"],
    ["sunset over snowy mountains, oil painting", 10, 1, "parallel"],
    ["an armchair in the shape of an avocado\na lighthouse on a cliff at night", 7.5, 1, "serial"],
]

CSS = ".fallback-banner { background: #fff3cd; border: 1px solid #e0b100; border-radius: 8px; padding: 0 12px; }"

engine = load_engine(os.environ.get("DALLE_MODEL", "mini"), os.environ.get("DALLE_DTYPE", "float32"),
                     revision=os.environ.get("DALLE_REVISION") or None)
engine.warmup()
_engine_lock = threading.Lock()  # a cancelled request's worker may still be sampling
SEED_RANGE = (0, MAX_SEED - engine.max_images)  # leaves room for seed + j on every image


@dataclass(frozen=True)
class Request:
    """A checked request: everything the engine needs, in the engine's types."""

    prompts: list[str]
    n_seeds: int
    condition_scale: float
    modes: tuple[str, ...]
    seed: int
    top_k: int
    top_p: float | None
    temperature: float


@dataclass(frozen=True)
class Outcome:
    """What a finished request shows: gallery items, the timings table and its JSON twin."""

    gallery: list[tuple[np.ndarray, str]]
    markdown: str
    summary: dict[str, Any]


def _user_error(message: str) -> gr.Error:
    # The person made a mistake, not the server: no traceback in the log either.
    return gr.Error(message, print_exception=False)


def _number(value: Any, name: str, bounds: tuple[float, float], whole: bool = False) -> float:
    """Check one numeric input. Handlers run with preprocess=False, so API clients' raw values
    (strings, None, NaN) arrive here and get a message naming the field, not gradio's generic one."""
    low, high = bounds
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _user_error(f"{name} must be a number, not {value!r}.") from None
    if not math.isfinite(number):
        raise _user_error(f"{name} must be a finite number, not {value}.")
    if whole and not number.is_integer():
        raise _user_error(f"{name} must be a whole number, not {value}.")
    if not low <= number <= high:
        raise _user_error(f"{name} must be between {low:g} and {high:g}, not {number:g}.")
    return number


def _prompts(text: Any) -> list[str]:
    """One prompt per non-blank line."""
    if not isinstance(text, str):
        raise _user_error("The prompt must be text.")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise _user_error("Please enter a prompt: a few words describing the picture you want.")
    if len(prompts) > MAX_PROMPTS:
        raise _user_error(
            f"You entered {len(prompts)} prompts; one request takes at most {MAX_PROMPTS} (one per line)."
        )
    return prompts


def parse_request(prompt, condition_scale, n_seeds, sampler, seed, randomize_seed, top_k, top_p,
                  temperature) -> Request:
    """Turn raw input values into a Request, or raise gr.Error with a sentence saying what to change."""
    prompts = _prompts(prompt)
    n_seeds = int(_number(n_seeds, "Images per prompt", (1, engine.max_images), whole=True))
    if len(prompts) * n_seeds > engine.max_images:
        raise _user_error(
            f"That asks for {len(prompts) * n_seeds} images ({len(prompts)} prompts × {n_seeds} each), "
            f"but one request makes at most {engine.max_images}; use fewer prompts or fewer images per prompt."
        )
    if sampler not in MODES:
        raise _user_error(f"Sampler must be one of {', '.join(map(repr, MODES))}, not {sampler!r}.")
    if randomize_seed:
        seed = random.randint(*SEED_RANGE)
    else:
        seed = int(_number(seed, "Seed", SEED_RANGE, whole=True))
    top_p = _number(top_p, "Top-p", TOP_P_RANGE)
    return Request(
        prompts=prompts,
        n_seeds=n_seeds,
        condition_scale=_number(condition_scale, "Condition scale", SCALE_RANGE),
        modes=MODES[sampler],
        seed=seed,
        top_k=int(_number(top_k, "Top-k", TOP_K_RANGE, whole=True)),
        top_p=None if top_p == 1 else top_p,  # 1 keeps every token: skip the filter
        temperature=_number(temperature, "Temperature", TEMPERATURE_RANGE),
    )


def _in_worker(call: Callable[[Callable], Result]) -> Iterator[tuple[int, int, np.ndarray | None] | Result]:
    """Run a blocking engine call in a thread and yield its progress updates, then its result, so a
    generator handler can show previews while the engine samples."""
    events: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            with _engine_lock:
                events.put(call(lambda *update: events.put(update)))
        except Exception as exc:  # handed to the request's own thread, which raises it
            events.put(exc)

    threading.Thread(target=work, daemon=True).start()
    while True:
        event = events.get()
        if isinstance(event, Exception):
            raise event
        yield event
        if isinstance(event, Result):
            return


def _captions(prompts, seeds) -> list[str]:
    return [f"#{i + 1} · seed {seed} · {prompt}" for i, (prompt, seed) in enumerate(zip(prompts, seeds))]


def _preview_gallery(request: Request, images: np.ndarray) -> list[tuple[np.ndarray, str]]:
    prompts = [p for p in request.prompts for _ in range(request.n_seeds)]
    seeds = [request.seed + j for _ in request.prompts for j in range(request.n_seeds)]
    return list(zip(images, [f"{c} (preview)" for c in _captions(prompts, seeds)]))


def _steady_seconds(result: Result) -> float:
    """Wall time without compilation, which the engine counts inside the stage it delayed."""
    return result.timings.total_s - result.timings.compile_s


def _speedup(results: list[Result]) -> float:
    """How many times faster the parallel request ran than the serial one, compilation taken out,
    so a first request of a new shape compares samplers rather than compilers."""
    by_mode = {r.mode: _steady_seconds(r) for r in results}
    return by_mode["serial"] / max(by_mode["parallel"], 1e-9)


def _speedup_sentence(results: list[Result], speedup: float) -> str:
    faster = f"**Parallel is {speedup:.1f}× faster**" if speedup >= 1 else f"**Serial is {1 / speedup:.1f}× faster**"
    steady = " vs ".join(f"{_steady_seconds(r):.3g} s {r.mode}" for r in results)
    return f"{faster} (total without compilation: {steady})."


def _timings_markdown(results: list[Result], summary: dict[str, Any]) -> str:
    """A table with one column per sampler, then the speed-up, compile and notice lines."""
    table = [
        "| stage | " + " | ".join(r.mode for r in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for label, field in TIMING_ROWS:
        table.append(f"| {label} | " + " | ".join(f"{getattr(r.timings, field):.3g} s" for r in results) + " |")
    notes = []
    if "parallel_speedup" in summary:
        same = "identical" if summary["identical_images"] else "different"
        notes.append(f"{_speedup_sentence(results, summary['parallel_speedup'])} Both samplers drew {same} images.")
    compiled = [f"{r.timings.compile_s:.3g} s {r.mode}" for r in results if r.timings.compiled]
    if compiled:
        notes.append(f"Compiled code for a new batch shape ({', '.join(compiled)}, counted in the stages above); "
                     "later requests of this shape reuse it.")
    notes += [f"⚠️ {notice}" for notice in summary["notices"]]
    return "\n\n".join(["\n".join(table), *notes])


def _outcome(request: Request, results: list[Result]) -> Outcome:
    """Gallery, table and JSON for finished results; in compare mode the (identical) images are shown once."""
    final = results[-1]
    summary: dict[str, Any] = {
        "seed": request.seed,
        "images": len(final.images),
        "timings": {r.mode: r.timings.as_dict() for r in results},
        "notices": list(dict.fromkeys(n for r in results for n in r.notices)),
    }
    if len(results) > 1:
        summary["parallel_speedup"] = round(_speedup(results), 3)
        summary["identical_images"] = bool(np.array_equal(results[0].tokens, results[1].tokens))
    gallery = list(zip(final.images, _captions(final.prompts, final.seeds)))
    return Outcome(gallery, _timings_markdown(results, summary), summary)


def run_request(request: Request, progress: gr.Progress, previews: bool) -> Iterator[list | Outcome]:
    """Sample with each of the request's modes in turn; yields preview galleries (when asked for)
    while sampling, and lastly the Outcome. Shared by the page and both API endpoints."""
    results = []
    for step, mode in enumerate(request.modes, 1):
        label = f"{mode}, {step} of {len(request.modes)}" if len(request.modes) > 1 else mode
        call = lambda on_progress, mode=mode: engine.generate(  # noqa: E731
            request.prompts,
            n_seeds=request.n_seeds,
            condition_scale=request.condition_scale,
            mode=mode,
            seed=request.seed,
            top_k=request.top_k,
            top_p=request.top_p,
            temperature=request.temperature,
            progress=on_progress,
            preview=previews,
        )
        try:
            for event in _in_worker(call):
                if isinstance(event, Result):
                    results.append(event)
                    continue
                done, total, images = event
                progress((done, total), desc=f"Sampling ({label})", unit="tokens")
                if previews and images is not None:
                    yield _preview_gallery(request, images)
        except ValueError as exc:  # the engine's own argument checks: a sentence for the person
            raise _user_error(str(exc)) from None
    yield _outcome(request, results)


def generate_page(prompt, condition_scale, n_seeds, sampler, seed, randomize_seed, top_k, top_p, temperature,
                  previews, progress=gr.Progress()):
    """The page's Generate button: previews as they come, then images, table, JSON and the seed used."""
    request = parse_request(prompt, condition_scale, n_seeds, sampler, seed, randomize_seed, top_k, top_p, temperature)
    for item in run_request(request, progress, previews=bool(previews)):
        if isinstance(item, Outcome):
            yield item.gallery, item.markdown, item.summary, request.seed
        else:
            yield item, gr.skip(), gr.skip(), gr.skip()


def generate(prompt, condition_scale, n_seeds, sampler, seed, randomize_seed, top_k, top_p, temperature,
             progress=gr.Progress()):
    """Generate images from one prompt per line with the "parallel" or "serial" sampler, or "compare"
    to run both. Returns the images (captioned with index, seed and prompt) and timings as JSON."""
    request = parse_request(prompt, condition_scale, n_seeds, sampler, seed, randomize_seed, top_k, top_p, temperature)
    *_, outcome = run_request(request, progress, previews=False)
    return outcome.gallery, outcome.summary


def compare(prompt, condition_scale, n_seeds, seed, randomize_seed, top_k, top_p, temperature,
            progress=gr.Progress()):
    """Generate with the serial sampler, then the parallel one, from the same seed. Returns the images
    and both samplers' timings as JSON with parallel_speedup: serial over parallel time, compilation excluded."""
    return generate(prompt, condition_scale, n_seeds, "compare", seed, randomize_seed, top_k, top_p, temperature,
                    progress)


def _model_line() -> str:
    info = engine.info
    return (
        f"Model **{info.model}** · revision `{info.revision or 'unpinned'}` · {info.dtype} · {info.device}"
        f" · {engine.resolution}×{engine.resolution} px · at most {engine.max_images} images per request"
    )


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="DALL·E mini: serial vs parallel super-conditioning") as demo:
        gr.Markdown(
            "# DALL·E mini: serial vs parallel super-conditioning\n"
            "Super-conditioning mixes a prompt-conditioned and an unconditioned pass at every token. "
            "*Serial* runs the two passes one after the other; *parallel* batches them into one. "
            "Both draw the same images from the same seed; only the time differs."
        )
        if engine.info.fallback_notice:
            gr.Markdown(f"⚠️ **{engine.info.fallback_notice}**", elem_classes="fallback-banner")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(
                    label="Prompts",
                    info=f"One per line, up to {MAX_PROMPTS}.",
                    placeholder="a red bicycle leaning against a brick wall",
                    lines=3,
                )
                condition_scale = gr.Slider(*SCALE_RANGE, value=10, step=0.5, label="Condition scale")
                n_seeds = gr.Slider(1, engine.max_images, value=1, step=1, label="Images per prompt")
                sampler = gr.Radio(SAMPLERS, value="parallel", label="Sampler")
                with gr.Accordion("Advanced", open=False):
                    seed = gr.Number(0, label="Seed", precision=0, minimum=SEED_RANGE[0], maximum=SEED_RANGE[1])
                    randomize_seed = gr.Checkbox(True, label="Randomise seed")
                    top_k = gr.Number(50, label="Top-k", precision=0, minimum=TOP_K_RANGE[0], maximum=TOP_K_RANGE[1])
                    top_p = gr.Slider(*TOP_P_RANGE, value=1.0, step=0.01, label="Top-p", info="1 keeps every token.")
                    temperature = gr.Slider(*TEMPERATURE_RANGE, value=1.0, step=0.05, label="Temperature")
                    previews = gr.Checkbox(False, label="Progressive previews")
                run = gr.Button("Generate", variant="primary")
            with gr.Column():
                gallery = gr.Gallery(label="Images", columns=2, fit_columns=False, format="png", elem_id="gallery")
                timings = gr.Markdown(label="Timings", elem_id="timings")
                with gr.Accordion("Timings as JSON", open=False):
                    timings_json = gr.JSON(label="Timings (JSON)")
        gr.Markdown(_model_line(), elem_id="model-line")
        gr.Examples(EXAMPLES, inputs=[prompt, condition_scale, n_seeds, sampler], cache_examples=False)

        # One sampling job at a time across the page and the API; values arrive raw (preprocess=False)
        # so parse_request can name the field in every message.
        shared = dict(concurrency_limit=1, concurrency_id="sampler", preprocess=False)
        request_inputs = [prompt, condition_scale, n_seeds, sampler, seed, randomize_seed, top_k, top_p, temperature]
        run.click(generate_page, [*request_inputs, previews], [gallery, timings, timings_json, seed],
                  show_progress_on=gallery, api_visibility="private", **shared)
        # API-only endpoints: hidden buttons give them the page's components (and so files for images).
        gr.Button("generate", visible=False).click(
            generate, request_inputs, [gallery, timings_json], api_name="generate", **shared
        )
        gr.Button("compare", visible=False).click(
            compare, [i for i in request_inputs if i is not sampler], [gallery, timings_json], api_name="compare",
            **shared,
        )
    return demo


demo = build_demo()

if __name__ == "__main__":
    demo.queue(max_size=MAX_WAITING).launch(css=CSS)  # host and port: GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
