"""Gradio front end: text to images with DALL·E mini / mega, serial versus parallel super-conditioning.

UI only. Sampling, compilation and timing live in ``dalle_space.engine``; this module checks requests
against the page's limits, runs them one at a time and shows the images and where the time went.
"""

from __future__ import annotations

import math
import os
import queue
import random
import re
import threading
import time
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import gradio as gr
import numpy as np
import pandas as pd
from gradio.utils import get_upload_folder
from gradio_client import utils as client_utils
from PIL import Image, PngImagePlugin

from dalle_space import bundled, experiment
from dalle_space.engine import MAX_SEED, Result, load_engine
from dalle_space.sampler import DEFAULT_CONDITION_SCALE, sampler_mode


def _parse_number(value: Any) -> float | None:
    """A raw value (a client's input or a host's setting) as a float, None where it is none; a boolean is not
    a number here, though Python would read it as one."""
    try:
        return None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _env_number(name: str, default: float, minimum: float, whole: bool = False) -> float:
    """A number the host sets in the environment, or its default when unset; anything else stops the app with
    a sentence naming the setting, before the model loads, instead of a traceback."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    value = _parse_number(text)
    if value is None or not (minimum <= value < math.inf) or (whole and not value.is_integer()):
        raise SystemExit(f"{name} must be a {'whole ' if whole else ''}number of at least {minimum:g}, not {text!r}.")
    return value


MAX_PROMPTS = 4
# Requests the queue holds beyond the running one; gradio refuses the rest itself ("Queue is full").
MAX_WAITING = int(_env_number("DALLE_QUEUE_SIZE", 16, 1, whole=True))
MAX_PROMPT_CHARS = 1000  # models read 64 tokens or fewer; anything longer is a paste gone wrong
# gradio's upload route stays open on every app; no input here takes a file, so an upload only needs room for the
# mistake NoFilesBlocks answers with a sentence, not for filling the disk.
MAX_UPLOAD = "64kb"
# The gallery's pictures: files the app names and writes itself inside gradio's cache folder, which gradio then
# serves in place, and deletes once they are this old. gradio's own delete_cache never reaches gallery outputs
# (6.31 tracks them on per-session copies of the component), so without this a Space's disk fills picture by picture.
PICTURES = Path(get_upload_folder()) / "dalle-space-pictures"
KEEP_PICTURES_S = _env_number("DALLE_KEEP_PICTURES_S", 24 * 3600, 1)
SCALE_RANGE = (1.0, 20.0)
TOP_K_RANGE = (1, 16384)  # up to the VQGAN codebook size: "keep every code"
TOP_P_RANGE = (0.01, 1.0)
TEMPERATURE_RANGE = (0.1, 2.0)

# Radio choices as (label, value); the value is what API clients send.
SAMPLERS = [("Parallel", "parallel"), ("Serial", "serial"), ("Compare both", "compare")]
MODES = {"parallel": ("parallel",), "serial": ("serial",), "compare": ("serial", "parallel")}

SCALE_ONE_NOTICE = (
    "Condition scale 1 turns guidance off: only the prompt-conditioned rows are sampled, one decoder call "
    "per step and no unconditional pass, so serial and parallel are the same sampler here and there is "
    "nothing to compare. Pick another scale to compare them."
)

TIMING_ROWS = [
    ("tokenize", "tokenize_s"),
    ("encode", "encode_s"),
    ("sample", "sample_s"),
    ("VQGAN", "vqgan_s"),
    ("compile", "compile_s"),
    ("total", "total_s"),
    ("s / image", "per_image_s"),
]

BENCH_REPEATS_RANGE = (1, 5)
FIT_LIMIT_RANGE = (0, 256)  # a search on the memory estimate: nothing runs, but a bound keeps the answer readable

BENCHMARK_INTRO = (
    "Run the experiment behind this Space on this machine and the loaded model: for one prompt and each "
    "image count, time the serial and the parallel sampler (image tokens only, no VQGAN; compilation is "
    "timed apart), measure the memory each call adds, and compare each row with the machine's own limit: "
    "reading every decoder weight once per image position at the memory bandwidth measured here. "
    "It runs in the same one-at-a-time queue as generation."
)
WHY_THE_GAP = """\
Guidance needs a conditioned and an unconditioned decoder pass per image token. *Parallel* stacks both
into one call on 2N rows; *serial* makes two calls on N rows, as upstream dalle-mini does.

