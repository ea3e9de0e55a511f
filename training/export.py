"""Trained models written as hub folders (config.json, flax_model.msgpack, tokenizer files) that the app's
loader reads as it reads the published checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax.serialization import msgpack_serialize
from flax.traverse_util import unflatten_dict

from dalle_space import checkpoints, vqgan
from dalle_space.config import DalleBartConfig, VQGANConfig

# Where each part's per-layer runtime tuple is stacked in the checkpoint (dalle_space.dallebart's names).
_STACKED = {"encoder": "FlaxBartEncoderLayers", "decoder": "FlaxBartDecoderLayers"}


def _stored(tree: dict) -> dict:
    """A runtime subtree with each ``weight`` (out, in) back as the checkpoint's ``kernel`` (in, out)."""
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out[name] = _stored(value)
        elif name == "weight":
            out["kernel"] = np.asarray(value).T
        else:
            out[name] = np.asarray(value)
    return out


def checkpoint_tree(runtime) -> dict:
    """The checkpoint tree of a DalleBart runtime tree (``dallebart.runtime_params`` inverted): per-layer
    tuples stacked on a leading axis under upstream's layer-stack name, kernels untransposed."""
    model = {}
    for part, tree in runtime["model"].items():
        layers = [_stored(layer) for layer in tree["layers"]]
        rest = _stored({name: value for name, value in tree.items() if name != "layers"})
        model[part] = {**rest, "layers": {_STACKED[part]: jax.tree.map(lambda *x: np.stack(x), *layers)}}
    return {"lm_head": _stored(runtime["lm_head"]), "model": model}


def write_folder(folder: Path, config: DalleBartConfig | VQGANConfig, params) -> Path:
    """config.json and flax_model.msgpack of float32 numpy leaves, as ``save_pretrained`` lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    leaves = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    (folder / "flax_model.msgpack").write_bytes(msgpack_serialize(leaves))
    return folder


def read_vqgan(folder: Path, config: VQGANConfig) -> dict:
    """The whole parameter tree (encoder included) of a VQGAN folder ``write_folder`` wrote with ``config``;
    a folder of another configuration is refused, since its codes would not be the ones the DalleBart learns,
    and so is one without the encoder (the app's loader's tree check)."""
    written = VQGANConfig.from_dict(checkpoints.read_config(folder))
    if written != config:
        raise ValueError(f"{folder} holds a VQGAN of another configuration: {written}, not {config}")
    flat = checkpoints.read_params(folder)
    checkpoints.check_tree(flat, vqgan.param_shapes(config), "VQGAN")
    return unflatten_dict(flat)
