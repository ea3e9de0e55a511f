"""Stage 2: a DalleBart of the project's architecture trained on (caption, VQGAN codes) pairs, through
dalle_space.dallebart's own encode / decode_logits on the runtime parameter tree the sampler uses.

Teacher forcing: the decoder reads the start token then the codes shifted by one and is scored by
cross-entropy on every code. Two phases (``PLAIN``, then ``GUIDED``): first plain cross-entropy with a share
of captions replaced by the empty prompt, so the model also learns the unconditional distribution that
super-conditioning (condition scale > 1) moves away from; then the guided objective, which also scores each
code under the guided logits the app samples from at its default scale.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from dalle_space import dallebart, sampler
from dalle_space.config import DalleBartConfig
from dalle_space.sampler import DEFAULT_CONDITION_SCALE
from training import devices


@dataclasses.dataclass(frozen=True)
class DalleBartTraining:
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 1e-3  # the peak, after a linear warm-up over ``warmup`` of the steps
    warmup: float = 0.05
    final_learning_rate: float = 5e-5  # where a cosine from the peak ends on the last step
    unconditional: float = 0.1  # share of captions swapped for the empty prompt
    # Scale of the guided term: every pair is also read with the empty prompt, and the code scored under
    # uncond + scale * (cond - uncond), the distribution the sampler draws from; 0: plain cross-entropy.
    guided_scale: float = 0.0


# The bundled model's two phases, 0.74-1.2 s a step each on 2 CPU cores (a guided step reads 16 pairs twice).
# The plain phase is long because the captions start to count late in it (training/README.md, ninth run).
PLAIN = DalleBartTraining()
# The guided phase empties no caption: it reads every pair with the empty prompt already.
GUIDED = DalleBartTraining(steps=800, batch_size=16, learning_rate=3e-4, final_learning_rate=1.5e-5,
                           unconditional=0.0, guided_scale=DEFAULT_CONDITION_SCALE)


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Training pairs: tokenized captions (as text.encode_prompts gives them) and the pictures' codes."""

    input_ids: np.ndarray  # (N, max_text_length) int32
    attention_mask: np.ndarray  # (N, max_text_length) int32
    codes: np.ndarray  # (N, image_length) int32
    empty_ids: np.ndarray  # (1, max_text_length): the empty prompt, text.unconditional_ids
    empty_mask: np.ndarray  # (1, max_text_length)


def next_code_logits(config: DalleBartConfig, params, input_ids, attention_mask, codes):
    """Logits (B, T, image_vocab_size + 1) whose row t scores code t, having read the start token and
    codes 0 .. t-1 only."""
    states = dallebart.encode(config, params, input_ids, attention_mask)
    return dallebart.decode_logits(config, params, _teacher_input(config, codes), states, attention_mask)


def _teacher_input(config: DalleBartConfig, codes):
    """The decoder's input under teacher forcing: the start token, then every code but the last."""
    start = jnp.full((codes.shape[0], 1), config.decoder_start_token_id, codes.dtype)
    return jnp.concatenate([start, codes[:, :-1]], axis=1)


def _cross_entropy(logits, codes):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), codes).mean()


def loss_fn(config: DalleBartConfig, params, input_ids, attention_mask, codes):
    """Mean cross-entropy of every code given the caption and the codes before it."""
    return _cross_entropy(next_code_logits(config, params, input_ids, attention_mask, codes), codes)


def guided_loss_fn(config: DalleBartConfig, params, input_ids, attention_mask, codes, empty_ids, empty_mask,
                   scale: float):
    """Cross-entropy of every code given the caption, given the empty prompt, and under the guided logits
    ``uncond + scale * (cond - uncond)``; both readings in one batched decoder call, as the parallel sampler
    makes, and the empty prompt encoded once for all its rows, as the sampler encodes it.

    Plain cross-entropy leaves the codes neither reading expects untrained, and a scale of 10 turns their
    small, random differences into the most likely codes (training/README.md, "Third run"); the guided term
    scores exactly what sampling at that scale draws from.
    """
    cond_states = dallebart.encode(config, params, input_ids, attention_mask)
    empty_states = dallebart.encode(config, params, empty_ids, empty_mask)
    states = sampler.stack_guidance_rows(cond_states, jnp.broadcast_to(empty_states, cond_states.shape))
    mask = sampler.stack_guidance_rows(attention_mask, jnp.broadcast_to(empty_mask, attention_mask.shape))
    decoder_input = _teacher_input(config, sampler.stack_guidance_rows(codes, codes))
    logits = dallebart.decode_logits(config, params, decoder_input, states, mask)
    cond, uncond = sampler.split_guidance_rows(logits)
    return (_cross_entropy(cond, codes) + _cross_entropy(uncond, codes)
            + _cross_entropy(sampler.guide(cond, uncond, scale), codes))


