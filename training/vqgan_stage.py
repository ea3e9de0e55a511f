"""Stage 1: a VQGAN of the project's architecture trained on scene pictures, through dalle_space.vqgan's own
encode / quantise / decode functions, so the trained tree is a checkpoint the app loads unchanged.

Loss: mean squared reconstruction error, plus the VQ-VAE codebook and commitment terms, with the
straight-through estimator carrying the decoder's gradient past the quantiser. No perceptual or adversarial
loss: flat shapes on flat backgrounds have no texture for them to restore; whether pixel error alone keeps
edges sharp enough is for the judge to say on reconstructions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dalle_space import vqgan
from dalle_space.config import VQGANConfig
from training import data


@dataclasses.dataclass(frozen=True)
class VQGANTraining:
    steps: int = 1200  # ~18 min at 0.9 s a step on 2 CPU cores
    batch_size: int = 16
    learning_rate: float = 1e-3
    commitment: float = 0.25  # weight of |z - sg(e)|^2, pulling encoder outputs to their codes


def loss_fn(config: VQGANConfig, params, images, commitment: float):
    """(total loss, (reconstruction error, quantisation error)) on images (B, H, W, 3) in [0, 1].

    The quantisation error |z - e|^2 enters twice with different gradients: in full towards the codebook
    entries e, times ``commitment`` towards the encoder's latents z.
    """
    latents = vqgan.encode_latents(config, params, images)
    codes = vqgan.nearest_codes(params, latents)
    table = params["quantize"]["embedding"]["embedding"]
    chosen = jnp.take(table, codes, axis=0).reshape(latents.shape)
    straight_through = latents + jax.lax.stop_gradient(chosen - latents)
    reconstruction = jnp.mean((vqgan.decode_latents(config, params, straight_through) - images) ** 2)
    codebook = jnp.mean((chosen - jax.lax.stop_gradient(latents)) ** 2)
    commit = jnp.mean((latents - jax.lax.stop_gradient(chosen)) ** 2)
    return reconstruction + codebook + commitment * commit, (reconstruction, codebook)


@functools.lru_cache(maxsize=4)
def make_step(config: VQGANConfig, training: VQGANTraining):
    """The optimiser and a jitted ``step(params, opt_state, images) -> (params, opt_state, loss, terms)``;
    cached, so runs with the same settings compile once."""
    optimiser = optax.adam(training.learning_rate)

    @jax.jit
    def step(params, opt_state, images):
        (loss, terms), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
            config, params, images, training.commitment)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, terms

    return optimiser, step


def batches(images: np.ndarray, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless shuffled batches of float32 [0, 1] images, each epoch in a new seeded order."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(images))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield data.to_unit(images[order[start:start + batch_size]])


def train(config: VQGANConfig, training: VQGANTraining, images: np.ndarray, seed: int,
          on_step=lambda step, loss, terms: None) -> Any:
    """Trained parameters from ``vqgan.init_params(config, seed)``; ``on_step`` sees every step's losses."""
    params = jax.tree.map(jnp.asarray, vqgan.init_params(config, seed))
    optimiser, step = make_step(config, training)
    opt_state = optimiser.init(params)
    stream = batches(images, training.batch_size, seed)
    for i in range(training.steps):
        params, opt_state, loss, terms = step(params, opt_state, next(stream))
        on_step(i, float(loss), tuple(float(t) for t in terms))
    return params


def encode_all(config: VQGANConfig, params, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """int32 codes (N, grid_side**2) of uint8 pictures, a batch at a time: stage 2's targets."""
    encode = jax.jit(vqgan.encode_images, static_argnums=0)
    return np.concatenate([np.asarray(encode(config, params, data.to_unit(images[i:i + batch_size])))
                           for i in range(0, len(images), batch_size)])
