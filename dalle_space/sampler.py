"""Super-conditioned sampling of image tokens, as pure functions.

Classifier-free guidance mixes, at every image position, the logits of a row conditioned on the prompt
with those of a row conditioned on the empty prompt: ``uncond + scale * (cond - uncond)``.

- ``parallel``: one decoder call per step on 2N rows, ``[cond rows; uncond rows]``.
- ``serial``: upstream's order, two decoder calls per step on N rows each.
- ``conditional``: condition scale exactly 1, where guidance returns the conditional logits unchanged:
  one decoder call per step on the N conditional rows, and no unconditional pass at all (as upstream).

All run the same loop and the same warpers, so they produce the same tokens. The loop has a fixed trip
count (``lax.scan``): DALL·E always emits ``image_length`` tokens. Every image has its own PRNG key, split
at each step exactly as upstream splits its one key, so one image sampled with key k is what upstream
``generate`` gives for that prompt with key k, and image i does not depend on how many images share the
batch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from . import dallebart
from .config import DalleBartConfig

Mode = Literal["parallel", "serial", "conditional"]
MODES: tuple[Mode, ...] = ("parallel", "serial")  # the two ways to guide, which a user picks between
# The page's and Engine.generate's condition scale, which the adherence measurement also samples at.
DEFAULT_CONDITION_SCALE = 10.0

# (cond logits, uncond logits or None when unguided) for one step, and the updated caches.
LogitsFn = Callable[[jax.Array, jax.Array, tuple], tuple[jax.Array, jax.Array | None, tuple]]


def sampler_mode(mode: Mode, condition_scale: float) -> Mode:
    """The sampler that runs: at scale exactly 1 guidance is a no-op, so both guided modes become
    ``conditional``. Static: scale 1 has its own compiled sampler; other scales stay traced."""
    return "conditional" if condition_scale == 1.0 else mode


# ----------------------------------------------------------------------------------------------------
# Guidance rows: the one place that knows the order of conditional and unconditional rows.


def stack_guidance_rows(cond, uncond):
    """Rows of one batched decoder call: the N conditional rows first, then the N unconditional ones."""
    return jnp.concatenate([cond, uncond], axis=0)


def split_guidance_rows(rows):
    """Inverse of ``stack_guidance_rows``: (cond, uncond)."""
    half = rows.shape[0] // 2
    return rows[:half], rows[half:]


def guide(cond, uncond, condition_scale):
    """Classifier-free guidance. At scale 1 the conditional logits are returned exactly, as upstream,
    which then skips the unconditional branch."""
    mixed = uncond + condition_scale * (cond - uncond)
    return jnp.where(condition_scale == 1.0, cond, mixed)


# ----------------------------------------------------------------------------------------------------
# Warpers, with the semantics of transformers' Flax warpers that upstream uses (in this order).


def apply_temperature(logits, temperature):
    return logits / temperature


def apply_top_k(logits, top_k: int):
    """Keep the k largest logits of each row (exactly k, ties broken by ``lax.top_k``), others -inf."""
    k = min(max(top_k, 1), logits.shape[-1])
    values, indices = lax.top_k(logits, k)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.full_like(logits, -jnp.inf).at[rows, indices].set(values)


def apply_top_p(logits, top_p):
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    values, indices = lax.top_k(logits, logits.shape[-1])
    cumulative = jnp.cumsum(jax.nn.softmax(values, axis=-1), axis=-1)
    keep = jnp.roll(cumulative < top_p, 1, axis=-1).at[:, 0].set(True)
    kept = jnp.where(keep, values, -jnp.inf)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.full_like(logits, -jnp.inf).at[rows, indices].set(kept)


@flax.struct.dataclass
class Warping:
    """Traced sampling settings: changing them never recompiles."""

    condition_scale: jax.Array  # () float32
    temperature: jax.Array  # () float32
    top_p: jax.Array  # () float32, used only when the spec says so


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Static sampling settings: each distinct value is one compiled sampler."""

    n_prompts: int
    n_seeds: int  # images per prompt
    mode: Mode
    top_k: int  # static: lax.top_k needs k as a shape
    use_top_p: bool  # top-p sorts the whole vocabulary, so it is compiled in only when asked for

    @property
    def n_images(self) -> int:
        return self.n_prompts * self.n_seeds


def warp(logits, spec: SamplerSpec, warping: Warping):
    logits = apply_temperature(logits, warping.temperature)
    logits = apply_top_k(logits, spec.top_k)
    if spec.use_top_p:
        logits = apply_top_p(logits, warping.top_p)
    return logits


# ----------------------------------------------------------------------------------------------------
# The loop


@flax.struct.dataclass
class SamplingState:
    """Everything the token loop carries from one image position to the next."""

    position: jax.Array  # () int32: the next position to sample
    tokens: jax.Array  # (N,) int32: decoder input at ``position`` (the start token at 0)
    keys: jax.Array  # (N, 2) uint32: each image's PRNG key for this step
    finished: jax.Array  # (N,) bool: rows that sampled eos; they emit pad from then on
    sequences: jax.Array  # (N, image_length) int32: sampled image tokens (pad where not yet sampled)
    caches: tuple  # decoder KV caches, one per decoder call of a step (see ``model_logits_fn``)


