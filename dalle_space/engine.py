"""The engine behind the Space: parameters loaded once, compiled samplers cached per batch shape.

A request runs: tokenize (host) -> encode once per prompt, plus the empty prompt once per batch ->
sample the image positions in a few chunks (so progress can be reported) -> VQGAN decode -> uint8.
Each compiled function is built ahead of time for its static shape key and kept in a bounded LRU, so a
request knows whether it compiled and for how long; traced settings (condition scale, temperature,
top-p, seeds) never recompile.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import numbers
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import bundled, checkpoints, dallebart, memory, sampler, text, vqgan
from .config import DALLEBART_PRESETS, VQGAN_PRESETS, DalleBartConfig, VQGANConfig

log = logging.getLogger(__name__)

# progress(done_positions, total_positions, preview_images_or_None)
ProgressFn = Callable[[int, int, "np.ndarray | None"], None]

# Sampling runs in this many chunks of image positions: enough for a smooth progress bar, few enough
# that the per-chunk dispatch stays well under 5% of the sampling time.
PROGRESS_CHUNKS = 8
DEFAULT_MAX_IMAGES = 16
MAX_SEED = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Timings:
    """Wall-clock seconds of one request's stages; ``compile_s`` is included in the stage it delayed."""

    tokenize_s: float
    encode_s: float
    sample_s: float
    vqgan_s: float
    compile_s: float
    total_s: float
    per_image_s: float
    compiled: bool  # whether this request compiled a new function

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Result:
    images: np.ndarray  # (N, H, W, 3) uint8, prompt-major: image j of prompt p at p * n_seeds + j
    tokens: np.ndarray  # (N, image_length) int32
    prompts: tuple[str, ...]  # per image
    prompt_index: tuple[int, ...]  # per image
    seeds: tuple[int, ...]  # per image: that prompt alone with this seed and one image gives it again
    mode: str  # the sampler that ran: "conditional" at condition scale 1, whichever guided mode was asked for
    notices: tuple[str, ...]  # things the user should know, e.g. a truncated prompt
    timings: Timings


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    model: str
    revision: str | None
    dtype: str
    device: str
    fallback_notice: str | None = None  # set when the requested model could not be loaded
    hardware_notice: str | None = None  # set when an NVIDIA GPU is there but JAX samples on the CPU


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    entries: int
    hits: int
    misses: int
    compile_seconds: float


class CompiledCache:
    """Bounded LRU of ahead-of-time compiled functions, keyed by their static shape key."""

    def __init__(self, max_entries: int = 32):
        self._entries: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.compile_seconds = 0.0

    def get(self, key: Hashable, jitted, *args) -> tuple[Any, float]:
        """The compiled function for ``key`` and the seconds spent compiling it now (0 on a hit)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key], 0.0
        start = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        seconds = time.perf_counter() - start
        with self._lock:
            self.misses += 1
            self.compile_seconds += seconds
            self._entries[key] = compiled
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return compiled, seconds

    def info(self) -> CacheInfo:
        return CacheInfo(len(self._entries), self.hits, self.misses, round(self.compile_seconds, 3))


def enable_persistent_compilation_cache() -> None:
    """Keep XLA executables on disk, so a restarted Space compiles its samplers in a fraction of the time."""
    folder = Path(os.environ.get("DALLE_SPACE_CACHE") or Path.home() / ".cache" / "dalle-space") / "jax-compilation"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _real(value: Any) -> bool:
    """A plain real number (not a bool, a string or None): what every numeric setting must be."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    return _real(value) and math.isfinite(value) and float(value).is_integer()


