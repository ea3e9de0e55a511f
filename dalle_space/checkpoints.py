"""Loading DalleBart and VQGAN checkpoints as they are published: a hub id, a local folder in hub format,
or a preset name (``mini``, ``mega``, ``f16_16384`` from the hub; ``tiny``, bundled and built offline).

Both layouts upstream writes load: stacked layers (``use_scan``) as they are, one subtree per layer
(after upstream's ``unscan``) stacked on read. The tree is checked against the config before anything is
computed, so a broken checkpoint fails with one message naming every bad path.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import msgpack
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict

from . import bundled, dallebart, vqgan
from .config import DalleBartConfig, VQGANConfig

# Hub repositories of the published models. The VQGAN commit is the one dalle-mini's inference notebook
# pins; for the DalleBart repos no commit was recorded, so ``None`` takes the newest and the resolved
# commit is reported with the loaded model.
DALLEBART_HUB = {"mini": ("dalle-mini/dalle-mini", None), "mega": ("dalle-mini/dalle-mega", None)}
VQGAN_HUB = {"f16_16384": ("dalle-mini/vqgan_imagenet_f16_16384", "e93a26e7707683d349bf5d5c41c5b0ef69b677a9")}

DALLEBART_FILES = ("config.json", "flax_model.msgpack", "vocab.json", "merges.txt", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "enwiki-words-frequency.txt")
VQGAN_FILES = ("config.json", "flax_model.msgpack")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing files, or a parameter tree that does not fit its config."""


class HubUnavailableError(CheckpointError):
    """The hub could not be reached and the checkpoint is not in the local hub cache either."""


def _locate(source: str | Path, revision: str | None, hub: dict[str, tuple[str, str | None]],
            files: tuple[str, ...], build_bundled: Callable[[Path], Path]) -> tuple[Path, str | None]:
    source = str(source)
    if source == "tiny":
        return build_bundled(bundled.cache_dir()), "bundled"
    if Path(source).is_dir():
        return Path(source), revision
    if source not in hub and (source.count("/") != 1 or source.startswith((".", "/"))):
        raise CheckpointError(f"{source!r} is neither a preset ({', '.join(['tiny', *hub])}), "
                              "a local folder, nor a hub id like 'owner/name'")
    repo_id, pinned = hub.get(source, (source, None))
    return _download(repo_id, revision or pinned, files)


def _download(repo_id: str, revision: str | None, files: tuple[str, ...]) -> tuple[Path, str]:
    """Fetch only the listed files of a hub repo at a revision; offline, fall back to the local cache."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(files)))
    except Exception as online_error:  # no network, hub down, offline mode: try what is cached
        try:
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(files),
                                            local_files_only=True))
        except Exception:
            raise HubUnavailableError(f"cannot download {repo_id} from the hub ({online_error})") from None
    return folder, folder.name  # snapshot folders are named by commit hash


def locate_dallebart(source: str | Path = "mini", revision: str | None = None) -> tuple[Path, str | None]:
    """The local folder of a DalleBart checkpoint (downloaded if needed) and its revision."""
    return _locate(source, revision, DALLEBART_HUB, DALLEBART_FILES, bundled.build_dallebart)


def locate_vqgan(source: str | Path = "f16_16384", revision: str | None = None) -> tuple[Path, str | None]:
    """The local folder of a VQGAN checkpoint (downloaded if needed) and its revision."""
    return _locate(source, revision, VQGAN_HUB, VQGAN_FILES, bundled.build_vqgan)


def dtype_of(name: str):
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; choose one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def read_params(folder: Path) -> dict[tuple[str, ...], np.ndarray]:
    """The checkpoint's arrays by path, decoded from the file as a stream: reading the whole file first
    held it in memory next to its arrays, twice the checkpoint's size."""
    path = folder / "flax_model.msgpack"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no flax_model.msgpack")
    with path.open("rb") as stream:
        # flax's own decoder of its array extension: the format stays flax's (flax is pinned)
        unpacker = msgpack.Unpacker(stream, ext_hook=serialization._msgpack_ext_unpack, raw=False,
                                    strict_map_key=False, max_buffer_size=max(path.stat().st_size, 1))
        try:
            tree = unpacker.unpack()
        except (msgpack.UnpackException, ValueError) as error:
            raise CheckpointError(f"{path} is not a flax msgpack checkpoint ({type(error).__name__})") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path} is not a flax msgpack checkpoint (no parameter tree)")
    return flatten_dict(serialization._unchunk_array_leaves_in_place(tree))


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    return json.loads(path.read_text())


