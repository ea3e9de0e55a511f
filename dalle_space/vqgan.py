"""VQGAN encoder (pixels -> codes) and decoder (codes -> pixels) as plain functions over the checkpoint's
nested param dict.

Parameter names, shapes and the computation follow patil-suraj/vqgan-jax (the format of hub
``dalle-mini/vqgan_imagenet_f16_16384``), so its ``flax_model.msgpack`` loads without conversion.
Data is NHWC and conv kernels HWIO, as in flax. Generation only decodes; the encoder path (pixels -> codes)
is there to turn training images into codes and to train or fine-tune a VQGAN through the same functions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dalle_space.config import VQGANConfig

_GROUPS = 32  # GroupNorm groups everywhere in the model
_EPS = 1e-6


# --------------------------------------------------------------------------- layers


def _conv(p, x):
    """Stride-1 conv with 'same' padding (3x3 kernels pad 1, 1x1 kernels none), plus bias."""
    kernel = p["kernel"].astype(x.dtype)
    pad = kernel.shape[0] // 2
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + p["bias"].astype(x.dtype)


def _group_norm(p, x):
    """GroupNorm with statistics in float32, so half-precision params do not lose the normalisation.

    Variance as E[x^2] - E[x]^2 and the scale folded into the inverse std, the way flax computes it,
    keeps float32 results within rounding of upstream's.
    """
    b, h, w, c = x.shape
    xf = x.astype(jnp.float32).reshape(b, h, w, _GROUPS, c // _GROUPS)
    mean = xf.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.maximum((xf * xf).mean(axis=(1, 2, 4), keepdims=True) - mean * mean, 0.0)
    inv = jax.lax.rsqrt(var + _EPS) * p["scale"].astype(jnp.float32).reshape(_GROUPS, c // _GROUPS)
    y = ((xf - mean) * inv).reshape(b, h, w, c) + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def _resnet_block(p, x):
    """norm -> swish -> conv, twice, plus a residual that a 1x1 conv resizes when channels change."""
    h = _conv(p["conv1"], jax.nn.silu(_group_norm(p["norm1"], x)))
    h = _conv(p["conv2"], jax.nn.silu(_group_norm(p["norm2"], h)))  # dropout is 0 / off at inference
    if "nin_shortcut" in p:
        x = _conv(p["nin_shortcut"], x)
    return x + h


def _attn_block(p, x):
    """Single-head self-attention over all pixels, softmax in float32, residual added after proj_out."""
    b, h, w, c = x.shape
    hn = _group_norm(p["norm"], x)
    q, k, v = (_conv(p[name], hn).reshape(b, h * w, c) for name in ("q", "k", "v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * c**-0.5
    weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, h, w, c)
    return x + _conv(p["proj_out"], out)


def _level(level_params, x, n_blocks: int):
    """A resolution level's resnet blocks, each followed by its own attention block where the level has them.

    Pairing block_i with attn_i is vqgan-jax @10ef240's; revision 44cb011 runs every attn of the level after
    each block, which the decoder's reference outputs rule out.
    """
    for i in range(n_blocks):
        x = _resnet_block(level_params[f"block_{i}"], x)
        if f"attn_{i}" in level_params:
            x = _attn_block(level_params[f"attn_{i}"], x)
    return x


def _downsample(p, x):
    """Halves each side: pad one row and column at the bottom and right, then a stride-2 3x3 conv, unpadded."""
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    kernel = p["conv"]["kernel"].astype(x.dtype)
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(2, 2), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["conv"]["bias"].astype(x.dtype)


def _upsample(p, x):
    """Nearest-neighbour 2x (each pixel repeated), then a 3x3 conv."""
    return _conv(p["conv"], jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


# --------------------------------------------------------------------------- encode


def _encoder(config: VQGANConfig, p, x):
    """conv_in -> down_0 ... down_{n-1} (each but the last halving the side) -> mid -> norm_out -> swish -> conv_out."""
    x = _conv(p["conv_in"], x)
    for level in range(config.num_resolutions):
        down = p[f"down_{level}"]
        x = _level(down, x, config.num_res_blocks)
        if level != config.num_resolutions - 1:
            x = _downsample(down["downsample"], x)
    mid = p["mid"]
    x = _resnet_block(mid["block_2"], _attn_block(mid["attn_1"], _resnet_block(mid["block_1"], x)))
    return _conv(p["conv_out"], jax.nn.silu(_group_norm(p["norm_out"], x)))


def encode_latents(config: VQGANConfig, params, images) -> jax.Array:
    """Continuous latents (B, grid_side, grid_side, embed_dim) of images (B, H, W, 3) with values in [0, 1].

    Encoder then quant_conv, before quantisation; [0, 1] is the range :func:`decode_codes` produces.
    """
    images = jnp.asarray(images)
    side = config.resolution
    if images.ndim != 4 or images.shape[1:] != (side, side, config.in_channels):
        raise ValueError(f"images must have shape (batch, {side}, {side}, {config.in_channels}), got {images.shape}")
    dtype = params["quantize"]["embedding"]["embedding"].dtype
    x = _encoder(config, params["encoder"], images.astype(dtype))
    return _conv(params["quant_conv"], x)


def nearest_codes(params, latents) -> jax.Array:
    """int32 codes (B, h * w), row-major over the grid: the codebook entry nearest each latent vector.

    Squared distances as |z|^2 + |e|^2 - 2 z.e in float32, one matrix product for the whole batch.
    """
    table = params["quantize"]["embedding"]["embedding"].astype(jnp.float32)
    z = latents.reshape(latents.shape[0], -1, latents.shape[-1]).astype(jnp.float32)
    distance = (z * z).sum(-1, keepdims=True) + (table * table).sum(-1) - 2 * jnp.einsum("bnc,kc->bnk", z, table)
    return jnp.argmin(distance, axis=-1).astype(jnp.int32)


def encode_images(config: VQGANConfig, params, images) -> jax.Array:
    """int32 codes (B, grid_side**2) of images (B, H, W, 3) in [0, 1], the inverse direction of
    :func:`decode_codes`; jit with ``config`` static."""
    return nearest_codes(params, encode_latents(config, params, images))


# --------------------------------------------------------------------------- decode


def _lookup(config: VQGANConfig, params, codes):
    """Codebook vectors laid out row-major on the grid: code k lands at (k // side, k % side)."""
    side = config.grid_side
    if codes.ndim != 2 or codes.shape[1] != side * side:
        raise ValueError(f"codes must have shape (batch, {side * side}), got {codes.shape}")
    table = params["quantize"]["embedding"]["embedding"]
    # Clamped so a stray out-of-range id yields a real codebook row instead of NaN fill values.
    z = jnp.take(table, jnp.clip(codes, 0, config.n_embed - 1), axis=0)
    return z.reshape(codes.shape[0], side, side, config.embed_dim)


def _decoder(config: VQGANConfig, p, x):
    """conv_in -> mid -> up_{n-1} ... up_0 -> norm_out -> swish -> conv_out."""
    x = _conv(p["conv_in"], x)
    mid = p["mid"]
    x = _resnet_block(mid["block_2"], _attn_block(mid["attn_1"], _resnet_block(mid["block_1"], x)))
    for level in reversed(range(config.num_resolutions)):
        up = p[f"up_{level}"]
        x = _level(up, x, config.num_res_blocks + 1)
        if level != 0:
            x = _upsample(up["upsample"], x)
    return _conv(p["conv_out"], jax.nn.silu(_group_norm(p["norm_out"], x)))


def decode_codes(config: VQGANConfig, params, codes) -> jax.Array:
    """Images (B, H, W, 3) float32 from codes (B, grid_side**2), before clipping, like ``decode_code``.

    Computes in the dtype of the codebook (float32, bfloat16 or float16 checkpoints); jit with
    ``config`` static: ``jax.jit(decode_codes, static_argnums=0)``.
    """
    return decode_latents(config, params, _lookup(config, params, jnp.asarray(codes)))


def decode_latents(config: VQGANConfig, params, latents) -> jax.Array:
    """Images (B, H, W, 3) float32 from quantised latents (B, grid_side, grid_side, embed_dim): post_quant_conv
    and the decoder, the part of :func:`decode_codes` a VQGAN's training differentiates through."""
    x = _conv(params["post_quant_conv"], latents)
    return _decoder(config, params["decoder"], x).astype(jnp.float32)


def to_uint8(images) -> np.ndarray:
    """Displayable pixels: decoded values clipped to [0, 1], as dalle-mini shows them, scaled to 0..255."""
    return np.round(np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- parameter tree


def _conv_shape(k: int, cin: int, cout: int):
    return {"kernel": (k, k, cin, cout), "bias": (cout,)}


def _norm_shape(c: int):
    return {"scale": (c,), "bias": (c,)}


def _resnet_shape(cin: int, cout: int):
    p = {"norm1": _norm_shape(cin), "conv1": _conv_shape(3, cin, cout),
         "norm2": _norm_shape(cout), "conv2": _conv_shape(3, cout, cout)}
    if cin != cout:
        p["nin_shortcut"] = _conv_shape(1, cin, cout)
    return p


def _attn_shape(c: int):
    return {"norm": _norm_shape(c), **{name: _conv_shape(1, c, c) for name in ("q", "k", "v", "proj_out")}}


def _mid_shape(c: int):
    return {"block_1": _resnet_shape(c, c), "attn_1": _attn_shape(c), "block_2": _resnet_shape(c, c)}


def _level_shape(cin: int, cout: int, n_blocks: int, with_attn: bool):
    """A resolution level: n resnet blocks (the first changes width), an attention after each if asked."""
    p = {}
    for i in range(n_blocks):
        p[f"block_{i}"] = _resnet_shape(cin if i == 0 else cout, cout)
        if with_attn:
            p[f"attn_{i}"] = _attn_shape(cout)
    return p


def _decoder_shape(c: VQGANConfig):
    widths = [c.ch * m for m in c.ch_mult]
    p = {"conv_in": _conv_shape(3, c.z_channels, widths[-1]), "mid": _mid_shape(widths[-1])}
    res = c.grid_side
    for level in reversed(range(c.num_resolutions)):
        cin = widths[min(level + 1, c.num_resolutions - 1)]
        up = _level_shape(cin, widths[level], c.num_res_blocks + 1, res in c.attn_resolutions)
        if level != 0:
            up["upsample"] = {"conv": _conv_shape(3, widths[level], widths[level])}
            res *= 2
        p[f"up_{level}"] = up
    p["norm_out"] = _norm_shape(widths[0])
    p["conv_out"] = _conv_shape(3, widths[0], c.out_ch)
    return p


def _encoder_shape(c: VQGANConfig):
    widths = [c.ch * m for m in c.ch_mult]
    p = {"conv_in": _conv_shape(3, c.in_channels, c.ch)}
    res, cin = c.resolution, c.ch
    for level in range(c.num_resolutions):
        down = _level_shape(cin, widths[level], c.num_res_blocks, res in c.attn_resolutions)
        if level != c.num_resolutions - 1:
            down["downsample"] = {"conv": _conv_shape(3, widths[level], widths[level])}
            res //= 2
        p[f"down_{level}"] = down
        cin = widths[level]
    p["mid"] = _mid_shape(widths[-1])
    p["norm_out"] = _norm_shape(widths[-1])
    p["conv_out"] = _conv_shape(3, widths[-1], c.z_channels)  # double_z is refused by the config
    return p


def param_shapes(config: VQGANConfig, include_encoder: bool = True) -> dict:
    """The checkpoint's tree as float32 ``jax.ShapeDtypeStruct`` leaves, computed without allocating.

    With ``include_encoder=False`` only what :func:`decode_codes` reads: quantize, post_quant_conv, decoder.
    """
    tree = {
        "quantize": {"embedding": {"embedding": (config.n_embed, config.embed_dim)}},
        "post_quant_conv": _conv_shape(1, config.embed_dim, config.z_channels),
        "decoder": _decoder_shape(config),
    }
    if include_encoder:
        tree["encoder"] = _encoder_shape(config)
        tree["quant_conv"] = _conv_shape(1, config.z_channels, config.embed_dim)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32), tree, is_leaf=lambda s: isinstance(s, tuple)
    )


def init_params(config: VQGANConfig, seed: int) -> dict:
    """Deterministic random float32 weights for the full tree (benchmarks, training's starting point).

    Conv kernels are normal with std 1/sqrt(fan_in) and GroupNorms start as identity, so activations
    keep unit scale through the network. The image-producing conv is shrunk and biased to 0.5 so random
    pictures are mid-grey noise that mostly survives clipping to [0, 1], rather than saturated.
    """
    rng = np.random.default_rng(seed)

    def init(path, spec):
        names = [k.key for k in path]
        shape = spec.shape
        to_pixels = names[:2] == ["decoder", "conv_out"]
        if names[-1] == "kernel":
            std = (0.3 if to_pixels else 1.0) / math.sqrt(math.prod(shape[:-1]))
            return (rng.standard_normal(shape) * std).astype(np.float32)
        if names[-1] == "embedding":
            return rng.standard_normal(shape).astype(np.float32)
        if names[-1] == "scale":
            return np.ones(shape, np.float32)
        return np.full(shape, 0.5 if to_pixels else 0.0, np.float32)

    # Leaves are visited in sorted key order, so one seed always gives the same draws to the same leaf.
    return jax.tree_util.tree_map_with_path(init, param_shapes(config))