- **At one image a step is bound by reading the weights** (~0.8 GB for mini), not by arithmetic: a call on
  2 rows costs little more than a call on 1. Parallel reads the weights once per step, serial twice.
- **On a CPU the gap is smaller than two reads suggest.** The two serial calls are independent inside the
  compiled step: XLA keeps their matrix products apart (the table's product counts: serial has about twice
  as many) but runs the two calls at the same time, one per core, and the second read of each layer's
  weights comes from the shared cache. Parallel's one call is faster still, by less than 2x.
- **On a GPU** the compiler may merge serial's products that share a weight; count the products in the
  table before explaining a GPU figure. At large batches the step turns compute-bound and both modes do
  the same arithmetic, so the gap narrows.
- **Condition scale 1** needs no unconditional pass at all: one call on N rows (the *conditional* sampler).
- **On the bundled tiny model** (what runs offline) a step reads under 2 MB of weights: fixed overheads per step
  dominate and the two samplers time about the same, either way round. The gap shows on mini and mega.

Figures measured on this project's machines are in `docs/benchmarks.md`.
"""

# The stages that add up to a request's time, compilation shown apart from the stage it delayed.
STAGE_BARS = [("tokenize", "tokenize_s"), ("encode", "encode_s"), ("sample", "sample_s"), ("VQGAN", "vqgan_s")]

EXAMPLES = [
    ["a red bicycle leaning against a brick wall", 10, 2, "compare"],
    ["sunset over snowy mountains, oil painting", 10, 1, "parallel"],
    ["an armchair in the shape of an avocado\na lighthouse on a cliff at night", 7.5, 1, "serial"],
]
# The bundled tiny model knows only the words of its training scenes and follows them only with guidance: at
# scale 1 its colours are right in 2% of pictures, at the default 10 in 93%, sampled at its top-k of 3
# (docs/benchmarks.md, "Prompt adherence"). Examples in its words, at the default scale and above.
TINY_EXAMPLES = [
    [bundled.PROMPTS[0], DEFAULT_CONDITION_SCALE, 2, "compare"],
    [bundled.PROMPTS[1], DEFAULT_CONDITION_SCALE, 1, "parallel"],
    ["\n".join(bundled.PROMPTS[2:]), 20, 1, "serial"],
]

CSS = ".fallback-banner { background: #fff3cd; border: 1px solid #e0b100; border-radius: 8px; padding: 0 12px; }"

engine = load_engine(os.environ.get("DALLE_MODEL", "mini"), os.environ.get("DALLE_DTYPE", "float32"),
                     revision=os.environ.get("DALLE_REVISION") or None)
engine.warmup()
print(f"Model {engine.info.model} ({engine.info.dtype}) samples on {engine.info.device}.", flush=True)
_engine_lock = threading.Lock()  # an abandoned request's worker holds it until its next progress report
DEFAULT_TOP_K = min(engine.effective_top_k(), TOP_K_RANGE[1])  # the model's (its config.json's), what warmup compiled
SEED_RANGE = (0, MAX_SEED - engine.max_images)  # leaves room for seed + j on every image
BENCH_IMAGE_CHOICES = [n for n in (1, 2, 4, 8, 16) if n <= engine.max_images]


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

    gallery: list[tuple[str, str]]  # (picture file, caption)
    markdown: str
    summary: dict[str, Any]
    stages: pd.DataFrame  # seconds per stage and sampler, for the bar chart beside the table


def _user_error(message: str) -> gr.Error:
    # The person made a mistake, not the server: no traceback in the log either.
    return gr.Error(message, print_exception=False)


def _holds_file(value: Any) -> bool:
    """Whether a raw input value holds a file reference anywhere, as gradio recognises one."""
    found: list[dict] = []
    client_utils.traverse(value, found.append, client_utils.is_file_obj_with_meta)
    return bool(found)


def _takes(block: gr.components.Component) -> str:
    """What an input takes, in words."""
    if isinstance(block, gr.Textbox):
        return "text"
    if isinstance(block, (gr.Slider, gr.Number)):
        return "a number"
    if isinstance(block, gr.Checkbox):
        return "true or false"
    choices = ", ".join(repr(value) for _, value in block.choices)  # gr.Radio, gr.CheckboxGroup
    return f"a list of {choices}" if isinstance(block, gr.CheckboxGroup) else f"one of {choices}"


class NoFilesBlocks(gr.Blocks):
    """Blocks that refuse a file reference sent as any input with one sentence naming the field.

    Gradio copies a file an input names into its cache before any handler runs, preprocess=False or not: a
    path nobody uploaded is refused there with a bare "Error", an uploaded one (gradio_client's ``handle_file``)
    reaches the handler as a dict. No input here takes a file, so the refusal comes first, in the check gradio
    runs on every request's inputs, and no file is read or copied."""

    def validate_inputs(self, block_fn, inputs: list[Any]) -> None:
        super().validate_inputs(block_fn, inputs)
        for block, value in zip(block_fn.inputs, inputs):
            if _holds_file(value):
                raise _user_error(f"{block.label} takes {_takes(block)}, not a file: this Space accepts no files.")


def _shown(value: Any) -> str:
    """A rejected value as a message quotes it: a number or a short plain word as it came, anything else
    described, never echoed, since the page renders error toasts as HTML and a value can be huge."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, (int, float)):
        try:
            return _plain(value)
        except OverflowError:  # an integer too large for a float
            return "a number too large to use"
    if isinstance(value, str) and re.fullmatch(r"[\w .+-]{1,24}", value, re.ASCII):
        return repr(value)
    if isinstance(value, str):
        return f"a text of {len(value):,} characters"
    return f"a {type(value).__name__}"


def _plain(number: float) -> str:
    """2147483631 rather than :g's 2.14748e+09; fractions and huge values as :g."""
    number = float(number)
    return str(int(number)) if number.is_integer() and abs(number) < 1e15 else f"{number:g}"


def _number(value: Any, name: str, bounds: tuple[float, float], whole: bool = False) -> float:
    """Check one numeric input. Handlers run with preprocess=False, so API clients' raw values
    (strings, None, NaN, booleans) arrive here and get a sentence naming the field and its range,
    not gradio's generic error. Numeric strings ("7") are read as numbers, as the page's fields do."""
    low, high = bounds
    allowed = f"between {_plain(low)} and {_plain(high)}"
    kind = "a whole number" if whole else "a number"
    number = _parse_number(value)
    if number is None:
        raise _user_error(f"{name} must be {kind} {allowed}, not {_shown(value)}.")
    if not math.isfinite(number):
        raise _user_error(f"{name} must be a finite number {allowed}, not {number}.")
    if whole and not number.is_integer():
        raise _user_error(f"{name} must be a whole number {allowed}, not {_plain(number)}.")
    if not low <= number <= high:
        raise _user_error(f"{name} must be {allowed}, not {_plain(number)}.")
    return number


def _prompts(text: Any) -> list[str]:
    """One prompt per line that shows something: whitespace and invisible format characters (zero-width
    spaces, direction marks) alone make no prompt. Control characters are refused, not dropped, so what
    is sampled is what the person sees."""
    if not isinstance(text, str):
        raise _user_error("The prompt must be text.")
    prompts = [line.strip() for line in text.splitlines()
               if any(not c.isspace() and unicodedata.category(c) != "Cf" for c in line)]
    if not prompts:
        raise _user_error("Please enter a prompt: a few words describing the picture you want.")
    if len(prompts) > MAX_PROMPTS:
        raise _user_error(
            f"You entered {len(prompts)} prompts; one request takes at most {MAX_PROMPTS} (one per line)."
        )
    for i, prompt in enumerate(prompts, 1):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise _user_error(f"Prompt {i} has {len(prompt):,} characters; a prompt takes at most "
                              f"{MAX_PROMPT_CHARS:,}.")
        control = next((c for c in prompt if unicodedata.category(c) == "Cc" and c != "\t"), None)
        if control is not None:
            raise _user_error(f"Prompt {i} contains the control character U+{ord(control):04X}; "
                              "a prompt takes printable text only.")
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
    if not isinstance(sampler, str) or sampler not in MODES:
        raise _user_error(f"Sampler must be one of {', '.join(map(repr, MODES))}, not {_shown(sampler)}.")
    if not isinstance(randomize_seed, bool):
        raise _user_error(f"Randomise seed must be true or false, not {_shown(randomize_seed)}.")
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


@dataclass(frozen=True)
class Finished:
    """The last event of a worker: the engine call's return value."""

    value: Any


class Abandoned(Exception):
    """The request was cancelled or its client left: its worker stops at the next progress report."""


def _in_worker(call: Callable[[Callable], Any]) -> Iterator[tuple | Finished]:
    """Run a blocking engine call in a thread and yield its progress updates, then ``Finished(result)``,
    so a generator handler can report progress (and show previews) while the engine works.

    Gradio closes the generator of a request that is cancelled or whose client disconnects; the worker then
    raises at its next progress report (one sampling chunk or benchmark row), releasing the engine for the
    next request instead of finishing work nobody will see."""
    events: queue.Queue = queue.Queue()
    abandoned = threading.Event()

    def report(*update) -> None:
        if abandoned.is_set():
            raise Abandoned
        events.put(update)

    def work() -> None:
        try:
            with _engine_lock:
                events.put(Finished(call(report)))
        except Abandoned:
            pass
        except Exception as exc:  # handed to the request's own thread, which raises it
            events.put(exc)

    threading.Thread(target=work, daemon=True).start()
    try:
        while True:
            event = events.get()
            if isinstance(event, Exception):
                raise event
            yield event
            if isinstance(event, Finished):
                return
    finally:
        abandoned.set()


def _captions(prompts, seeds) -> list[str]:
    return [f"#{i + 1} · seed {seed} · {prompt}" for i, (prompt, seed) in enumerate(zip(prompts, seeds))]


def _gallery(request: Request, images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int],
             caption_suffix: str = "") -> list[tuple[str, str]]:
    """Captioned picture files whose PNG text chunks say what made them (prompt, seed, settings, model), so a
    downloaded picture can be made again. Each file is named by an id of its own, also in its chunks: gradio
    would name a picture after its bytes and rewrite a file of equal bytes in place, cutting short a concurrent
    download of the same picture (one prompt and seed asked twice, or a prompt the bundled model draws as one
    plain picture whatever the seed)."""
    settings = {
        "condition_scale": f"{request.condition_scale:g}", "top_k": str(request.top_k),
        "top_p": f"{request.top_p or 1:g}", "temperature": f"{request.temperature:g}",
        "model": engine.info.model, "revision": engine.info.revision or "unpinned",
    }
    _sweep_pictures()
    PICTURES.mkdir(parents=True, exist_ok=True)
    batch = uuid.uuid4().hex
    gallery = []
    captions = _captions(prompts, seeds)
    for place, (image, prompt, seed, caption) in enumerate(zip(images, prompts, seeds, captions), 1):
        chunks = PngImagePlugin.PngInfo()
        image_id = f"{batch}-{place}"
        for key, value in {**settings, "prompt": prompt, "seed": str(seed), "image_id": image_id}.items():
            chunks.add_text(key, value)
        path = PICTURES / f"{image_id}.png"
        Image.fromarray(image).save(path, pnginfo=chunks)
        gallery.append((str(path), caption + caption_suffix))
    return gallery