def stack_layers(flat: dict[tuple[str, ...], np.ndarray]) -> dict[tuple[str, ...], np.ndarray]:
    """Turn upstream's unscanned layout (``FlaxBartEncoderLayer_0`` …) into the stacked one; a stacked
    checkpoint passes through unchanged. Empties ``flat``, and each parameter's per-layer arrays are
    dropped once stacked, so only one parameter exists twice at a time."""
    per_layer: dict[tuple, dict[int, np.ndarray]] = {}
    stacked = {}
    while flat:
        path, value = flat.popitem()
        match = next((i for i, part in enumerate(path)
                      if re.fullmatch(r"FlaxBart(Encoder|Decoder)Layer_\d+", part)), None)
        if match is None:
            stacked[path] = value
            continue
        name, index = path[match].rsplit("_", 1)
        key = path[:match] + (name + "s",) + path[match + 1:]
        per_layer.setdefault(key, {})[int(index)] = value
    while per_layer:
        key, layers = per_layer.popitem()
        if sorted(layers) != list(range(len(layers))):
            raise CheckpointError(f"layers of {'/'.join(key)} are not numbered 0..n-1: {sorted(layers)}")
        stacked[key] = np.stack([np.asarray(layers[i]) for i in range(len(layers))])
        del layers
    return stacked


def check_tree(flat: dict[tuple[str, ...], Any], expected: dict[str, Any], what: str) -> None:
    """Raise one CheckpointError naming every missing, unexpected and misshaped parameter path."""
    have = {"/".join(k): np.shape(v) for k, v in flat.items()}
    want = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(expected).items()}
    problems = [f"missing {p} {want[p]}" for p in sorted(want.keys() - have.keys())]
    problems += [f"unexpected {p} {have[p]}" for p in sorted(have.keys() - want.keys())]
    problems += [f"misshaped {p}: {have[p]}, expected {want[p]}"
                 for p in sorted(want.keys() & have.keys()) if have[p] != want[p]]
    if problems:
        raise CheckpointError(f"{what} parameters do not match the config: " + "; ".join(problems))


def _to_device(params: dict[str, Any], dtype) -> dict[str, Any]:
    return jax.tree_util.tree_map(functools.partial(jnp.asarray, dtype=dtype), params)


def load_dallebart(source: str | Path = "mini", revision: str | None = None,
                   dtype: str = "float32") -> tuple[DalleBartConfig, dict[str, Any]]:
    """(config, params) of a DalleBart checkpoint: the runtime tree (``dallebart.runtime_params``) cast
    to the compute ``dtype``."""
    compute_dtype = dtype_of(dtype)
    folder, _ = locate_dallebart(source, revision)
    config = DalleBartConfig.from_dict(read_config(folder))
    flat = stack_layers(read_params(folder))
    check_tree(flat, dallebart.param_shapes(config), "DalleBart")
    return config, dallebart.runtime_params(flat, functools.partial(jnp.asarray, dtype=compute_dtype))


def load_vqgan(source: str | Path = "f16_16384", revision: str | None = None,
               dtype: str = "float32") -> tuple[VQGANConfig, dict[str, Any]]:
    """(config, params) of a VQGAN checkpoint: the decode path only, cast to ``dtype``."""
    compute_dtype = dtype_of(dtype)
    folder, _ = locate_vqgan(source, revision)
    config = VQGANConfig.from_dict(read_config(folder))
    flat = read_params(folder)
    check_tree(flat, vqgan.param_shapes(config, include_encoder=any(path[0] == "encoder" for path in flat)), "VQGAN")
    decode_path = {path: leaf for path, leaf in flat.items() if path[0] in ("quantize", "post_quant_conv", "decoder")}
    return config, _to_device(unflatten_dict(decode_path), compute_dtype)
