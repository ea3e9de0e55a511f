"""Loading DalleBart and VQGAN checkpoints as they are published: a hub id, a local folder in hub format,
or a preset name (``mini``, ``mega``, ``f16_16384`` from the hub; ``tiny``, bundled in the package).

Both layouts upstream writes load: stacked layers (``use_scan``) as they are, one subtree per layer
(after upstream's ``unscan``) stacked on read. The tree is checked against the config before anything is
computed, so a broken checkpoint fails with one message naming every bad path. A folder a user points at is
checked before transformers or the weight reader see it: the files, the config's model type and shape fields,
the tokenizer's special ids and size, and the pairing of model and VQGAN, each refused with a message naming
the folder and the part at fault.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import msgpack
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict
from transformers import BartTokenizerFast

from . import bundled, dallebart, text, vqgan
from .config import DalleBartConfig, VQGANConfig

log = logging.getLogger(__name__)

# Hub repositories of the published models. The VQGAN commit is the one dalle-mini's inference notebook
# pins; for the DalleBart repos no commit was recorded, so ``None`` takes the newest and the resolved
# commit is reported with the loaded model.
DALLEBART_HUB = {"mini": ("dalle-mini/dalle-mini", None), "mega": ("dalle-mini/dalle-mega", None)}
VQGAN_HUB = {"f16_16384": ("dalle-mini/vqgan_imagenet_f16_16384", "e93a26e7707683d349bf5d5c41c5b0ef69b677a9")}

DALLEBART_FILES = ("config.json", "flax_model.msgpack", "vocab.json", "merges.txt", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "enwiki-words-frequency.txt")
VQGAN_FILES = ("config.json", "flax_model.msgpack")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Fields that set parameter shapes: DalleBartConfig's defaults for them are mini's, so a config.json without one
# would load as a model it does not describe.
SHAPE_FIELDS = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
                "encoder_ffn_dim", "decoder_ffn_dim", "encoder_vocab_size", "image_vocab_size", "image_length",
                "max_text_length")
BART_SPECIAL_IDS = {"bos": 0, "pad": 1, "eos": 2, "unk": 3}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing or unreadable files, a config, tokenizer, parameter tree or
    VQGAN that does not fit the model, or a repo or revision the hub does not have."""


class HubUnavailableError(CheckpointError):
    """The hub could not be reached and the checkpoint is not in the local hub cache either."""


def _locate(source: str | Path, revision: str | None, hub: dict[str, tuple[str, str | None]],
            files: tuple[str, ...], bundled_folder: Path) -> tuple[Path, str | None]:
    source = str(source)
    if source == "tiny":
        return bundled_folder, "bundled"
    if Path(source).is_dir():
        return Path(source), revision
    if source not in hub and (source.count("/") != 1 or source.startswith((".", "/"))):
        raise CheckpointError(f"{source!r} is neither a preset ({', '.join(['tiny', *hub])}), "
                              "a local folder, nor a hub id like 'owner/name'")
    repo_id, pinned = hub.get(source, (source, None))
    return _download(repo_id, revision or pinned, files)


def _download(repo_id: str, revision: str | None, files: tuple[str, ...]) -> tuple[Path, str]:
    """Fetch only the listed files of a hub repo at a revision. A repo or revision the hub says does not exist
    is a CheckpointError: a typo must stop the app, not pass for an outage. Any other failure (no network, hub
    down, a download cut off, offline mode) falls back to a complete copy in the local cache: the revision's
    own, else, unless the revision pins a commit, the newest complete one of the repo (a download of a new
    ``main`` that died mid-way leaves ``refs/main`` naming a snapshot with files missing, while the previous
    commit sits whole beside it). Without one it is a HubUnavailableError."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    hub = f"the hub at {constants.ENDPOINT}"
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(files)))
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id} has no revision {revision!r} on {hub}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id} is not a repository on {hub} (or it is private or gated)") from None
    except HFValidationError as error:
        raise CheckpointError(f"{repo_id!r} is not a valid hub id ({error})") from None
    except Exception as online_error:
        reason = f"{type(online_error).__name__}: {online_error}"
        named = revision or constants.DEFAULT_REVISION
        if (folder := _complete_snapshot(repo_id, named, files)) is not None:
            log.warning("Cannot download %s from %s (%s); its cached copy is used: commit %s.",
                        repo_id, hub, reason, folder.name)
        elif not _is_commit(named) and (folder := _newest_complete_snapshot(repo_id, files)) is not None:
            log.warning("Cannot download %s at %s from %s (%s), and the cached copy of %s is incomplete or absent: "
                        "an older cached copy is used, commit %s.", repo_id, named, hub, reason, named, folder.name)
        else:
            raise HubUnavailableError(f"cannot download {repo_id} from {hub} ({reason})") from None
    return folder, folder.name  # snapshot folders are named by commit hash


def _complete_snapshot(repo_id: str, revision: str, files: tuple[str, ...]) -> Path | None:
    """The cached snapshot of ``revision`` if it holds every file of the commit that ``files`` selects, as
    huggingface_hub judges it from its cached listing of the commit (a snapshot with no cached listing passes as
    it is); None if it is absent or lacks any."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(files), local_files_only=True))
    except LocalEntryNotFoundError:  # also IncompleteSnapshotError: a snapshot with files missing
        return None


def _is_commit(revision: str) -> bool:
    """A full commit hash, as hub snapshot folders are named, rather than a branch or tag."""
    from huggingface_hub.file_download import REGEX_COMMIT_HASH

    return REGEX_COMMIT_HASH.fullmatch(revision) is not None


