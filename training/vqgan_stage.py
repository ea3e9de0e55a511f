"""Stage 1: a VQGAN of the project's architecture trained on scene pictures, through dalle_space.vqgan's own
encode / quantise / decode functions, so the trained tree is a checkpoint the app loads unchanged.

Loss: mean squared reconstruction error, plus the VQ-VAE codebook and commitment terms, with the
straight-through estimator carrying the decoder's gradient past the quantiser. No perceptual or adversarial
loss: flat shapes on flat backgrounds have no texture for them to restore; whether pixel error alone keeps
edges sharp enough is for the judge to say on reconstructions.

The codebook is kept alive from outside the loss: trained as it was, from ``init_params``' unit-normal rows
far from the encoder's outputs, it collapsed to 2 of its 256 codes and reconstructions lost their colours.
So it starts as k-means centres of the first batches' latents, and every ``reseed_every`` steps the codes no
latent chose since the last check move onto current latents, drawn in proportion to how badly they are
quantised now. Both only set codebook rows, so the exported tree is an ordinary checkpoint.

A second phase (``SETTLE``) goes on from the first at half its learning rate, without restarts or re-seeding:
at the first phase's constant rate the decoder never drew fine detail, and stars came back as pentagons or blots
in 40% of reconstructions; 500 settling steps keep them (training/README.md, thirteenth run).

A third phase (``FLAT``) gives the DalleBart codes it can predict. Trained as above, the encoder's global
attention spreads what it sees of the shapes over the background, so a plain background takes 18 different
codes in one picture and only a quarter of flat cells get their colour's most common code: noise the DalleBart
spends its loss on. ``FLAT`` holds every cell of one named colour to that colour's code (``colour_codes``) for
a few hundred steps, so the decoder learns to draw from such maps, and stage 2 reads ``flat_codes`` maps.

A fourth phase (``DECODE``) trains the decoder alone on ``FLAT``'s maps at half its rate: the codes stay what
the DalleBart learned, and the colours drawn from them come out right. After ``FLAT`` the decoder still painted
purple shapes on warm backgrounds half-way to blue (the judge read 14 of 256 lone shapes' purple as blue); 300
such steps drew 253 of the 256 in their colour, against 233 (training/README.md, fifteenth run).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dalle_space import scenes, vqgan
from dalle_space.config import VQGANConfig
from training import data, devices


@dataclasses.dataclass(frozen=True)
class VQGANTraining:
    steps: int = 1700  # 21 min at 0.75 s a step on 2 CPU cores; shapes are the last thing it learns
    batch_size: int = 16
    learning_rate: float = 1e-3
    commitment: float = 0.25  # weight of |z - sg(e)|^2, pulling encoder outputs to their codes
    kmeans_batches: int = 4  # batches of latents the codebook starts from as k-means centres; 0: init_params'
    reseed_every: int = 50  # steps between re-seeding the codes left unused; 0: never
    reseed_until: float = 0.8  # share of the steps after which the codebook is left to settle
    flat: bool = False  # every cell of one named colour takes that colour's code, not its nearest
    decoder_only: bool = False  # only post_quant_conv and the decoder learn, so every picture keeps its codes


# The second phase, from the first's parameters: the first's objective at half its rate, the codebook settled.
SETTLE = VQGANTraining(steps=500, learning_rate=5e-4, kmeans_batches=0, reseed_every=0)
# The third, from the second's: the same settings for 300 steps, flat cells held to their colour's code.
FLAT = dataclasses.replace(SETTLE, steps=300, flat=True)
# The fourth, from the third's: the decoder alone, at half the rate again, on the same flat-cell maps.
DECODE = dataclasses.replace(FLAT, learning_rate=2.5e-4, decoder_only=True)


def loss_fn(config: VQGANConfig, params, images, commitment: float, forced=None):
    """(total loss, ((reconstruction error, quantisation error), latents, codes)) on images (B, H, W, 3) in
    [0, 1]; the latents and their codes are what re-seeding reads. ``forced`` (B, h * w): the code each cell
    must take, -1 where its nearest code stands.

    The quantisation error |z - e|^2 enters twice with different gradients: in full towards the codebook
    entries e, times ``commitment`` towards the encoder's latents z.
    """
    latents = vqgan.encode_latents(config, params, images)
    codes = vqgan.nearest_codes(params, latents)
    if forced is not None:
        forced = forced.reshape(codes.shape)
        codes = jnp.where(forced >= 0, forced, codes)
    table = params["quantize"]["embedding"]["embedding"]
    chosen = jnp.take(table, codes, axis=0).reshape(latents.shape)
    straight_through = latents + jax.lax.stop_gradient(chosen - latents)
    reconstruction = jnp.mean((vqgan.decode_latents(config, params, straight_through) - images) ** 2)
    codebook = jnp.mean((chosen - jax.lax.stop_gradient(latents)) ** 2)
    commit = jnp.mean((latents - jax.lax.stop_gradient(chosen)) ** 2)
    return reconstruction + codebook + commitment * commit, ((reconstruction, codebook), latents, codes)


@functools.lru_cache(maxsize=4)
def make_step(config: VQGANConfig, training: VQGANTraining):
    """The optimiser and a jitted ``step(params, opt_state, images, forced) -> (params, opt_state, loss,
    terms, latents, codes)``, the latents flat (B * h * w, embed_dim); cached, so runs with the same settings
    compile once."""
    optimiser = optax.adam(training.learning_rate)
    if training.decoder_only:
        optimiser = optax.multi_transform({"learns": optimiser, "kept": optax.set_to_zero()}, _decoder_labels)

    @jax.jit
    def step(params, opt_state, images, forced):
        (loss, (terms, latents, codes)), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
            config, params, images, training.commitment, forced)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, loss, terms,
                latents.reshape(-1, latents.shape[-1]), codes.reshape(-1))

    return optimiser, step


def _decoder_labels(params):
    """Which parameters a decoder-only phase trains: everything after the quantiser."""
    return {part: jax.tree.map(lambda _: "learns" if part in ("post_quant_conv", "decoder") else "kept", tree)
            for part, tree in params.items()}


def batches(images: np.ndarray, forced: np.ndarray | None, batch_size: int, seed: int) -> Iterator[tuple]:
    """Endless shuffled batches of float32 [0, 1] images and their rows of ``forced`` (None: nearest codes
    everywhere), each epoch in a new seeded order."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(images))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start:start + batch_size]
            yield data.to_unit(images[rows]), None if forced is None else forced[rows]


