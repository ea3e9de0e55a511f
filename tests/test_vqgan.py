"""VQGAN decode path against outputs of upstream vqgan-jax @10ef240 on the tiny fixture checkpoint."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import flax.serialization
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_space import vqgan
from dalle_space.config import VQGAN_PRESETS, VQGANConfig

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "vqgan-tiny"
DECODE_PATH = ("quantize", "post_quant_conv", "decoder")

decode = jax.jit(vqgan.decode_codes, static_argnums=0)


@pytest.fixture(scope="module")
def config() -> VQGANConfig:
    return VQGANConfig.from_dict(json.loads((TINY / "config.json").read_text()))


@pytest.fixture(scope="module")
def params():
    return flax.serialization.msgpack_restore((TINY / "flax_model.msgpack").read_bytes())


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(TINY / "expected.npz"))


def _flat(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """'a/b/c' -> (shape, dtype name) for every leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(k.key for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in leaves
    }


def _read_params_txt(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, dtype = line.split("\t")
        rows[name] = (tuple(int(d) for d in re.findall(r"\d+", shape)), dtype)
    return rows


def _count(rows, prefixes=None) -> int:
    return sum(math.prod(shape) for name, (shape, _) in rows.items()
               if prefixes is None or name.split("/")[0] in prefixes)


def test_fixture_config_is_the_one_upstream_built(config):
    assert config == VQGANConfig.from_dict(json.loads((TINY / "meta.json").read_text())["config"])


def test_decode_matches_upstream(config, params, expected):
    codes = jnp.asarray(expected["codes"])
    quant = vqgan._lookup(config, params, codes)
    np.testing.assert_array_equal(np.asarray(quant), expected["quant_states"])
    post = vqgan._conv(params["post_quant_conv"], quant)
    np.testing.assert_allclose(np.asarray(post), expected["post_quant_conv"], atol=1e-5, rtol=1e-5)

    images = decode(config, params, codes)
    assert images.shape == (2, 64, 64, 3) and images.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(images), expected["decoded"], atol=1e-5, rtol=1e-5)


def test_decode_ignores_encoder_params(config, params, expected):
    decode_only = {k: params[k] for k in DECODE_PATH}
    np.testing.assert_array_equal(
        np.asarray(decode(config, decode_only, expected["codes"])),
        np.asarray(decode(config, params, expected["codes"])),
    )


def test_code_grid_is_row_major(config, params):
    """Code k sits at grid cell (k // side, k % side): a single changed code alters only its own cell."""
    codes = np.zeros((1, 256), np.int32)
    codes[0, 16 * 3 + 5] = 7
    quant = np.asarray(vqgan._lookup(config, params, jnp.asarray(codes)))
    table = params["quantize"]["embedding"]["embedding"]
    np.testing.assert_array_equal(quant[0, 3, 5], table[7])
    np.testing.assert_array_equal(quant[0, 5, 3], table[0])


def test_out_of_range_codes_are_clamped(config, params, expected):
    codes = expected["codes"].copy()
    codes[0, :5] = [-1, -1000, 256, 10**6, 255]
    codes[1, -3:] = [300, -7, 0]
    images = np.asarray(decode(config, params, codes))
    assert np.isfinite(images).all()
    clamped = np.clip(codes, 0, config.n_embed - 1)
    np.testing.assert_array_equal(images, np.asarray(decode(config, params, clamped)))


def test_wrong_code_count_is_refused(config, params):
    with pytest.raises(ValueError, match="256"):
        vqgan.decode_codes(config, params, np.zeros((1, 255), np.int32))


def _primitive_dtypes(jaxpr, found=None) -> dict[str, set[str]]:
    """Primitive name -> output dtypes, through nested jaxprs."""
    found = {} if found is None else found
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _primitive_dtypes(sub, found)
        found.setdefault(eqn.primitive.name, set()).update(str(v.aval.dtype) for v in eqn.outvars)
    return found


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_dtype_policy(config, dtype):
    """Convs and matmuls run in the params' dtype; GroupNorm statistics and softmax in float32."""
    half = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), vqgan.param_shapes(config, False))
    codes = jax.ShapeDtypeStruct((1, 256), jnp.int32)
    closed = jax.make_jaxpr(lambda p, c: vqgan.decode_codes(config, p, c))(half, codes)
    dtypes = _primitive_dtypes(closed.jaxpr)
    name = jnp.dtype(dtype).name
    assert dtypes["conv_general_dilated"] == dtypes["dot_general"] == {name}
    for stat in ("reduce_sum", "rsqrt", "reduce_max", "exp"):
        assert dtypes[stat] == {"float32"}, stat
    assert closed.out_avals[0].dtype == jnp.float32


@pytest.mark.parametrize("dtype, max_err, mean_err", [(jnp.bfloat16, 0.3, 0.03), (jnp.float16, 0.05, 0.005)])
def test_half_precision_params(config, params, expected, dtype, max_err, mean_err):
    half = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    images = np.asarray(decode(config, half, expected["codes"]))
    assert images.dtype == np.float32
    err = np.abs(images - expected["decoded"])
    assert err.max() < max_err and err.mean() < mean_err


def test_to_uint8():
    images = np.array([[-0.5, 0.0, 0.2, 0.5, 1.0, 3.0]], np.float32)
    out = vqgan.to_uint8(images)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 0, 51, 128, 255, 255]])


def test_param_shapes_real_model():
    rows = _read_params_txt(FIXTURES / "vqgan-f16-16384-params.txt")
    shapes = vqgan.param_shapes(VQGAN_PRESETS["f16_16384"])
    assert _flat(shapes) == rows
    assert len(rows) == 343 and _count(rows) == 76_073_859

    decode_only = _flat(vqgan.param_shapes(VQGAN_PRESETS["f16_16384"], include_encoder=False))
    assert decode_only == {k: v for k, v in rows.items() if k.split("/")[0] in DECODE_PATH}
    assert _count(decode_only) == 46_709_891


def test_param_shapes_tiny(config, params):
    rows = _read_params_txt(TINY / "params.txt")
    assert _flat(vqgan.param_shapes(config)) == rows == _flat(params)
    assert _count(rows) == 1_079_491 and _count(rows, DECODE_PATH) == 635_587


def test_real_model_decode_shape():
    config = VQGAN_PRESETS["f16_16384"]
    out = jax.eval_shape(
        lambda p, c: vqgan.decode_codes(config, p, c),
        vqgan.param_shapes(config, include_encoder=False),
        jax.ShapeDtypeStruct((2, 256), jnp.int32),
    )
    assert (out.shape, out.dtype) == ((2, 256, 256, 3), jnp.float32)


def test_init_params(config, expected):
    a, b = vqgan.init_params(config, 3), vqgan.init_params(config, 3)
    assert _flat(a) == _flat(vqgan.param_shapes(config))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    other = vqgan.init_params(config, 4)
    assert not np.array_equal(a["decoder"]["conv_in"]["kernel"], other["decoder"]["conv_in"]["kernel"])

    images = np.asarray(decode(config, a, expected["codes"]))
    assert np.isfinite(images).all() and images.std() > 0.05
    assert ((images >= 0) & (images <= 1)).mean() > 0.8  # not saturated once clipped for display
