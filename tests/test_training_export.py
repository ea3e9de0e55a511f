"""Trained models leave training/ as hub folders the app's loader reads back to the same weights."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from dalle_space import checkpoints, dallebart, text, vqgan
from dalle_space.config import DALLEBART_PRESETS, VQGAN_PRESETS
from training import export


def _same(a, b) -> bool:
    """Same paths (runtime layer tuples included) and the same arrays, exactly."""
    fa, fb = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (a, b))
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_checkpoint_tree_inverts_the_runtime_layout():
    config = DALLEBART_PRESETS["tiny"]
    assert _same(export.checkpoint_tree(dallebart.init_params(config, 3, runtime=True)),
                 dallebart.init_params(config, 3))


def test_written_folders_load_back_through_the_apps_loader(tmp_path):
    config, vq_config = DALLEBART_PRESETS["tiny"], VQGAN_PRESETS["tiny"]
    runtime = dallebart.init_params(config, 1, runtime=True)
    folder = export.write_folder(tmp_path / "dallebart", config, export.checkpoint_tree(runtime))
    text.write_tiny_tokenizer(folder, vocab_size=config.encoder_vocab_size)
    vq_params = vqgan.init_params(vq_config, 2)
    vq_folder = export.write_folder(tmp_path / "vqgan", vq_config, vq_params)

    loaded_config, loaded = checkpoints.load_dallebart(folder)
    assert loaded_config == config and _same(loaded, runtime)
    loaded_vq_config, loaded_vq = checkpoints.load_vqgan(vq_folder)  # the app keeps the decode path
    decode_path = {k: v for k, v in vq_params.items() if k in ("quantize", "post_quant_conv", "decoder")}
    assert loaded_vq_config == vq_config and _same(loaded_vq, decode_path)
    stored = checkpoints.read_params(vq_folder)  # and the encoder is there to fine-tune
    written = {tuple(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(vq_params)[0]}
    assert stored.keys() == written.keys() and all(np.array_equal(stored[k], written[k]) for k in written)
    checkpoints.check_pair(loaded_config, loaded_vq_config, vq_folder)


def test_a_trained_vqgan_reads_back_whole_for_another_dallebart_stage(tmp_path):
    vq_config = VQGAN_PRESETS["tiny"]
    vq_params = vqgan.init_params(vq_config, 2)
    folder = export.write_folder(tmp_path / "vqgan", vq_config, vq_params)
    assert _same(export.read_vqgan(folder, vq_config), vq_params)  # encoder included: it makes the codes
    other = dataclasses.replace(vq_config, n_embed=128)
    with pytest.raises(ValueError, match="another configuration"):
        export.read_vqgan(folder, other)
    decoder_only = export.write_folder(tmp_path / "decoder", vq_config, {k: v for k, v in vq_params.items()
                                                                        if k != "encoder"})
    with pytest.raises(checkpoints.CheckpointError, match="missing encoder/"):
        export.read_vqgan(decoder_only, vq_config)