_next_sweep = 0.0


def _sweep_pictures() -> None:
    """Delete gallery pictures older than KEEP_PICTURES_S, looking at most once per tenth of that age (a request
    with previews writes pictures many times a second)."""
    global _next_sweep
    now = time.time()
    if now < _next_sweep:
        return
    _next_sweep = now + KEEP_PICTURES_S / 10
    for path in PICTURES.glob("*.png"):
        try:
            if now - path.stat().st_mtime > KEEP_PICTURES_S:
                path.unlink()
        except FileNotFoundError:  # another sweep got there first
            pass


def _preview_gallery(request: Request, images: np.ndarray) -> list[tuple[str, str]]:
    prompts = [p for p in request.prompts for _ in range(request.n_seeds)]
    seeds = [request.seed + j for _ in request.prompts for j in range(request.n_seeds)]
    return _gallery(request, images, prompts, seeds, " (preview)")


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


def _stage_frame(results: list[Result]) -> pd.DataFrame:
    """One bar per sampler, stacked by stage: where each request's time went (compilation, if any, inside
    the stage it delayed)."""
    return pd.DataFrame([
        {"sampler": r.mode, "stage": label, "seconds": getattr(r.timings, field)}
        for r in results for label, field in STAGE_BARS
    ])


def _outcome(request: Request, results: list[Result]) -> Outcome:
    """Gallery, table and JSON for finished results; in compare mode the (identical) images are shown once."""
    final = results[-1]
    summary: dict[str, Any] = {
        "seed": request.seed,
        "images": len(final.images),
        "timings": {r.mode: r.timings.as_dict() for r in results},
        "notices": list(dict.fromkeys(n for r in results for n in r.notices)),
    }
    if final.mode == "conditional":
        summary["notices"].append(SCALE_ONE_NOTICE)
    if len(results) > 1:
        summary["parallel_speedup"] = round(_speedup(results), 3)
        summary["identical_images"] = bool(np.array_equal(results[0].tokens, results[1].tokens))
    gallery = _gallery(request, final.images, final.prompts, final.seeds)
    return Outcome(gallery, _timings_markdown(results, summary), summary, _stage_frame(results))