def sample_step(state: SamplingState, logits_fn: LogitsFn, spec: SamplerSpec, warping: Warping,
                eos_token_id: int, pad_token_id: int) -> SamplingState:
    """Decode one position for every image: guide, warp, sample with each image's own key."""
    cond, uncond, caches = logits_fn(state.tokens, state.position, state.caches)
    logits = warp(cond if uncond is None else guide(cond, uncond, warping.condition_scale), spec, warping)
    split = jax.vmap(jax.random.split)(state.keys)  # (N, 2, 2): key now, key for the next step
    # Each row is sampled as upstream samples a batch of one: categorical over a (1, vocab) array.
    sampled = jax.vmap(lambda k, l: jax.random.categorical(k, l[None], axis=-1)[0])(split[:, 0], logits)
    finished = state.finished | (sampled == eos_token_id)
    tokens = jnp.where(finished, pad_token_id, sampled).astype(jnp.int32)
    return SamplingState(
        position=state.position + 1,
        tokens=tokens,
        keys=split[:, 1],
        finished=finished,
        sequences=lax.dynamic_update_index_in_dim(state.sequences, tokens, state.position, axis=1),
        caches=caches,
    )


def sample_positions(state: SamplingState, logits_fn: LogitsFn, spec: SamplerSpec, warping: Warping,
                     n_positions: int, eos_token_id: int, pad_token_id: int) -> SamplingState:
    """Advance ``n_positions`` steps with a fixed trip count."""

    def body(state, _):
        return sample_step(state, logits_fn, spec, warping, eos_token_id, pad_token_id), None

    state, _ = lax.scan(body, state, None, length=n_positions)
    return state


# ----------------------------------------------------------------------------------------------------
# The model side


def model_logits_fn(config: DalleBartConfig, params, contexts: tuple[dallebart.CrossContext, ...],
                    mode: Mode) -> LogitsFn:
    """The decoder call(s) of one step, one per cache and context (see ``prepare``): ``parallel`` makes
    one call on 2N rows, ``serial`` two calls on N rows each, ``conditional`` one call on N rows."""

    def parallel(tokens, position, caches):
        logits, cache = dallebart.decoder_step(
            config, params, stack_guidance_rows(tokens, tokens), position, caches[0], contexts[0])
        return (*split_guidance_rows(logits), (cache,))

    def serial(tokens, position, caches):
        cond_logits, cond_cache = dallebart.decoder_step(config, params, tokens, position, caches[0], contexts[0])
        uncond_logits, uncond_cache = dallebart.decoder_step(
            config, params, tokens, position, caches[1], contexts[1])
        return cond_logits, uncond_logits, (cond_cache, uncond_cache)

    def conditional(tokens, position, caches):
        logits, cache = dallebart.decoder_step(config, params, tokens, position, caches[0], contexts[0])
        return logits, None, (cache,)

    return {"parallel": parallel, "serial": serial, "conditional": conditional}[mode]


def initial_caches(config: DalleBartConfig, n_images: int, mode: Mode, dtype) -> tuple:
    if mode == "parallel":
        return (dallebart.KVCache.zeros(config, 2 * n_images, dtype),)
    if mode == "conditional":
        return (dallebart.KVCache.zeros(config, n_images, dtype),)
    return tuple(dallebart.KVCache.zeros(config, n_images, dtype) for _ in range(2))


def prepare(config: DalleBartConfig, params, input_ids, attention_mask, uncond_ids, uncond_mask, keys,
            mode: Mode) -> tuple[SamplingState, tuple[dallebart.CrossContext, ...]]:
    """Encode once and build the loop's first state and the cross-attention contexts of its decoder calls.

    input_ids / attention_mask (P, L); uncond_ids / uncond_mask (1, L), the empty prompt, encoded once
    for the whole batch; keys (N, 2), prompt-major, N a multiple of P. Cross-attention keys / values are
    computed once per prompt and shared by its images. ``serial`` gets one context per call (the empty
    prompt's serves all N unconditional rows); ``parallel`` one context of 2P prompts, [cond; uncond] as the
    rows, with the empty prompt's repeated once per prompt so that every prompt has N / P rows;
    ``conditional`` the prompts' context alone (the empty prompt is never encoded).
    """
    n_images = keys.shape[0]
    cond = dallebart.cross_context(
        config, params, dallebart.encode(config, params, input_ids, attention_mask), attention_mask)
    if mode == "conditional":
        contexts = (cond,)
    else:
        uncond = dallebart.cross_context(
            config, params, dallebart.encode(config, params, uncond_ids, uncond_mask), uncond_mask)
        if mode == "parallel":
            contexts = (dallebart.stack_contexts(cond, dallebart.repeat_context(uncond, input_ids.shape[0])),)
        else:
            contexts = (cond, uncond)
    dtype = dallebart.compute_dtype(params)
    state = SamplingState(
        position=jnp.zeros((), jnp.int32),
        tokens=jnp.full((n_images,), config.decoder_start_token_id, jnp.int32),
        keys=keys,
        finished=jnp.zeros((n_images,), bool),
        sequences=jnp.full((n_images, config.image_length), config.pad_token_id, jnp.int32),
        caches=initial_caches(config, n_images, mode, dtype),
    )
    return state, contexts


def advance(config: DalleBartConfig, params, state: SamplingState, contexts: tuple[dallebart.CrossContext, ...],
            warping: Warping, spec: SamplerSpec, n_positions: int) -> SamplingState:
    """Sample the next ``n_positions`` image positions of every image."""
    logits_fn = model_logits_fn(config, params, contexts, spec.mode)
    return sample_positions(state, logits_fn, spec, warping, n_positions,
                            config.eos_token_id, config.pad_token_id)
