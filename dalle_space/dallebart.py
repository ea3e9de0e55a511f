"""DalleBart (DALL·E mini / mega) as pure JAX functions over the upstream checkpoint's parameters.

Checkpoints store the tree upstream ``save_pretrained`` writes with ``use_scan``: every encoder / decoder
layer stacked on a leading axis under ``layers/FlaxBart{Encoder,Decoder}Layers`` (``param_shapes``). The
functions here take the *runtime* tree (``runtime_params``), which differs in two ways chosen for speed on
CPU, where one image token is a handful of matrix-vector products over ~0.8 GB of weights:

- ``layers`` is a tuple of one tree per layer. Layers run as a Python loop over separate weight buffers;
  a ``lax.scan`` over the stacked axis slices (copies) every layer's weights at every image position,
  which made a decoder step about four times slower.
- every dense ``kernel`` (in, out), the lm head's included, is stored transposed as ``weight`` (out, in).
  The KV-cache step keeps activations feature-major, (features, rows...), so each product is ``weight @ h``,
  the layout XLA:CPU runs fastest for one position: with 16 rows the decoder's products ran twice as fast as
  ``h @ kernel``, and the lm head's 3-5x (see ``_logits``). Whole sequences (the encoder, ``decode_logits``)
  keep features last, faster for them (``_Layout``). The public functions take and return the usual
  token-major arrays.

Architecture (normformer): each block is ``x + post_norm(op(pre_norm(x)))``; pre-norms have no scale;
attention has no biases; the feed-forward is a GLU with an inner norm; learned absolute positions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax.traverse_util import unflatten_dict
from jax import lax

from .config import DalleBartConfig

Params = dict[str, Any]
_LN_EPS = 1e-5
_ENCODER = "FlaxBartEncoderLayers"
_DECODER = "FlaxBartDecoderLayers"
_CAUSAL_BLOCKS = 4  # query blocks of a whole sequence's causal attention (``_causal_attend``)


# ----------------------------------------------------------------------------------------------------
# Parameter tree


def _layer_shapes(d: int, ffn: int, cross: bool) -> dict[str, Any]:
    attention = {name: {"kernel": (d, d)} for name in ("q_proj", "k_proj", "v_proj", "out_proj")}
    layer = {
        "LayerNorm_0": {"bias": (d,)},
        "FlaxBartAttention_0": attention,
        "LayerNorm_1": {"scale": (d,), "bias": (d,)},
        "GLU_0": {
            "LayerNorm_0": {"bias": (d,)},
            "Dense_0": {"kernel": (d, ffn)},
            "Dense_1": {"kernel": (d, ffn)},
            "LayerNorm_1": {"bias": (ffn,)},
            "Dense_2": {"kernel": (ffn, d)},
        },
    }
    if cross:
        layer["LayerNorm_2"] = {"bias": (d,)}
        layer["FlaxBartAttention_1"] = dict(attention)
        layer["LayerNorm_3"] = {"scale": (d,), "bias": (d,)}
    return layer


def _stack(tree: dict[str, Any], n: int) -> dict[str, Any]:
    return {k: _stack(v, n) if isinstance(v, dict) else (n, *v) for k, v in tree.items()}


def _param_layout(config: DalleBartConfig) -> dict[str, Any]:
    """Nested dict of leaf shapes, the checkpoint's tree."""
    d = config.d_model

    def stack_part(vocab: int, positions: int, layers: int, ffn: int, name: str, cross: bool):
        return {
            "embed_tokens": {"embedding": (vocab, d)},
            "embed_positions": {"embedding": (positions, d)},
            "layernorm_embedding": {"scale": (d,), "bias": (d,)},
            "layers": {name: _stack(_layer_shapes(d, ffn, cross), layers)},
            "final_ln": {"bias": (d,)},
        }

    return {
        "lm_head": {"kernel": (d, config.decoder_vocab_size)},
        "model": {
            "encoder": stack_part(config.encoder_vocab_size, config.max_text_length,
                                  config.encoder_layers, config.encoder_ffn_dim, _ENCODER, False),
            "decoder": stack_part(config.decoder_vocab_size, config.image_length,
                                  config.decoder_layers, config.decoder_ffn_dim, _DECODER, True),
        },
    }


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _random_arrays(name: str, shape: tuple[int, ...], dtype, stacked: bool, transposed: bool, key):
    """One checkpoint leaf drawn as upstream initialises it, already in its runtime arrays (by XLA, in one
    go). The static arguments are the leaf's kind, not its path, so leaves of one kind compile once."""
    if name == "scale":
        leaf = jnp.ones(shape, dtype)
    elif name == "bias":
        leaf = jnp.zeros(shape, dtype)
    else:
        leaf = (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return _runtime_arrays(leaf, stacked, transposed)


def init_params(config: DalleBartConfig, seed: int, dtype: Any = jnp.float32, runtime: bool = False) -> Params:
    """Random weights in the checkpoint's tree, as upstream initialises them (normal(0.02), norms 1/0).

    Deterministic for a seed, so benchmarks of different implementations can share weights. Drawn leaf
    by leaf; with ``runtime`` each leaf is made in its runtime form and the runtime tree comes back, so
    memory peaks at the weights plus one stacked leaf, not twice the weights.
    """
    paths, treedef = jax.tree_util.tree_flatten_with_path(
        _param_layout(config), is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(paths))
    if not runtime:
        return jax.tree_util.tree_unflatten(treedef, [_random_arrays(path[-1].key, shape, jnp.dtype(dtype), False,
                                                                     False, key)[0]
                                                      for (path, shape), key in zip(paths, keys)])
    leaves = {}
    for (path, shape), key in zip(paths, keys):
        _place_runtime(leaves, tuple(p.key for p in path), lambda stacked, transposed: _random_arrays(
            path[-1].key, shape, jnp.dtype(dtype), stacked, transposed, key))
    return _unflatten_runtime(leaves)


def param_shapes(config: DalleBartConfig) -> Params:
    """The checkpoint's tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    return jax.eval_shape(functools.partial(init_params, config), 0)


def _place_runtime(leaves: dict[tuple, Any], path: tuple[str, ...],
                   make_arrays: Callable[[bool, bool], tuple]) -> None:
    """Put one checkpoint leaf into the flat runtime tree ``leaves``. ``make_arrays(stacked, transposed)``
    gives its runtime arrays, one per layer when stacked; every ``kernel`` is stored transposed as
    ``weight``, and the stacked-layers name in its path becomes each array's layer index."""
    transposed = path[-1] == "kernel"
    if transposed:
        path = (*path[:-1], "weight")
    stacked_at = next((i for i, name in enumerate(path) if name in (_ENCODER, _DECODER)), None)
    arrays = make_arrays(stacked_at is not None, transposed)
    if stacked_at is None:
        leaves[path] = arrays[0]
    else:
        leaves.update({(*path[:stacked_at], i, *path[stacked_at + 1:]): a for i, a in enumerate(arrays)})


def _runtime_arrays(leaf, stacked: bool, transposed: bool) -> tuple:
    """A checkpoint leaf as runtime arrays: one per layer when stacked, each transposed when asked."""
    arrays = tuple(leaf[i] for i in range(leaf.shape[0])) if stacked else (leaf,)
    return tuple(a.T for a in arrays) if transposed else arrays


def runtime_params(flat: dict[tuple[str, ...], Any], convert: Callable[[Any], Any] = lambda x: x) -> Params:
    """The tree the model functions take (see the module docstring), from a checkpoint tree with stacked
    layers given flat ({path: array}, as ``flatten_dict`` gives it); ``convert`` places / casts each runtime
    array as it is made. Empties ``flat`` as it goes: a loader that hands over its only reference never
    holds more than one checkpoint array next to the runtime tree."""
    leaves = {}
    while flat:
        path, leaf = flat.popitem()
        _place_runtime(leaves, path, lambda stacked, transposed: tuple(
            convert(a) for a in _runtime_arrays(leaf, stacked, transposed)))
        del leaf  # before the next one is read
    return _unflatten_runtime(leaves)


def _unflatten_runtime(leaves: dict[tuple, Any]) -> Params:
    """Nest flat runtime paths; the per-layer subtrees (integer keys) become a tuple in layer order."""
    def layers_to_tuples(tree):
        if not isinstance(tree, dict):
            return tree
        if all(isinstance(k, int) for k in tree):
            return tuple(layers_to_tuples(tree[i]) for i in range(len(tree)))
        return {k: layers_to_tuples(v) for k, v in tree.items()}

    return layers_to_tuples(unflatten_dict(leaves))


# ----------------------------------------------------------------------------------------------------
# Building blocks


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where activations keep their feature axis. First, (d, rows, positions): the KV-cache step's products
    over one position run fastest as ``weight @ h``. Last, (rows, positions, d): whole sequences (the encoder,
    teacher-forced training) run faster so; with features first a training step of the bundled model took
    6-10% longer, transposing for the attention's dots and their gradients (training/README.md)."""

    features_first: bool

    def dense(self, x, params: Params):
        """A dense layer (no bias) by its weight (out, in)."""
        if self.features_first:
            return jnp.tensordot(params["weight"], x, axes=1)
        return jnp.tensordot(x, params["weight"], axes=((-1,), (1,)))

    def norm(self, x, params: Params):
        return layer_norm(x, params, axis=0 if self.features_first else -1)

    def split_heads(self, x, heads: int):
        """Features -> (heads, head_dim) in place of the feature axis."""
        if self.features_first:
            return x.reshape(heads, x.shape[0] // heads, *x.shape[1:])
        return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)

    def merge_heads(self, x):
        if self.features_first:
            return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
        return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


_FEATURES_FIRST = _Layout(features_first=True)
_FEATURES_LAST = _Layout(features_first=False)


def layer_norm(x, params: Params, axis: int):
    """flax ``nn.LayerNorm`` (eps 1e-5) over the feature ``axis``, with statistics in float32; ``scale`` is
    absent in pre-norms."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=axis, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x32), axis=axis, keepdims=True) - jnp.square(mean), 0.0)
    multiplier = lax.rsqrt(var + _LN_EPS)
    features = [1] * x.ndim
    features[axis] = -1

    def along_features(name):
        return params[name].astype(jnp.float32).reshape(features)

    if "scale" in params:
        multiplier = multiplier * along_features("scale")
    return ((x32 - mean) * multiplier + along_features("bias")).astype(x.dtype)


def _attention_weights(scores, head_dim: int, bias):
    """Softmax over keys of q·k scores scaled by 1/sqrt(head_dim), plus the additive mask; in float32."""
    scaled = scores / jnp.sqrt(head_dim).astype(scores.dtype) + bias
    return jax.nn.softmax(scaled.astype(jnp.float32)).astype(scores.dtype)


def _attend(q, k, v, bias):
    """Softmax attention over whole sequences, features last: q (B, Q, H, D), k / v (B, K, H, D), additive
    bias broadcast to (B, H, Q, K); output (B, Q, H, D)."""
    weights = _attention_weights(jnp.einsum("bqhd,bkhd->bhqk", q, k), q.shape[-1], bias)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _causal_attend(q, k, v, blocks: int):
    """Causal self-attention over a whole sequence (as ``_attend``), its queries in ``blocks`` blocks: each
    block scores only the keys up to its last query, the rest being masked for all of its queries anyway.
    Four blocks skip 3/8 of the scores, in a training step of the bundled model 35-40% attention."""
    length = q.shape[1]
    size = -(-length // blocks)
    out = []
    for start in range(0, length, size):
        end = min(start + size, length)
        visible = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
        out.append(_attend(q[:, start:end], k[:, :end], v[:, :end], _mask_to_bias(visible, q.dtype)))
    return jnp.concatenate(out, axis=1)


def _mask_to_bias(mask, dtype):
    """1 = attend, 0 = ignore, as upstream: an additive 0 / -inf bias."""
    return jnp.where(mask > 0, 0.0, -jnp.inf).astype(dtype)


def _glu(x, params: Params, layout: _Layout):
    h = layout.norm(x, params["LayerNorm_0"])
    h = jax.nn.gelu(layout.dense(h, params["Dense_0"]), approximate=False) * layout.dense(h, params["Dense_1"])
    return layout.dense(layout.norm(h, params["LayerNorm_1"]), params["Dense_2"])


def _embed(part: Params, ids, positions, dtype, layout: _Layout):
    """Token plus position embeddings of ``ids``, normalised, in ``layout``."""
    h = (part["embed_tokens"]["embedding"][ids] + part["embed_positions"]["embedding"][positions]).astype(dtype)
    if layout.features_first:
        h = jnp.moveaxis(h, -1, 0)
    return layout.norm(h, part["layernorm_embedding"])


def compute_dtype(params: Params):
    """The dtype the model computes in: that of its (cast) weights."""
    return params["lm_head"]["weight"].dtype


# ----------------------------------------------------------------------------------------------------
# Encoder


def encode(config: DalleBartConfig, params: Params, input_ids, attention_mask):
    """Encoder states (B, L, d) after the final norm, as upstream ``DalleBart.encode``."""
    dtype = compute_dtype(params)
    encoder = params["model"]["encoder"]
    layout, heads = _FEATURES_LAST, config.encoder_attention_heads
    bias = _mask_to_bias(attention_mask, dtype)[:, None, None, :]
    h = _embed(encoder, input_ids, jnp.arange(input_ids.shape[-1]), dtype, layout)

    for p in encoder["layers"]:
        a = layout.norm(h, p["LayerNorm_0"])
        attention = p["FlaxBartAttention_0"]
        q, k, v = (layout.split_heads(layout.dense(a, attention[n]), heads) for n in ("q_proj", "k_proj", "v_proj"))
        a = layout.dense(layout.merge_heads(_attend(q, k, v, bias)), attention["out_proj"])
        h = h + layout.norm(a, p["LayerNorm_1"])
        h = h + _glu(h, p["GLU_0"], layout)
    return layout.norm(h, encoder["final_ln"])


# ----------------------------------------------------------------------------------------------------
# Decoder


@flax.struct.dataclass
class CrossContext:
    """Cross-attention keys / values of G prompts, computed once and shared by every row of a prompt.

    Heads lead, then prompts: the layout in which the attention dots read them and write their output, so
    that no step transposes them (with prompts first, XLA copied one of them at every step and layer).
    """

    keys: tuple[jax.Array, ...]  # per decoder layer: (heads, G, head_dim, L)
    values: tuple[jax.Array, ...]  # per decoder layer: (heads, G, head_dim, L)
    bias: jax.Array  # (G, L) additive mask: 0 for text tokens, -inf for padding

    @property
    def num_prompts(self) -> int:
        return self.bias.shape[0]


def cross_context(config: DalleBartConfig, params: Params, encoder_states, attention_mask) -> CrossContext:
    """Project encoder states to every decoder layer's cross-attention keys and values once.

    Upstream recomputes these from the encoder states at every image position; they never change.
    """
    heads = config.decoder_attention_heads
    dtype = compute_dtype(params)
    states = jnp.moveaxis(encoder_states.astype(dtype), -1, 0)  # (d, G, L)
    layers = params["model"]["decoder"]["layers"]

    def project(name):
        return tuple(jnp.einsum("hdgl->hgdl", _FEATURES_FIRST.split_heads(
            _FEATURES_FIRST.dense(states, p["FlaxBartAttention_1"][name]), heads)) for p in layers)

    return CrossContext(keys=project("k_proj"), values=project("v_proj"), bias=_mask_to_bias(attention_mask, dtype))


def _map_prompts(fn: Callable[..., jax.Array], *contexts: CrossContext) -> CrossContext:
    """A context of other prompts: ``fn(*arrays, axis=prompt_axis)`` on the contexts' matching arrays."""
    def per_layer(arrays_of_contexts):
        return tuple(fn(*layer, axis=1) for layer in zip(*arrays_of_contexts))

    return CrossContext(keys=per_layer(c.keys for c in contexts), values=per_layer(c.values for c in contexts),
                        bias=fn(*(c.bias for c in contexts), axis=0))


def stack_contexts(first: CrossContext, second: CrossContext) -> CrossContext:
    """One context whose prompts are those of ``first`` then those of ``second``."""
    return _map_prompts(lambda a, b, axis: jnp.concatenate([a, b], axis=axis), first, second)


def repeat_context(context: CrossContext, times: int) -> CrossContext:
    """The context's prompts repeated: a prompt shared by ``times`` groups of rows (the empty prompt)."""
    return _map_prompts(lambda a, axis: jnp.repeat(a, times, axis=axis), context)


def _cross_attend(q, keys, values, bias):
    """Cross-attention for rows grouped by prompt: q (H, D, R, Q) holds the rows of G prompts in
    prompt-major order (R = G * S); keys and values (H, G, D, L), bias (G, L). A prompt's keys
    and values serve all of its rows without being copied per row."""
    g = bias.shape[0]
    grouped = q.reshape(*q.shape[:2], g, q.shape[2] // g, q.shape[3])  # (H, D, G, S, Q)
    weights = _attention_weights(jnp.einsum("hdgsq,hgdl->hgsql", grouped, keys), q.shape[1],
                                 bias[None, :, None, None, :])
    return jnp.einsum("hgsql,hgdl->hdgsq", weights, values).reshape(q.shape)


def _decoder_layer(h, p: Params, heads: int, layout: _Layout, self_attend, cross_attend):
    """One normformer decoder layer on h in ``layout``. ``self_attend(q, k, v)`` supplies causal attention (whole
    sequence or KV cache) and returns its output with whatever state it updates; ``cross_attend(q)`` attends
    to the prompt. Both take and return heads split as ``layout`` splits them."""
    a = layout.norm(h, p["LayerNorm_0"])
    attention = p["FlaxBartAttention_0"]
    q, k, v = (layout.split_heads(layout.dense(a, attention[n]), heads) for n in ("q_proj", "k_proj", "v_proj"))
    a, state = self_attend(q, k, v)
    h = h + layout.norm(layout.dense(layout.merge_heads(a), attention["out_proj"]), p["LayerNorm_1"])

    c = layout.norm(h, p["LayerNorm_2"])
    cross = p["FlaxBartAttention_1"]
    c = cross_attend(layout.split_heads(layout.dense(c, cross["q_proj"]), heads))
    h = h + layout.norm(layout.dense(layout.merge_heads(c), cross["out_proj"]), p["LayerNorm_3"])
    return h + _glu(h, p["GLU_0"], layout), state


def _logits(params: Params, h):
    """Token-major logits (..., vocab) of feature-major states (d, ...), as sampling wants them.

    The product is the plain (vocab, d) x (d, rows) one of every dense layer, and only its result is
    transposed, behind a barrier: XLA folds a transpose on either side into the product, and XLA:CPU then
    runs it strided (25x slower for two rows) or, for ``states.T @ kernel``, packs a copy of the weight for
    every thread (mini, two to 32 rows: 24-35 MiB outside XLA's buffers, and 3-5x slower than this).
    """
    h = _FEATURES_FIRST.norm(h, params["model"]["decoder"]["final_ln"])
    return jnp.moveaxis(lax.optimization_barrier(_FEATURES_FIRST.dense(h, params["lm_head"])), 0, -1)


def decode_logits(config: DalleBartConfig, params: Params, decoder_input_ids, encoder_states, attention_mask):
    """Logits (B, T, image_vocab_size + 1) for a whole decoder input, no cache, as upstream ``decode``:
    ``[:, t]`` scores the token after position t. Features last, the layout whole sequences train fastest in."""
    dtype = compute_dtype(params)
    decoder = params["model"]["decoder"]
    layout, heads = _FEATURES_LAST, config.decoder_attention_heads
    length = decoder_input_ids.shape[-1]
    states = encoder_states.astype(dtype)
    prompt_bias = _mask_to_bias(attention_mask, dtype)[:, None, None, :]
    h = _embed(decoder, decoder_input_ids, jnp.arange(length), dtype, layout)

    def causal(q, k, v):
        return _causal_attend(q, k, v, _CAUSAL_BLOCKS), None

    for p in decoder["layers"]:
        cross = p["FlaxBartAttention_1"]

        def to_prompt(q, cross=cross):
            k, v = (layout.split_heads(layout.dense(states, cross[n]), heads) for n in ("k_proj", "v_proj"))
            return _attend(q, k, v, prompt_bias)

        h, _ = _decoder_layer(h, p, heads, layout, causal, to_prompt)
    return layout.dense(layout.norm(h, decoder["final_ln"]), params["lm_head"])


@flax.struct.dataclass
class KVCache:
    """Self-attention keys / values of the image positions decoded so far, one buffer per decoder layer
    so that each step writes one position in place.

    Rows and heads share one leading axis (row-major, so a row's heads are contiguous): with separate axes,
    a single row's size-1 axis made XLA compute each cache update twice, once per shape, and copy every
    cache buffer at every step.
    """

    keys: tuple[jax.Array, ...]  # per layer: (R * heads, head_dim, image_length)
    values: tuple[jax.Array, ...]  # per layer: (R * heads, image_length, head_dim)

    @classmethod
    def zeros(cls, config: DalleBartConfig, rows: int, dtype) -> "KVCache":
        heads, depth, length = config.decoder_attention_heads, config.head_dim, config.image_length
        layers = range(config.decoder_layers)
        return cls(keys=tuple(jnp.zeros((rows * heads, depth, length), dtype) for _ in layers),
                   values=tuple(jnp.zeros((rows * heads, length, depth), dtype) for _ in layers))


def decoder_step(config: DalleBartConfig, params: Params, tokens, position, cache: KVCache,
                 context: CrossContext):
    """Decode one position for R rows with the KV cache: logits (R, image_vocab_size + 1), new cache.

    ``tokens`` (R,) are the inputs at ``position`` (the start token at 0); the rows are the rows of the
    context's prompts, prompt-major.
    """
    dtype = compute_dtype(params)
    decoder = params["model"]["decoder"]
    heads = config.decoder_attention_heads
    visible = _mask_to_bias(jnp.arange(config.image_length) <= position, dtype)
    layout = _FEATURES_FIRST
    h = _embed(decoder, tokens[:, None], position[None], dtype, layout)  # (d, R, 1)
    keys, values = [], []
    for index, p in enumerate(decoder["layers"]):

        def cached(q, k, v, index=index):
            # Queries, new keys and new values as (R * H, ...), in the cache's layouts: the cache is never
            # transposed. Attention multiplies and reduces instead of calling dots: XLA fuses each into one
            # pass over the cache, where its batched one-query-row dots made a step 8% slower at 16 rows.
            n_heads, depth, rows, _ = q.shape
            new_keys = jnp.einsum("hdrq->rhdq", k).reshape(rows * n_heads, depth, 1)
            new_values = jnp.einsum("hdrq->rhqd", v).reshape(rows * n_heads, 1, depth)
            queries = jnp.einsum("hdrq->rhdq", q).reshape(rows * n_heads, depth, 1)
            layer_keys = lax.dynamic_update_slice_in_dim(cache.keys[index], new_keys, position, axis=2)
            layer_values = lax.dynamic_update_slice_in_dim(cache.values[index], new_values, position, axis=1)
            weights = _attention_weights(jnp.sum(queries * layer_keys, axis=1), depth, visible)  # (R * H, T)
            out = jnp.sum(weights[:, :, None] * layer_values, axis=1).reshape(rows, n_heads, depth)
            return jnp.einsum("rhd->hdr", out)[..., None], (layer_keys, layer_values)

        def to_prompt(q, index=index):
            return _cross_attend(q, context.keys[index], context.values[index], context.bias)

        h, (layer_keys, layer_values) = _decoder_layer(h, p, heads, layout, cached, to_prompt)
        keys.append(layer_keys)
        values.append(layer_values)
    return _logits(params, h[:, :, 0]), KVCache(keys=tuple(keys), values=tuple(values))


def step_weight_bytes(params: Params) -> int:
    """Bytes of weights one decoder step reads: the decoder layers, its final norm and the lm head. Not
    the embeddings (a step gathers one row of each) nor the cross-attention key / value projections
    (``cross_context`` applies them once per prompt). At one image this traffic bounds a step on a CPU."""
    def read_per_step(names) -> bool:
        if names[0] == "lm_head":
            return True
        cross_kv = "FlaxBartAttention_1" in names and ("k_proj" in names or "v_proj" in names)
        return names[:2] == ["model", "decoder"] and names[2] in ("layers", "final_ln") and not cross_kv

    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize
               for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
               if read_per_step([getattr(p, "key", None) for p in path]))
