"""Stage 2: a DalleBart of the project's architecture trained on (caption, VQGAN codes) pairs, through
dalle_space.dallebart's own encode / decode_logits on the runtime parameter tree the sampler uses.

Teacher forcing: the decoder reads the start token then the codes shifted by one and is scored by
cross-entropy on every code. A fraction of captions is replaced by the empty prompt, so the model also
learns the unconditional distribution that super-conditioning (condition scale > 1) moves away from.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dalle_space import dallebart
from dalle_space.config import DalleBartConfig


@dataclasses.dataclass(frozen=True)
class DalleBartTraining:
    steps: int = 1500  # 19 min at 0.74 s a step on 2 CPU cores
    batch_size: int = 32
    learning_rate: float = 1e-3
    unconditional: float = 0.1  # share of captions swapped for the empty prompt


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
    start = jnp.full((codes.shape[0], 1), config.decoder_start_token_id, codes.dtype)
    decoder_input = jnp.concatenate([start, codes[:, :-1]], axis=1)
    states = dallebart.encode(config, params, input_ids, attention_mask)
    return dallebart.decode_logits(config, params, decoder_input, states, attention_mask)


def loss_fn(config: DalleBartConfig, params, input_ids, attention_mask, codes):
    """Mean cross-entropy of every code given the caption and the codes before it."""
    logits = next_code_logits(config, params, input_ids, attention_mask, codes)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), codes).mean()


@functools.lru_cache(maxsize=4)
def make_step(config: DalleBartConfig, training: DalleBartTraining):
    """The optimiser and a jitted ``step(params, opt_state, ids, mask, codes) -> (params, opt_state, loss)``;
    cached, so runs with the same settings compile once."""
    optimiser = optax.adamw(training.learning_rate)

    @jax.jit
    def step(params, opt_state, input_ids, attention_mask, codes):
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


def train(config: DalleBartConfig, training: DalleBartTraining, pairs: Pairs, seed: int,
          on_step=lambda step, loss: None) -> Any:
    """Trained runtime parameters from ``dallebart.init_params(config, seed, runtime=True)``."""
    params = dallebart.init_params(config, seed, runtime=True)
    optimiser, step = make_step(config, training)
    opt_state = optimiser.init(params)
    stream = batches(pairs, training, seed)
    for i in range(training.steps):
        params, opt_state, loss = step(params, opt_state, *next(stream))
        on_step(i, float(loss))
    return params