def check_settings(n_images: int, max_images: int, condition_scale: float, mode: str, top_k: int,
                   top_p: float | None, temperature: float) -> None:
    """One clear ValueError for the first bad sampling argument, whatever its type: a string, None or
    NaN gets the same sentence as an out-of-range number rather than a TypeError from deeper down."""
    if n_images < 1:
        raise ValueError("Ask for at least one image.")
    if n_images > max_images:
        raise ValueError(f"At most {max_images} images fit in one request; {n_images} were asked for.")
    if not _real(condition_scale) or not math.isfinite(condition_scale) or condition_scale < 0:
        raise ValueError(f"The condition scale must be a finite number of at least 0, not {condition_scale!r}.")
    if not isinstance(mode, str) or mode not in sampler.MODES:
        raise ValueError(f"The sampler mode must be one of {', '.join(sampler.MODES)}, not {mode!r}.")
    if not _whole(top_k) or top_k < 1:
        raise ValueError(f"top-k must be a whole number of at least 1, not {top_k!r}.")
    if top_p is not None and not (_real(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top-p must be greater than 0 and at most 1, not {top_p!r}.")
    if not _real(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"The temperature must be a number greater than 0, not {temperature!r}.")


def unused_gpu_notice() -> str | None:
    """A warning when the system shows an NVIDIA GPU but JAX runs on the CPU: the Space installs the CPU build
    of jaxlib, so a copy of it on GPU hardware would otherwise sample on its CPU without a word."""
    if jax.default_backend() != "cpu" or not (os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")):
        return None
    notice = ("This machine has an NVIDIA GPU but JAX samples on the CPU (the CPU build of jaxlib is installed): "
              "install jax[cuda12]==0.10.2 instead of jax==0.10.2 to sample on the GPU.")
    log.warning(notice)
    return notice


def _device_name() -> str:
    device = jax.devices()[0]
    return f"{device.platform.upper()} ({device.device_kind}) x{jax.device_count()}"


def seed_keys(seeds: Sequence[int]) -> np.ndarray:
    """Raw threefry keys (N, 2) uint32, each equal to ``jax.random.PRNGKey(seed)``, built on the host."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    return np.stack([seeds >> 32, seeds & 0xFFFFFFFF], axis=1).astype(np.uint32)


class Engine:
    """A loaded model with its compiled samplers. Thread-safe for sequential use by one queue worker."""

    def __init__(self, config: DalleBartConfig, params, tokenizer, normalizer: text.TextNormalizer | None,
                 vqgan_config: VQGANConfig | None, vqgan_params, info: ModelInfo,
                 max_images: int = DEFAULT_MAX_IMAGES, cache_entries: int = 32,
                 progress_chunks: int = PROGRESS_CHUNKS):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.normalizer = normalizer
        self.vqgan_config = vqgan_config
        self.vqgan_params = vqgan_params
        self.info = info
        self.max_images = max_images
        if config.image_length % progress_chunks:
            raise ValueError(f"{progress_chunks} chunks do not divide {config.image_length} image positions.")
        self.progress_chunks = progress_chunks
        self._cache = CompiledCache(cache_entries)
        self._mesh = Mesh(np.array(jax.devices()), ("batch",)) if jax.device_count() > 1 else None
        if self._mesh is not None:  # data parallel: weights on every device, images spread over them
            self.params = jax.device_put(params, NamedSharding(self._mesh, PartitionSpec()))
        uncond_ids, uncond_mask = text.unconditional_ids(tokenizer, config.max_text_length)
        self._uncond = (jnp.asarray(uncond_ids), jnp.asarray(uncond_mask))
        self._prepare = jax.jit(sampler.prepare, static_argnums=(0, 7))
        self._advance = jax.jit(sampler.advance, static_argnums=(0, 5, 6), donate_argnums=(2,))
        self._decode = jax.jit(vqgan.decode_codes, static_argnums=0) if vqgan_config else None

    @classmethod
    def from_pretrained(cls, model: str | Path = "mini", vqgan: str | Path | None = "auto",
                        dtype: str = "float32", revision: str | None = None,
                        vqgan_revision: str | None = None, **kwargs) -> "Engine":
        """Load once. ``model`` / ``vqgan`` take what the loaders take; ``vqgan="auto"`` picks the VQGAN whose
        codebook the model draws from (the bundled tiny one for 256 codes, else the real one), so a local copy
        of either model pairs right; ``vqgan=None`` samples tokens only."""
        enable_persistent_compilation_cache()
        folder, model_revision = checkpoints.locate_dallebart(model, revision)
        tokenizer = checkpoints.load_tokenizer(folder)  # checks the folder before any weight is read
        config, params = checkpoints.load_dallebart(folder, dtype=dtype)
        normalizer = None
        if config.normalize_text:
            frequencies = folder / "enwiki-words-frequency.txt"
            normalizer = text.TextNormalizer(frequencies if frequencies.is_file() else None)
        if vqgan == "auto":
            vqgan = "tiny" if checkpoints.image_codes(config) == VQGAN_PRESETS["tiny"].n_embed else "f16_16384"
        vqgan_config = vqgan_params = None
        if vqgan is not None:
            vqgan_folder, _ = checkpoints.locate_vqgan(vqgan, vqgan_revision)
            vqgan_config, vqgan_params = checkpoints.load_vqgan(vqgan_folder, dtype=dtype)
            checkpoints.check_pair(config, vqgan_config, vqgan_folder)
        info = ModelInfo(model=str(model), revision=model_revision, dtype=dtype, device=_device_name(),
                         hardware_notice=unused_gpu_notice())
        return cls(config, params, tokenizer, normalizer, vqgan_config, vqgan_params, info, **kwargs)

    @classmethod
    def from_random(cls, preset: str = "mini", dtype: str = "float32", seed: int = 0, **kwargs) -> "Engine":
        """A tokens-only engine on random weights of a preset's size, for benchmarks: no download.
        Prompts are token ids here, so the tokenizer is the bundled one (same special ids as BART)."""
        enable_persistent_compilation_cache()
        config = DALLEBART_PRESETS[preset]
        params = dallebart.init_params(config, seed, checkpoints.dtype_of(dtype), runtime=True)
        tokenizer = text.load_tokenizer(bundled.DALLEBART)
        info = ModelInfo(model=f"{preset} (random weights)", revision=None, dtype=dtype, device=_device_name())
        return cls(config, params, tokenizer, None, None, None, info, **kwargs)

    @property
    def resolution(self) -> int:
        return self.vqgan_config.resolution if self.vqgan_config else 0

    def cache_info(self) -> CacheInfo:
        return self._cache.info()

    # ------------------------------------------------------------------------------------------------

    def effective_top_k(self, top_k: int | None = None) -> int:
        """The top-k a request samples at: the one it asks for, else the model's (its config.json's ``top_k``)."""
        return self.config.top_k if top_k is None else top_k

    def warmup(self, shapes: Sequence[tuple[int, int]] = ((1, 1),), modes: Sequence[str] = sampler.MODES,
               top_k: int | None = None) -> None:
        """Compile the samplers (and VQGAN decoder) of these (prompts, images per prompt) shapes now rather
        than on a request; top-k is part of the shape (None: the model's default, as in ``generate``)."""
        top_k = self.effective_top_k(top_k)
        for n_prompts, n_seeds in shapes:
            for mode in modes:
                ids = np.zeros((n_prompts, self.config.max_text_length), np.int32)
                keys = seed_keys(range(n_prompts * n_seeds))
                tokens, *_ = self._run(ids, ids, keys, sampler.SamplerSpec(n_prompts, n_seeds, mode, top_k, False),
                                       self._warping(1.0, 1.0, None), None, False)
            if self._decode is not None:
                self._images(tokens)

    def generate(self, prompts: Sequence[str], n_seeds: int = 1,
                 condition_scale: float = sampler.DEFAULT_CONDITION_SCALE, mode: str = "parallel",
                 seed: int = 0, top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0,
                 progress: ProgressFn | None = None, preview: bool = False) -> Result:
        """Images for every prompt: ``n_seeds`` each, image j of every prompt with seed ``seed + j``; ``top_k``
        None keeps the model's default (its config's ``top_k``)."""
        start = time.perf_counter()
        top_k = self.effective_top_k(top_k)
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, not one string.")
        prompts = list(prompts)
        for i, prompt in enumerate(prompts, 1):
            if not isinstance(prompt, str):
                raise ValueError(f"Prompt {i} must be a string, not {type(prompt).__name__}.")
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("Every prompt needs some text.")
        for i, prompt in enumerate(prompts, 1):
            # A lone surrogate (JSON can carry one as an escape) cannot be encoded for the tokenizer.
            surrogate = next((c for c in prompt if "\ud800" <= c <= "\udfff"), None)
            if surrogate is not None:
                raise ValueError(f"Prompt {i} is not valid text: it holds the lone surrogate U+{ord(surrogate):04X}.")
        if not _whole(n_seeds):  # a count below 1 gets check_settings' sentence
            raise ValueError(f"n_seeds must be a whole number of at least 1, not {n_seeds!r}.")
        n_seeds = int(n_seeds)
        check_settings(len(prompts) * n_seeds, self.max_images, condition_scale, mode, top_k, top_p,
                       temperature)
        if not _whole(seed) or not 0 <= seed <= MAX_SEED - n_seeds:
            raise ValueError(f"The seed must be a whole number from 0 to {MAX_SEED - n_seeds}, not {seed!r}.")
        seed = int(seed)
        if self._decode is None:
            raise ValueError("This engine was loaded without a VQGAN: use sample_tokens.")

        tokenized = text.encode_prompts(self.tokenizer, prompts, self.config.max_text_length, self.normalizer)
        tokenize_s = time.perf_counter() - start
        seeds = [seed + j for _ in prompts for j in range(n_seeds)]
        mode = sampler.sampler_mode(mode, condition_scale)
        spec = sampler.SamplerSpec(len(prompts), n_seeds, mode, int(top_k), top_p is not None)
        stages = self._run(tokenized.input_ids, tokenized.attention_mask, seed_keys(seeds), spec,
                           self._warping(condition_scale, temperature, top_p), progress, preview)
        tokens, encode_s, sample_s, compile_s = stages

        decode_start = time.perf_counter()
        images, decode_compile_s = self._images(tokens)
        vqgan_s = time.perf_counter() - decode_start
        total_s = time.perf_counter() - start
        notices = tuple(
            f"Prompt {i + 1} was longer than {self.config.max_text_length} tokens and was cut short."
            for i, cut in enumerate(tokenized.truncated) if cut)
        compile_s += decode_compile_s
        timings = Timings(tokenize_s, encode_s, sample_s, vqgan_s, compile_s, total_s,
                          total_s / len(seeds), compiled=compile_s > 0)
        return Result(images=images, tokens=np.asarray(tokens), prompts=tuple(p for p in prompts for _ in range(n_seeds)),
                      prompt_index=tuple(i for i in range(len(prompts)) for _ in range(n_seeds)),
                      seeds=tuple(seeds), mode=mode, notices=notices, timings=timings)

    def sample_tokens(self, input_ids, attention_mask, keys,
                      condition_scale: float = sampler.DEFAULT_CONDITION_SCALE,
                      mode: str = "parallel", top_k: int | None = None, top_p: float | None = None,
                      temperature: float = 1.0, progress: ProgressFn | None = None) -> np.ndarray:
        """Image tokens (N, image_length) for input_ids (P, L) and raw keys (N, 2), prompt-major; ``top_k`` as
        in ``generate``."""
        top_k = self.effective_top_k(top_k)
        input_ids, attention_mask, keys = np.asarray(input_ids), np.asarray(attention_mask), np.asarray(keys)
        n_prompts, n_images = input_ids.shape[0], keys.shape[0]
        if n_prompts < 1 or n_images % n_prompts:
            raise ValueError(f"{n_images} keys cannot be shared evenly by {n_prompts} prompts.")
        check_settings(n_images, self.max_images, condition_scale, mode, top_k, top_p, temperature)
        spec = sampler.SamplerSpec(n_prompts, n_images // n_prompts, sampler.sampler_mode(mode, condition_scale),
                                   int(top_k), top_p is not None)
        tokens, *_ = self._run(input_ids, attention_mask, keys, spec,
                               self._warping(condition_scale, temperature, top_p), progress, False)
        return np.asarray(tokens)

    def compile_for_shape(self, spec: sampler.SamplerSpec, positions: int | None = None):
        """The (prepare, advance) executables of a batch shape, compiled for abstract inputs on one device
        (never run, not cached), for what XLA makes of them: buffer sizes, optimised HLO. ``advance``
        samples ``positions`` image positions, by default one progress chunk."""
        ids = jax.ShapeDtypeStruct((spec.n_prompts, self.config.max_text_length), jnp.int32)
        keys = jax.ShapeDtypeStruct((spec.n_images, 2), jnp.uint32)
        prepare_args = (self.config, self.params, ids, ids, *self._uncond, keys, spec.mode)
        state, contexts = jax.eval_shape(self._prepare, *prepare_args)
        positions = positions or self.config.image_length // self.progress_chunks
        advance_args = (self.config, self.params, state, contexts, self._warping(3.0, 1.0, None), spec, positions)
        return self._prepare.lower(*prepare_args).compile(), self._advance.lower(*advance_args).compile()

    @property
    def _itemsize(self) -> int:
        return jnp.dtype(dallebart.compute_dtype(self.params)).itemsize

    def sampler_bytes(self, n_prompts: int, n_seeds: int, mode: str) -> int:
        """Bytes sampling a batch of this shape allocates besides the weights (estimated from the shapes)."""
        return memory.sampler_bytes(self.config, n_prompts, n_prompts * n_seeds, mode, self._itemsize)

    def memory_needed(self, n_prompts: int, n_seeds: int, mode: str) -> int:
        """Bytes a request of this shape allocates besides the loaded weights: sampling, then the VQGAN."""
        needed = self.sampler_bytes(n_prompts, n_seeds, mode)
        if self.vqgan_config is not None:
            needed += memory.vqgan_bytes(self.vqgan_config, n_prompts * n_seeds, self._itemsize)
        return needed

    def most_images_that_fit(self, n_prompts: int, mode: str, limit: int) -> int:
        """The most images per prompt, up to ``limit``, whose estimated buffers fit in the free memory now
        (0 when not even one does): what the memory guard would accept."""
        free = memory.free_bytes()
        return max((n for n in range(1, limit + 1) if self.memory_needed(n_prompts, n, mode) <= free), default=0)

    def _check_memory(self, spec: sampler.SamplerSpec) -> None:
        """Refuse, before anything runs, a batch that would not fit in the free memory: on a CPU it would
        swap or be killed, on a GPU fail halfway. The message names the most images that would fit."""
        free = memory.free_bytes()
        needed = self.memory_needed(spec.n_prompts, spec.n_seeds, spec.mode)
        if needed <= free:
            return
        fits = self.most_images_that_fit(spec.n_prompts, spec.mode, spec.n_seeds - 1)
        advice = (f"at most {fits * spec.n_prompts} ({fits} per prompt) would fit now" if fits
                  else "not even one image per prompt fits now; try again later or with fewer prompts")
        raise ValueError(f"{spec.n_images} images need about {needed / 2**30:.2f} GiB of memory but "
                         f"{free / 2**30:.2f} GiB are free: {advice}.")

    # ------------------------------------------------------------------------------------------------

    @staticmethod
    def _warping(condition_scale: float, temperature: float, top_p: float | None) -> sampler.Warping:
        return sampler.Warping(condition_scale=jnp.float32(condition_scale),
                               temperature=jnp.float32(temperature),
                               top_p=jnp.float32(1.0 if top_p is None else top_p))

    def _run(self, input_ids, attention_mask, keys, spec: sampler.SamplerSpec, warping: sampler.Warping,
             progress: ProgressFn | None, preview: bool):
        """(tokens, encode seconds, sample seconds, compile seconds) of one batch."""
        self._check_memory(spec)
        config = self.config
        start = time.perf_counter()
        args = (config, self.params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                *self._uncond, jnp.asarray(keys, jnp.uint32), spec.mode)
        prepare, prepare_compile_s = self._cache.get(("prepare", spec.n_prompts, spec.n_images, spec.mode),
                                                     self._prepare, *args)
        state, contexts = prepare(*args[1:7])
        state = self._shard_rows(jax.block_until_ready(state))
        encode_s = time.perf_counter() - start

        start = time.perf_counter()
        chunk = config.image_length // self.progress_chunks
        advance_args = (config, self.params, state, contexts, warping, spec, chunk)
        advance, advance_compile_s = self._cache.get(("advance", spec, chunk), self._advance, *advance_args)
        for done in range(chunk, config.image_length + 1, chunk):
            state = advance(self.params, self._shard_rows(state), contexts, warping)
            if progress is not None:
                jax.block_until_ready(state.position)
                images = self._images(state.sequences)[0] if preview and self._decode else None
                progress(done, config.image_length, images)
        tokens = jax.block_until_ready(state.sequences)
        sample_s = time.perf_counter() - start
        return tokens, encode_s, sample_s, prepare_compile_s + advance_compile_s

    def _shard_rows(self, state: sampler.SamplingState) -> sampler.SamplingState:
        """With several devices, spread the images of the loop state over them (rows are independent);
        a no-op on one device, for batches that do not divide evenly, and when already in place."""
        devices = jax.device_count()
        if self._mesh is None or state.tokens.shape[0] % devices:
            return state

        def put(spec):
            return functools.partial(jax.device_put, device=NamedSharding(self._mesh, spec))

        rows = put(PartitionSpec("batch"))
        return state.replace(
            position=put(PartitionSpec())(state.position), tokens=rows(state.tokens), keys=rows(state.keys),
            finished=rows(state.finished), sequences=rows(state.sequences),
            caches=jax.tree_util.tree_map(rows, state.caches))

    def _images(self, tokens) -> tuple[np.ndarray, float]:
        args = (self.vqgan_config, self.vqgan_params, tokens)
        decode, compile_s = self._cache.get(("vqgan", tokens.shape), self._decode, *args)
        return vqgan.to_uint8(decode(*args[1:])), compile_s


def load_engine(model: str = "mini", dtype: str = "float32", revision: str | None = None,
                vqgan: str | Path | None = "auto", **kwargs) -> Engine:
    """The engine the Space runs: the requested model, or the bundled ``tiny`` one when the hub cannot be
    reached, with ``info.fallback_notice`` saying so. ``revision`` and ``vqgan`` choose files of the requested
    model only; ``kwargs`` (the Engine's own settings) apply to either."""
    try:
        return Engine.from_pretrained(model=model, vqgan=vqgan, dtype=dtype, revision=revision, **kwargs)
    except checkpoints.HubUnavailableError as error:
        # The page gets one sentence; the hub's own (long, developer-facing) error goes to the log.
        notice = (f"The model {str(model)[:60]!r} could not be downloaded, so the bundled tiny model runs "
                  f"instead: it draws only {bundled.DRAWS}.")
        log.warning("%s Reason: %s", notice, error)
        engine = Engine.from_pretrained(model="tiny", dtype=dtype, **kwargs)
        engine.info = dataclasses.replace(engine.info, fallback_notice=notice)
        return engine