def train(config: VQGANConfig, training: VQGANTraining, images: np.ndarray, seed: int,
          on_step=lambda step, loss, terms: None, params=None) -> Any:
    """Trained parameters from ``params`` (the phase before's, for ``SETTLE`` and ``FLAT``) or else from
    ``vqgan.init_params(config, seed)``; ``on_step`` sees every step's losses."""
    if params is None:
        params = vqgan.init_params(config, seed)
    params = jax.tree.map(jnp.asarray, params)
    rng = np.random.default_rng(seed)
    forced = None
    if training.flat:  # only the election's pictures need encoding
        forced = held_codes(encode_all(config, params, images[:ELECTION_PICTURES]),
                            data.flat_colours(images, config.downsampling))
    stream = batches(images, forced, training.batch_size, seed)
    if training.kmeans_batches:
        encode = jax.jit(vqgan.encode_latents, static_argnums=0)
        latents = np.concatenate([np.asarray(encode(config, params, next(stream)[0])).reshape(-1, config.embed_dim)
                                  for _ in range(training.kmeans_batches)])
        params = _with_codebook(params, kmeans(latents, config.n_embed, rng))
    optimiser, step = make_step(config, training)
    split = devices.BatchSplit(training.batch_size)
    params = split.replicated(params)
    opt_state = split.replicated(optimiser.init(params))
    unused = np.ones(config.n_embed, bool)
    for i in range(training.steps):
        params, opt_state, loss, terms, latents, codes = step(params, opt_state, *split.rows(*next(stream)))
        on_step(i, float(loss), tuple(float(t) for t in terms))
        if training.reseed_every:
            unused[np.asarray(codes)] = False
            if (i + 1) % training.reseed_every == 0:
                if i + 1 < training.reseed_until * training.steps and unused.any():
                    table = np.array(params["quantize"]["embedding"]["embedding"])
                    table[unused] = reseeded(np.asarray(latents), table, int(unused.sum()), rng)
                    params = split.replicated(_with_codebook(params, table))
                unused[:] = True
    return params


