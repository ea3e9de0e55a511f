"""VQGAN encoder path (pixels -> codes) on the tiny fixture checkpoint, whose msgpack holds vqgan-jax's encoder.

With random weights a reconstruction means nothing, so these check structure: shapes and ranges, that every
encoder parameter is read under vqgan-jax's name, the quantiser's choice, downsampling's padding side,
determinism and batch independence.
"""

from __future__ import annotations

import json
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_space import vqgan
from dalle_space.config import VQGANConfig

TINY = Path(__file__).parent / "fixtures" / "vqgan-tiny"

encode = jax.jit(vqgan.encode_images, static_argnums=0)
latents_of = jax.jit(vqgan.encode_latents, static_argnums=0)


@pytest.fixture(scope="module")
def config() -> VQGANConfig:
    return VQGANConfig.from_dict(json.loads((TINY / "config.json").read_text()))


@pytest.fixture(scope="module")
def params():
    return flax.serialization.msgpack_restore((TINY / "flax_model.msgpack").read_bytes())


@pytest.fixture(scope="module")
def images(config):
    return np.random.default_rng(0).uniform(0, 1, (3, config.resolution, config.resolution, 3)).astype(np.float32)


def test_codes_have_the_grid_shape_and_codebook_range(config, params, images):
    codes = np.asarray(encode(config, params, images))
    assert codes.shape == (3, config.grid_side**2) == (3, 256)
    assert codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < config.n_embed
    assert len(np.unique(codes)) > 10  # not one constant code
    assert np.asarray(latents_of(config, params, images)).shape == (3, 16, 16, config.embed_dim)


def test_encoding_is_deterministic_and_each_image_is_encoded_alone(config, params, images):
    codes = np.asarray(encode(config, params, images))
    np.testing.assert_array_equal(codes, np.asarray(encode(config, params, images)))
    for i in range(len(images)):
        np.testing.assert_array_equal(np.asarray(encode(config, params, images[i:i + 1]))[0], codes[i])


def test_every_encoder_parameter_is_read_and_no_decoder_one(config, params, images):
    """Gradients reach each leaf of encoder/ and quant_conv/ (names as vqgan-jax writes them), none elsewhere."""
    grads = jax.jit(jax.grad(lambda p: jnp.sum(vqgan.encode_latents(config, p, images[:1]) ** 2)))(params)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name = "/".join(k.key for k in path)
        used = name.startswith(("encoder/", "quant_conv/"))
        assert bool(np.any(np.asarray(g) != 0)) == used, name
    shapes = jax.tree.map(lambda s: s.shape, vqgan.param_shapes(config))
    assert jax.tree.map(np.shape, params) == shapes  # the fixture's tree is the one param_shapes describes


def test_latents_take_their_nearest_codebook_entry(params):
    table = np.asarray(params["quantize"]["embedding"]["embedding"])
    chosen = np.random.default_rng(1).integers(0, len(table), size=(2, 256))
    latents = table[chosen] + np.random.default_rng(2).normal(0, 1e-3, (2, 256, table.shape[1]))
    codes = np.asarray(vqgan.nearest_codes(params, jnp.asarray(latents.reshape(2, 16, 16, -1), jnp.float32)))
    np.testing.assert_array_equal(codes, chosen)


def test_decoding_the_chosen_entries_is_decode_codes(config, params, images):
    codes = encode(config, params, images[:1])
    table = params["quantize"]["embedding"]["embedding"]
    quantised = jnp.take(table, codes, axis=0).reshape(1, 16, 16, -1)
    np.testing.assert_array_equal(np.asarray(vqgan.decode_latents(config, params, quantised)),
                                  np.asarray(vqgan.decode_codes(config, params, codes)))


def test_downsampling_pads_bottom_and_right():
    """A kernel with one tap at (row, col) reads input pixel (2i + row, 2j + col); the pad is after the end."""
    x = jnp.arange(1.0, 17.0).reshape(1, 4, 4, 1)
    for tap, expected in (((0, 0), [[1, 3], [9, 11]]), ((2, 2), [[11, 0], [0, 0]])):
        kernel = np.zeros((3, 3, 1, 1), np.float32)
        kernel[tap] = 1.0
        out = vqgan._downsample({"conv": {"kernel": kernel, "bias": np.zeros(1, np.float32)}}, x)
        np.testing.assert_array_equal(np.asarray(out)[0, :, :, 0], expected)


def test_wrong_image_size_is_refused(config, params):
    with pytest.raises(ValueError, match=r"\(batch, 64, 64, 3\)"):
        vqgan.encode_images(config, params, np.zeros((1, 32, 32, 3), np.float32))