def learning_rate_schedule(training: DalleBartTraining) -> optax.Schedule:
    """Linear warm-up to the peak, then a cosine down to ``final_learning_rate`` on the last step: the end
    of the decay takes out the step noise that a constant rate leaves in the loss."""
    return optax.warmup_cosine_decay_schedule(0.0, training.learning_rate, int(training.warmup * training.steps),
                                              training.steps, training.final_learning_rate)


@functools.lru_cache(maxsize=4)
def make_step(config: DalleBartConfig, training: DalleBartTraining):
    """The optimiser and a jitted ``step(params, opt_state, ids, mask, codes, empty_ids, empty_mask) -> (params,
    opt_state, loss)``, the empty prompt read only by the guided objective; cached, so runs with the same
    settings compile once."""
    optimiser = optax.adamw(learning_rate_schedule(training))

    @jax.jit
    def step(params, opt_state, input_ids, attention_mask, codes, empty_ids, empty_mask):
        if training.guided_scale:
            loss, grads = jax.value_and_grad(guided_loss_fn, argnums=1)(
                config, params, input_ids, attention_mask, codes, empty_ids, empty_mask, training.guided_scale)
        else:
            loss, grads = jax.value_and_grad(loss_fn, argnums=1)(config, params, input_ids, attention_mask, codes)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return optimiser, step


def batches(pairs: Pairs, training: DalleBartTraining, seed: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Endless shuffled (ids, mask, codes) batches, each epoch in a new seeded order, some captions emptied."""
    rng = np.random.default_rng(seed)
    size = training.batch_size
    while True:
        order = rng.permutation(len(pairs.codes))
        for start in range(0, len(order) - size + 1, size):
            rows = order[start:start + size]
            empty = rng.random(size) < training.unconditional
            ids = np.where(empty[:, None], pairs.empty_ids, pairs.input_ids[rows])
            mask = np.where(empty[:, None], pairs.empty_mask, pairs.attention_mask[rows])
            yield ids, mask, pairs.codes[rows]


@struct.dataclass
class Progress:
    """Where a phase stands: all it needs to go on as if it had never stopped (the batch order replays from
    the seed)."""

    params: Any  # the runtime parameter tree
    opt_state: Any  # the optimiser's state for it
    step: jax.Array  # int32 scalar: steps done


def begin(config: DalleBartConfig, training: DalleBartTraining, seed: int, params=None) -> Progress:
    """Step 0 of a phase: ``params`` (an earlier phase's) or else ``dallebart.init_params(config, seed,
    runtime=True)``, with a fresh optimiser."""
    if params is None:
        params = dallebart.init_params(config, seed, runtime=True)
    optimiser, _ = make_step(config, training)
    return Progress(params, optimiser.init(params), jnp.int32(0))


def train(config: DalleBartConfig, training: DalleBartTraining, pairs: Pairs, seed: int, progress: Progress,
          on_step=lambda step, loss: None, save=None, save_every: int = 250) -> Progress:
    """The phase run on from ``progress`` to its last step; ``save`` (if given) sees the progress every
    ``save_every`` steps and at the end."""
    _, step = make_step(config, training)
    stream = batches(pairs, training, seed)
    done = int(progress.step)
    for _ in range(done):  # the batches read before the stop, so the order goes on where it was
        next(stream)
    split = devices.BatchSplit(training.batch_size)
    params, opt_state, empty_ids, empty_mask = split.replicated(
        (progress.params, progress.opt_state, pairs.empty_ids, pairs.empty_mask))  # placed once, read every step
    for i in range(done, training.steps):
        params, opt_state, loss = step(params, opt_state, *split.rows(*next(stream)), empty_ids, empty_mask)
        on_step(i, float(loss))
        if save is not None and ((i + 1) % save_every == 0 or i + 1 == training.steps):
            save(Progress(params, opt_state, jnp.int32(i + 1)))
    return Progress(params, opt_state, jnp.int32(training.steps))