def run_request(request: Request, progress: gr.Progress, previews: bool) -> Iterator[list | None | Outcome]:
    """Sample with each of the request's modes in turn; yields at every chunk a preview gallery (when asked
    for) or None, and lastly the Outcome. Shared by the page and both API endpoints, which yield in turn so
    that gradio can stop an abandoned request between chunks."""
    results = []
    # The modes that sample differently at this scale: at 1 both become the one conditional sampler.
    modes = list({sampler_mode(mode, request.condition_scale): mode for mode in request.modes}.values())
    for step, mode in enumerate(modes, 1):
        label = f"{mode}, {step} of {len(modes)}" if len(modes) > 1 else mode
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
                if isinstance(event, Finished):
                    results.append(event.value)
                    continue
                done, total, images = event
                progress((done, total), desc=f"Sampling ({label})", unit="tokens")
                yield _preview_gallery(request, images) if previews and images is not None else None
        except ValueError as exc:  # the engine's own argument checks: a sentence for the person
            raise _user_error(str(exc)) from None
    yield _outcome(request, results)


def generate_page(prompt, condition_scale, n_seeds, sampler, seed, randomize_seed, top_k, top_p, temperature,
                  previews, progress=gr.Progress()):
    """The page's Generate button: previews as they come, then images, table, JSON and the seed used."""
    request = parse_request(prompt, condition_scale, n_seeds, sampler, seed, randomize_seed, top_k, top_p, temperature)
    for item in run_request(request, progress, previews=bool(previews)):
        if isinstance(item, Outcome):
            yield item.gallery, item.markdown, item.stages, item.summary, request.seed
        else:
            yield gr.skip() if item is None else item, gr.skip(), gr.skip(), gr.skip(), gr.skip()


