"""DalleBart against upstream dalle-mini 0.1.5 golden outputs, both checkpoint layouts, and the KV cache."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.serialization import msgpack_restore, msgpack_serialize
from flax.traverse_util import flatten_dict, unflatten_dict

from dalle_space import checkpoints, dallebart
from dalle_space.config import DALLEBART_PRESETS, UnsupportedConfigError

FIXTURES = Path(__file__).parent / "fixtures"
SCANNED = FIXTURES / "dallebart-tiny"
UNSCANNED = FIXTURES / "dallebart-tiny-unscanned"
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(SCANNED / "expected.npz"))


@pytest.fixture(scope="module", params=[SCANNED, UNSCANNED], ids=["scanned", "unscanned"])
def loaded(request):
    return checkpoints.load_dallebart(request.param)


encode = jax.jit(dallebart.encode, static_argnums=0)
decode_logits = jax.jit(dallebart.decode_logits, static_argnums=0)
decoder_step = jax.jit(dallebart.decoder_step, static_argnums=0)


def test_encoder_states_equal_upstream(loaded, expected):
    config, params = loaded
    for suffix in ("", "_uncond"):
        states = encode(config, params, expected["input_ids" + suffix], expected["attention_mask" + suffix])
        np.testing.assert_allclose(states, expected["encoder_last_hidden_state" + suffix], **TOL)


def test_decoder_logits_equal_upstream(loaded, expected):
    config, params = loaded
    for suffix in ("", "_uncond"):
        logits = decode_logits(config, params, expected["decoder_input_ids"],
                               expected["encoder_last_hidden_state" + suffix], expected["attention_mask" + suffix])
        assert logits.shape == (3, 256, config.image_vocab_size + 1)
        np.testing.assert_allclose(logits, expected["decoder_logits" + suffix], **TOL)


def test_cached_step_reproduces_full_sequence_logits(expected):
    config, params = checkpoints.load_dallebart(SCANNED)
    context = dallebart.cross_context(config, params, jnp.asarray(expected["encoder_last_hidden_state"]),
                                      jnp.asarray(expected["attention_mask"]))
    full = decode_logits(config, params, expected["decoder_input_ids"], expected["encoder_last_hidden_state"],
                         expected["attention_mask"])
    cache = dallebart.KVCache.zeros(config, 3, jnp.float32)
    for position in range(config.image_length):
        tokens = jnp.asarray(expected["decoder_input_ids"][:, position])
        logits, cache = decoder_step(config, params, tokens, jnp.int32(position), cache, context)
        np.testing.assert_allclose(logits, full[:, position], rtol=1e-5, atol=1e-6,
                                   err_msg=f"position {position}")


def _listing(path: Path) -> dict[str, tuple[int, ...]]:
    rows = [line.split("\t") for line in path.read_text().splitlines() if not line.startswith("#")]
    return {p: tuple(int(x) for x in s.strip("()").split(",") if x.strip()) for p, s, _ in rows}


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    return {"/".join(k): tuple(v.shape) for k, v in flatten_dict(tree).items()}


def test_tiny_tree_matches_upstream_listing():
    config, _ = checkpoints.load_dallebart(SCANNED)
    assert _shapes(dallebart.param_shapes(config)) == _listing(SCANNED / "params.txt")


def _scaled_listing(tiny: dict[str, tuple[int, ...]], d, layers, ffn, text_vocab, image_vocab):
    """The tiny listing with mini/mega sizes, by role: (2 layers, 64 width, 128 ffn, 1000 / 1025 vocab)."""
    out = {}
    for path, shape in tiny.items():
        sizes = list(shape)
        if "/layers/" in path:
            sizes[0] = layers
        body = sizes[1:] if "/layers/" in path else sizes
        if path.endswith("embed_tokens/embedding"):
            body[0] = text_vocab if "/encoder/" in path else image_vocab
        elif path.startswith("lm_head"):
            body[1] = image_vocab
        replaced = [ffn if s == 128 else d if s == 64 and not path.endswith("embed_positions/embedding") else s
                    for s in body]
        if path.endswith("embed_positions/embedding"):
            replaced = [body[0], d]
        out[path] = tuple(sizes[:1] + replaced) if "/layers/" in path else tuple(replaced)
    return out


@pytest.mark.parametrize("preset, d, layers, ffn, text_vocab, image_vocab, total", [
    ("mini", 1024, 12, 2730, 50264, 16385, 437_833_712),
    ("mega", 2048, 24, 4096, 50272, 16416, 2_587_521_024),
])
def test_full_size_trees(preset, d, layers, ffn, text_vocab, image_vocab, total):
    shapes = _shapes(dallebart.param_shapes(DALLEBART_PRESETS[preset]))
    assert shapes == _scaled_listing(_listing(SCANNED / "params.txt"), d, layers, ffn, text_vocab, image_vocab)
    assert sum(int(np.prod(s)) for s in shapes.values()) == total


def test_mini_tree_has_the_leaves_upstream_printed():
    shapes = _shapes(dallebart.param_shapes(DALLEBART_PRESETS["mini"]))
    layers = "model/decoder/layers/FlaxBartDecoderLayers/"
    assert shapes["lm_head/kernel"] == (1024, 16385)
    assert shapes[layers + "FlaxBartAttention_0/k_proj/kernel"] == (12, 1024, 1024)
    assert shapes[layers + "GLU_0/Dense_0/kernel"] == (12, 1024, 2730)
    assert shapes[layers + "GLU_0/LayerNorm_1/bias"] == (12, 2730)
    assert shapes[layers + "LayerNorm_1/scale"] == (12, 1024)
    assert shapes["model/encoder/embed_tokens/embedding"] == (50264, 1024)
    assert shapes["model/encoder/embed_positions/embedding"] == (64, 1024)
    assert shapes["model/decoder/embed_tokens/embedding"] == (16385, 1024)
    assert shapes["model/decoder/embed_positions/embedding"] == (256, 1024)


def test_runtime_tree_splits_layers_and_transposes_every_kernel():
    config = DALLEBART_PRESETS["tiny"]
    stacked = dallebart.init_params(config, 5)
    runtime = dallebart.runtime_params(flatten_dict(stacked))
    drawn = dallebart.init_params(config, 5, runtime=True)  # the same weights, made per leaf
    assert jax.tree_util.tree_structure(drawn) == jax.tree_util.tree_structure(runtime)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(drawn),
                                                      jax.tree_util.tree_leaves(runtime)))
    layers = stacked["model"]["decoder"]["layers"]["FlaxBartDecoderLayers"]
    second = runtime["model"]["decoder"]["layers"][1]
    assert len(runtime["model"]["decoder"]["layers"]) == config.decoder_layers
    np.testing.assert_array_equal(second["GLU_0"]["Dense_0"]["weight"], layers["GLU_0"]["Dense_0"]["kernel"][1].T)
    np.testing.assert_array_equal(second["LayerNorm_1"]["scale"], layers["LayerNorm_1"]["scale"][1])
    np.testing.assert_array_equal(runtime["lm_head"]["weight"], stacked["lm_head"]["kernel"].T)


# ---------------------------------------------------------------------------------------------------
# Loading: dtypes and broken checkpoints


def _copy_with(tmp_path: Path, edit_params=None, edit_config=None) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(SCANNED, folder)
    if edit_params:
        flat = flatten_dict(msgpack_restore((folder / "flax_model.msgpack").read_bytes()), sep="/")
        edit_params(flat)
        (folder / "flax_model.msgpack").write_bytes(msgpack_serialize(unflatten_dict(flat, sep="/")))
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_float16_checkpoint_loads_and_computes_in_float32(tmp_path, expected):
    def to_float16(flat):
        for key in flat:
            flat[key] = flat[key].astype(np.float16)

    config, params = checkpoints.load_dallebart(_copy_with(tmp_path, to_float16), dtype="float32")
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype("float32")}
    states = encode(config, params, expected["input_ids"], expected["attention_mask"])
    np.testing.assert_allclose(states, expected["encoder_last_hidden_state"], atol=0.05)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compute_dtype(dtype, expected):
    config, params = checkpoints.load_dallebart(SCANNED, dtype=dtype)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(dtype)}
    logits = decode_logits(config, params, expected["decoder_input_ids"], expected["encoder_last_hidden_state"],
                           expected["attention_mask"])
    assert logits.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.asarray(logits, np.float32), expected["decoder_logits"], atol=0.05)


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="Unknown dtype 'float8'"):
        checkpoints.load_dallebart(SCANNED, dtype="float8")


def test_missing_unexpected_and_misshaped_parameters_are_named_together(tmp_path):
    layers = "model/decoder/layers/FlaxBartDecoderLayers/"

    def damage(flat):
        del flat[layers + "LayerNorm_1/scale"]
        flat["model/decoder/extra/kernel"] = np.zeros((2, 2), np.float32)
        flat["lm_head/kernel"] = np.zeros((64, 1024), np.float32)

    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.load_dallebart(_copy_with(tmp_path, damage))
    message = str(error.value)
    assert f"missing {layers}LayerNorm_1/scale (2, 64)" in message
    assert "unexpected model/decoder/extra/kernel (2, 2)" in message
    assert "misshaped lm_head/kernel: (64, 1024), expected (64, 1025)" in message


def test_unscanned_layer_numbering_gap_is_refused(tmp_path):
    folder = tmp_path / "gap"
    shutil.copytree(UNSCANNED, folder)
    flat = flatten_dict(msgpack_restore((folder / "flax_model.msgpack").read_bytes()), sep="/")
    flat = {k.replace("FlaxBartEncoderLayer_1", "FlaxBartEncoderLayer_2"): v for k, v in flat.items()}
    (folder / "flax_model.msgpack").write_bytes(msgpack_serialize(unflatten_dict(flat, sep="/")))
    with pytest.raises(checkpoints.CheckpointError, match=r"not numbered 0..n-1: \[0, 2\]"):
        checkpoints.load_dallebart(folder)


@pytest.mark.parametrize("option, value", [("ln_positions", "swinv2"), ("use_glu", False), ("use_bias", True)])
def test_unsupported_config_option_is_named(tmp_path, option, value):
    folder = _copy_with(tmp_path, edit_config=lambda c: c.update({option: value}))
    with pytest.raises(UnsupportedConfigError, match=f"{option}={value!r}"):
        checkpoints.load_dallebart(folder)


@pytest.mark.parametrize("folder", [SCANNED, UNSCANNED], ids=["scanned", "unscanned"])
def test_streamed_read_equals_flax_restore(folder):
    streamed = checkpoints.read_params(folder)
    restored = flatten_dict(msgpack_restore((folder / "flax_model.msgpack").read_bytes()))
    assert streamed.keys() == restored.keys()
    for path, array in restored.items():
        assert streamed[path].dtype == array.dtype, path
        np.testing.assert_array_equal(streamed[path], array)


def test_loading_releases_each_checkpoint_array_as_it_is_replaced():
    # What keeps the load peak near the weights' size: each step empties the dict it was handed.
    flat = checkpoints.read_params(UNSCANNED)
    stacked = checkpoints.stack_layers(flat)
    assert flat == {}
    n_stacked = len(stacked)
    runtime = dallebart.runtime_params(stacked)
    assert stacked == {}
    assert len(jax.tree_util.tree_leaves(runtime)) > n_stacked  # stacked leaves became one array per layer


@pytest.mark.parametrize("damage", ["truncated", "not msgpack", "not a tree"])
def test_corrupt_checkpoint_file_is_named(tmp_path, damage):
    folder = _copy_with(tmp_path)
    path = folder / "flax_model.msgpack"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "not msgpack": b"\xc1" + data,
                      "not a tree": msgpack_serialize([1, 2])}[damage])
    with pytest.raises(checkpoints.CheckpointError, match=f"{path} is not a flax msgpack checkpoint"):
        checkpoints.load_dallebart(folder)


def test_missing_files_and_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoints.CheckpointError, match="has no config.json"):
        checkpoints.load_dallebart(tmp_path / "empty")
    with pytest.raises(checkpoints.CheckpointError, match="neither a preset"):
        checkpoints.load_dallebart("not a model")


def test_unreachable_hub_raises_hub_unavailable(monkeypatch, tmp_path):
    # huggingface_hub reads its environment once, at import: patch what it read, so no request leaves.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(checkpoints.HubUnavailableError, match="cannot download dalle-mini/dalle-mini"):
        checkpoints.locate_dallebart("mini")
