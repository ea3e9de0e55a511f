"""The bundled ``tiny`` model: DalleBart + VQGAN checkpoints with random weights, written offline in the
hub's folder format so that the offline path runs the same loading code as the real models.

Everything is generated deterministically from fixed seeds and cached; a folder appears only once
complete (written beside it, then renamed), so concurrent processes never read half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax.serialization import msgpack_serialize

from .config import DALLEBART_PRESETS, VQGAN_PRESETS

# Bump when what is written changes, so stale caches are not reused.
_FORMAT = 1
_SEED = 0


def cache_dir() -> Path:
    root = os.environ.get("DALLE_SPACE_CACHE") or Path.home() / ".cache" / "dalle-space"
    return Path(root) / f"tiny-v{_FORMAT}"


def _write_once(folder: Path, fill: Callable[[Path], None]) -> Path:
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        fill(scratch)
        os.replace(scratch, folder)
    except OSError:
        if not folder.is_dir():  # a failure other than losing the race to another process
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _write_checkpoint(folder: Path, config: dict, params) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (folder / "flax_model.msgpack").write_bytes(msgpack_serialize(jax.tree_util.tree_map(np.asarray, params)))


def build_dallebart(root: Path) -> Path:
    """The tiny DalleBart folder: config.json, flax_model.msgpack and tokenizer files."""
    from . import dallebart, text

    config = DALLEBART_PRESETS["tiny"]

    def fill(folder: Path) -> None:
        _write_checkpoint(folder, config.to_dict(), dallebart.init_params(config, _SEED))
        text.write_tiny_tokenizer(folder, vocab_size=config.encoder_vocab_size)

    return _write_once(root / "dallebart", fill)


def build_vqgan(root: Path) -> Path:
    """The tiny VQGAN folder: config.json and flax_model.msgpack."""
    from . import vqgan

    config = VQGAN_PRESETS["tiny"]

    def fill(folder: Path) -> None:
        _write_checkpoint(folder, config.to_dict(), vqgan.init_params(config, _SEED))

    return _write_once(root / "vqgan", fill)