def _with_codebook(params, table: np.ndarray):
    return {**params, "quantize": {"embedding": {"embedding": jnp.asarray(table, jnp.float32)}}}


def _squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return (points**2).sum(1, keepdims=True) + (centres**2).sum(1) - 2 * points @ centres.T


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 10) -> np.ndarray:
    """k centres (k, dim) of points (n, dim), Lloyd's iterations from k distinct points; a centre left
    without points keeps its place. Flat backgrounds give the same latent thousands of times, so the
    starting picks are drawn from the distinct points, not weighted by how often each repeats."""
    distinct = np.unique(points, axis=0)
    centres = distinct[rng.choice(len(distinct), k, replace=len(distinct) < k)]
    centres = centres + 1e-3 * rng.standard_normal(centres.shape)  # repeated picks must still differ
    for _ in range(iterations):
        nearest = _squared_distances(points, centres).argmin(1)
        sums = np.zeros_like(centres)
        np.add.at(sums, nearest, points)
        counts = np.bincount(nearest, minlength=k)[:, None]
        centres = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
    return centres.astype(np.float32)


def reseeded(latents: np.ndarray, table: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n new codebook rows: latents drawn with probability in proportion to their squared distance from the
    nearest code, so the codes go where quantisation loses most, not to the background's many copies."""
    error = np.maximum(_squared_distances(latents, table).min(1), 0.0) + 1e-12  # every latent stays possible
    chance = error / error.sum()
    picks = rng.choice(len(latents), n, replace=len(latents) < n, p=chance)
    return latents[picks] + 1e-3 * rng.standard_normal((n, latents.shape[1])).astype(np.float32)


# Pictures whose flat cells elect each colour's code: thousands of cells of every colour.
ELECTION_PICTURES = 2000


def colour_codes(codes: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """int32 (len(scenes.COLOURS),): the code each colour's flat cells most often take in the first
    ``ELECTION_PICTURES`` rows of ``codes`` (nearest codes) and ``flat`` (``data.flat_colours`` of the same
    pictures), -1 for a colour with no flat cell there."""
    codes, flat = codes[:ELECTION_PICTURES], flat[:ELECTION_PICTURES]
    return np.array([np.bincount(codes[flat == colour]).argmax() if (flat == colour).any() else -1
                     for colour in range(len(scenes.COLOURS))], np.int32)


def held_codes(codes: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """int32 like ``flat``: each flat cell's colour code (``colour_codes``), -1 for the other cells."""
    return np.append(colour_codes(codes, flat), np.int32(-1))[flat]  # flat_colours' -1 picks the -1


def flat_codes(config: VQGANConfig, params, images: np.ndarray) -> np.ndarray:
    """Stage 2's targets: ``encode_all``'s codes with every flat cell given its colour's code, the maps
    ``FLAT`` trains the decoder to draw from."""
    codes = encode_all(config, params, images)
    held = held_codes(codes, data.flat_colours(images, config.downsampling))
    return np.where(held >= 0, held, codes).astype(np.int32)


# Compiled once per process and shape, not on every call (a run encodes for the election and for the codes).
_encode_images = jax.jit(vqgan.encode_images, static_argnums=0)


def encode_all(config: VQGANConfig, params, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """int32 nearest codes (N, grid_side**2) of uint8 pictures (``flat_codes`` builds on them), a batch at a time,
    each split over the devices as a training batch is (``devices.BatchSplit``; on one device the encoder kept
    one core of two busy) and the last padded to the batch's size."""
    split = devices.BatchSplit(batch_size)
    params = split.replicated(params)
    codes = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        padded = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]), batch.dtype)])
        codes.append(np.asarray(_encode_images(config, params, *split.rows(data.to_unit(padded))))[:len(batch)])
    return np.concatenate(codes)