def generate(prompt, condition_scale, n_seeds, sampler, seed, randomize_seed, top_k, top_p, temperature,
             progress=gr.Progress()):
    """Generate images from one prompt per line with the "parallel" or "serial" sampler, or "compare"
    to run both. Returns the images (captioned with index, seed and prompt) and timings as JSON."""
    request = parse_request(prompt, condition_scale, n_seeds, sampler, seed, randomize_seed, top_k, top_p, temperature)
    for item in run_request(request, progress, previews=False):
        yield (item.gallery, item.summary) if isinstance(item, Outcome) else (gr.skip(), gr.skip())


def compare(prompt, condition_scale, n_seeds, seed, randomize_seed, top_k, top_p, temperature,
            progress=gr.Progress()):
    """Generate with the serial sampler, then the parallel one, from the same seed. Returns the images
    and both samplers' timings as JSON with parallel_speedup: serial over parallel time, compilation excluded."""
    yield from generate(prompt, condition_scale, n_seeds, "compare", seed, randomize_seed, top_k, top_p,
                        temperature, progress)


@dataclass(frozen=True)
class BenchmarkRequest:
    images: list[int]
    condition_scale: float
    repeats: int
    fit_limit: int | None


def parse_benchmark(images, condition_scale, repeats, fit_limit) -> BenchmarkRequest:
    """Checked benchmark settings, or gr.Error naming the field and what it accepts."""
    if isinstance(images, (int, float, str)):
        images = [images]
    if not isinstance(images, list) or not images:
        raise _user_error(f"Images per prompt: pick at least one of {', '.join(map(str, BENCH_IMAGE_CHOICES))}.")
    counts = sorted({int(_number(n, "Images per prompt", (1, engine.max_images), whole=True)) for n in images})
    fit = int(_number(fit_limit, "Search the largest batch up to", FIT_LIMIT_RANGE, whole=True))
    return BenchmarkRequest(
        images=counts,
        condition_scale=_number(condition_scale, "Condition scale", SCALE_RANGE),
        repeats=int(_number(repeats, "Timed calls per row", BENCH_REPEATS_RANGE, whole=True)),
        fit_limit=fit or None,
    )