def _newest_complete_snapshot(repo_id: str, files: tuple[str, ...]) -> Path | None:
    """The most recently modified complete snapshot of the repo in the local hub cache, whatever its commit."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    snapshots = Path(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type="model"), "snapshots")
    commits = [path for path in snapshots.glob("*") if path.is_dir() and _is_commit(path.name)]
    for path in sorted(commits, key=lambda path: path.stat().st_mtime, reverse=True):
        if (folder := _complete_snapshot(repo_id, path.name, files)) is not None:
            return folder
    return None


def locate_dallebart(source: str | Path = "mini", revision: str | None = None) -> tuple[Path, str | None]:
    """The local folder of a DalleBart checkpoint (downloaded if needed) and its revision."""
    return _locate(source, revision, DALLEBART_HUB, DALLEBART_FILES, bundled.DALLEBART)


def locate_vqgan(source: str | Path = "f16_16384", revision: str | None = None) -> tuple[Path, str | None]:
    """The local folder of a VQGAN checkpoint (downloaded if needed) and its revision."""
    return _locate(source, revision, VQGAN_HUB, VQGAN_FILES, bundled.VQGAN)


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
    try:
        raw = json.loads(path.read_text(encoding="utf8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not JSON ({error})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a config (a JSON {type(raw).__name__}, not an object)")
    return raw


def read_dallebart_config(folder: Path) -> DalleBartConfig:
    """The checkpoint's config, refused when it describes another model (its ``model_type``), lacks a field
    that sets a parameter shape, starts pictures on a token the decoder has no embedding row for, or gives a
    default top-k that is not a count."""
    raw = read_config(folder)
    path = folder / "config.json"
    if raw.get("model_type") != "dallebart":
        raise CheckpointError(f"{path} is not a DalleBart config: model_type is {raw.get('model_type')!r}, "
                              "not 'dallebart'")
    missing = [name for name in SHAPE_FIELDS if name not in raw]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    config = DalleBartConfig.from_dict(raw)
    if type(config.top_k) is not int or config.top_k < 1:
        raise CheckpointError(f"{path}: top_k is {raw['top_k']!r}, not a whole number of codes to keep when sampling "
                              "(0 or null: all of them)")
    if not 0 <= config.decoder_start_token_id < config.decoder_vocab_size:
        raise CheckpointError(f"{path}: decoder_start_token_id {config.decoder_start_token_id} is not a row of the "
                              f"decoder embedding (ids 0..{config.image_vocab_size})")
    return config


def missing_dallebart_files(folder: Path) -> list[str]:
    """What a DalleBart folder lacks of the files the loader reads; the tokenizer is either tokenizer.json or
    the vocab.json + merges.txt pair."""
    missing = [name for name in ("config.json", "flax_model.msgpack") if not (folder / name).is_file()]
    if not (folder / "tokenizer.json").is_file():
        lacking = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
        if lacking:
            missing.append(f"tokenizer.json or {' + '.join(lacking)}")
    return missing


def load_tokenizer(folder: Path) -> BartTokenizerFast:
    """The checkpoint's BART tokenizer, checked; cheap, so callers run it before reading any weight.

    The files are looked for first: given a folder with none, transformers builds a five-token tokenizer that
    turns every prompt into ``<s></s>``, and the model would draw pictures of nothing. The tokenizer read must
    have BART's special ids (the empty prompt and padding are built from them) and fit the text embedding.
    """
    folder = Path(folder)
    missing = missing_dallebart_files(folder)
    if missing:
        raise CheckpointError(f"{folder} is not a complete DalleBart checkpoint: missing {', '.join(missing)}")
    config = read_dallebart_config(folder)
    try:
        tokenizer = text.load_tokenizer(folder)
    except Exception as error:  # transformers and tokenizers raise many types for unreadable files
        raise CheckpointError(f"the tokenizer in {folder} cannot be read ({type(error).__name__}: {error})") from None
    check_tokenizer(tokenizer, config, folder)
    return tokenizer


def _ids(ids: dict[str, Any]) -> str:
    return " ".join(f"{name}={value}" for name, value in ids.items())


def check_tokenizer(tokenizer: BartTokenizerFast, config: DalleBartConfig, folder: Path) -> None:
    """Refuse a tokenizer whose special ids are not BART's or whose size does not fit the text embedding.

    Sizes within the published models' slack pass: mini's embedding has no row for ``<mask>`` (the last id),
    mega pads its rows to a multiple of 8.
    """
    ids = {name: getattr(tokenizer, f"{name}_token_id") for name in BART_SPECIAL_IDS}
    if ids != BART_SPECIAL_IDS:
        raise CheckpointError(f"the tokenizer in {folder} has the special ids {_ids(ids)}, "
                              f"not BART's {_ids(BART_SPECIAL_IDS)}")
    size, rows = len(tokenizer), config.encoder_vocab_size
    if not size - 1 <= rows < size + 8:
        raise CheckpointError(f"the tokenizer in {folder} has {size} tokens but config.json's encoder_vocab_size "
                              f"is {rows}")


def image_codes(config: DalleBartConfig) -> int:
    """How many VQGAN codes the model draws: the ids below its start, eos and pad ids (``image_vocab_size``
    over-counts them where the vocabulary is padded, as mega's 16415 is)."""
    return min(config.decoder_start_token_id, config.eos_token_id, config.pad_token_id)


def check_pair(config: DalleBartConfig, vqgan_config: VQGANConfig, folder: Path) -> None:
    """Refuse a VQGAN (from ``folder``) whose codebook is not the model's image vocabulary: a smaller
    codebook would clamp codes it lacks, a larger one holds codes the model never draws."""
    codes = image_codes(config)
    if vqgan_config.n_embed != codes:
        raise CheckpointError(f"the VQGAN in {folder} has {vqgan_config.n_embed} codes but the DalleBart model "
                              f"draws {codes} (ids below its start, eos and pad ids)")


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
    config = read_dallebart_config(folder)
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