def run_benchmark(request: BenchmarkRequest, progress: gr.Progress) -> Iterator[None | experiment.Sweep]:
    """The sweep in the sampling queue's worker, with a progress bar over its rows; yields None per row
    (a point where gradio can stop an abandoned request), lastly the Sweep."""
    call = lambda on_progress: experiment.sweep(  # noqa: E731
        engine, request.images, condition_scale=request.condition_scale, repeats=request.repeats,
        fit_limit=request.fit_limit, progress=on_progress)
    for event in _in_worker(call):
        if isinstance(event, Finished):
            yield event.value
            return
        done, total, what = event
        progress((done, total), desc=f"Benchmark: {what}", unit="rows")
        yield None


def _sweep_frames(result: experiment.Sweep) -> tuple[pd.DataFrame, pd.DataFrame]:
    times = pd.DataFrame({"sampler": [r.mode for r in result.rows], "images": [r.images for r in result.rows],
                          "s / image": [r.s_per_image for r in result.rows]})
    measured = [r for r in result.rows if r.memory_per_image_mib is not None]
    memory = pd.DataFrame({"sampler": [r.mode for r in measured], "images": [r.images for r in measured],
                           "MiB / image": [r.memory_per_image_mib for r in measured]})
    return times, memory


def benchmark_page(images, condition_scale, repeats, fit_limit, progress=gr.Progress()):
    """The Benchmark tab: plots of time and memory per image, the table, and the JSON."""
    for item in run_benchmark(parse_benchmark(images, condition_scale, repeats, fit_limit), progress):
        if item is None:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
        else:
            yield (*_sweep_frames(item), experiment.markdown(item), item.as_dict())


def benchmark(images, condition_scale, repeats, fit_limit, progress=gr.Progress()):
    """Time serial and parallel sampling of one prompt at each image count (steady state; compilation
    apart), with memory per image and each row against the machine's weight-streaming floor. Returns the
    rows, speed-ups (serial s / parallel s per image count) and, when fit_limit > 0, the largest batch."""
    for item in run_benchmark(parse_benchmark(images, condition_scale, repeats, fit_limit), progress):
        yield gr.skip() if item is None else item.as_dict()


def _model_line() -> str:
    info = engine.info
    return (
        f"Model **{info.model}** · revision `{info.revision or 'unpinned'}` · {info.dtype} · {info.device}"
        f" · {engine.resolution}×{engine.resolution} px · at most {engine.max_images} images per request"
    )


def build_demo() -> gr.Blocks:
    examples = TINY_EXAMPLES if engine.info.model == "tiny" else EXAMPLES
    with NoFilesBlocks(title="DALL·E mini: serial vs parallel super-conditioning") as demo:
        gr.Markdown(
            "# DALL·E mini: serial vs parallel super-conditioning\n"
            "Super-conditioning mixes a prompt-conditioned and an unconditioned pass at every token. "
            "*Serial* runs the two passes one after the other; *parallel* batches them into one. "
            "Both draw the same images from the same seed; only the time differs."
        )
        for notice in (engine.info.fallback_notice, engine.info.hardware_notice):
            if notice:
                gr.Markdown(f"⚠️ **{notice}**", elem_classes="fallback-banner")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(
                        label="Prompts",
                        info=f"One per line, up to {MAX_PROMPTS}.",
                        placeholder=examples[0][0],
                        lines=3,
                    )
                    condition_scale = gr.Slider(*SCALE_RANGE, value=DEFAULT_CONDITION_SCALE, step=0.5,
                                                label="Condition scale")
                    n_seeds = gr.Slider(1, engine.max_images, value=1, step=1, label="Images per prompt")
                    sampler = gr.Radio(SAMPLERS, value="parallel", label="Sampler")
                    with gr.Accordion("Advanced", open=False):
                        seed = gr.Number(0, label="Seed", precision=0, minimum=SEED_RANGE[0], maximum=SEED_RANGE[1])
                        randomize_seed = gr.Checkbox(True, label="Randomise seed")
                        top_k = gr.Number(DEFAULT_TOP_K, label="Top-k", precision=0, minimum=TOP_K_RANGE[0],
                                          maximum=TOP_K_RANGE[1], info=f"{DEFAULT_TOP_K} is this model's default.")
                        top_p = gr.Slider(*TOP_P_RANGE, value=1.0, step=0.01, label="Top-p", info="1 keeps every token.")
                        temperature = gr.Slider(*TEMPERATURE_RANGE, value=1.0, step=0.05, label="Temperature")
                        previews = gr.Checkbox(False, label="Progressive previews")
                    run = gr.Button("Generate", variant="primary")
                with gr.Column():
                    gallery = gr.Gallery(label="Images", columns=2, fit_columns=False, format="png", elem_id="gallery")
                    timings = gr.Markdown(label="Timings", elem_id="timings")
                    stage_plot = gr.BarPlot(x="sampler", y="seconds", color="stage", title="Where the time went",
                                            y_title="seconds (compilation inside its stage)", elem_id="stage-plot",
                                            sort=["serial", "parallel", "conditional"])
                    with gr.Accordion("Timings as JSON", open=False):
                        timings_json = gr.JSON(label="Timings (JSON)")
            gr.Markdown(_model_line(), elem_id="model-line")
            gr.Examples(examples, inputs=[prompt, condition_scale, n_seeds, sampler], cache_examples=False)
        with gr.Tab("Benchmark"):
            gr.Markdown(BENCHMARK_INTRO)
            with gr.Row():
                with gr.Column(scale=1):
                    bench_images = gr.CheckboxGroup(BENCH_IMAGE_CHOICES, value=BENCH_IMAGE_CHOICES[:2],
                                                    label="Images per prompt", info="One prompt; each is a row.")
                    bench_scale = gr.Slider(*SCALE_RANGE, value=3, step=0.5, label="Condition scale",
                                            info="At 1 only the conditional sampler runs.")
                    bench_repeats = gr.Slider(*BENCH_REPEATS_RANGE, value=1, step=1, label="Timed calls per row",
                                              info="After one untimed warm-up call; the median counts.")
                    bench_fit = gr.Number(0, label="Search the largest batch up to", precision=0,
                                          minimum=FIT_LIMIT_RANGE[0], maximum=FIT_LIMIT_RANGE[1],
                                          info="0: no search. The memory guard's estimate against free memory; nothing runs.")
                    bench_run = gr.Button("Run benchmark", variant="primary")
                with gr.Column(scale=2):
                    time_plot = gr.LinePlot(x="images", y="s / image", color="sampler", title="Seconds per image",
                                            x_title="images per prompt", elem_id="time-plot")
                    memory_plot = gr.LinePlot(x="images", y="MiB / image", color="sampler",
                                              title="Memory per image", x_title="images per prompt",
                                              elem_id="memory-plot")
                    bench_table = gr.Markdown(elem_id="bench-table")
                    with gr.Accordion("Why the gap is what it is", open=False):
                        gr.Markdown(WHY_THE_GAP)
                    with gr.Accordion("Results as JSON", open=False):
                        bench_json = gr.JSON(label="Benchmark (JSON)")

        # One sampling job at a time across the page and the API; values arrive raw (preprocess=False)
        # so parse_request can name the field in every message.
        shared = dict(concurrency_limit=1, concurrency_id="sampler", preprocess=False)
        request_inputs = [prompt, condition_scale, n_seeds, sampler, seed, randomize_seed, top_k, top_p, temperature]
        run.click(generate_page, [*request_inputs, previews], [gallery, timings, stage_plot, timings_json, seed],
                  show_progress_on=gallery, api_visibility="private", **shared)
        # API-only endpoints: hidden buttons give them the page's components (and so files for images).
        gr.Button("generate", visible=False).click(
            generate, request_inputs, [gallery, timings_json], api_name="generate", **shared
        )
        gr.Button("compare", visible=False).click(
            compare, [i for i in request_inputs if i is not sampler], [gallery, timings_json], api_name="compare",
            **shared,
        )
        bench_inputs = [bench_images, bench_scale, bench_repeats, bench_fit]
        bench_run.click(benchmark_page, bench_inputs, [time_plot, memory_plot, bench_table, bench_json],
                        show_progress_on=bench_table, api_visibility="private", **shared)
        gr.Button("benchmark", visible=False).click(benchmark, bench_inputs, bench_json, api_name="benchmark",
                                                    **shared)
    return demo


demo = build_demo()

if __name__ == "__main__":
    # Host and port: GRADIO_SERVER_NAME / GRADIO_SERVER_PORT. share=False: never a public gradio.live
    # tunnel, whatever GRADIO_SHARE says.
    demo.queue(max_size=MAX_WAITING).launch(css=CSS, share=False, max_file_size=MAX_UPLOAD)
