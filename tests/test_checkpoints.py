"""Checkpoint folders checked before use (dalle_space.checkpoints): each broken part is refused with a message
naming the folder and the part, instead of loading a model that draws nothing or the wrong thing."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from flax.serialization import msgpack_serialize

from dalle_space import bundled, checkpoints, vqgan
from dalle_space.config import DALLEBART_PRESETS, VQGAN_PRESETS
from dalle_space.engine import Engine
from dalle_space.text import write_tiny_tokenizer

CheckpointError = checkpoints.CheckpointError


@pytest.fixture(scope="module")
def tiny() -> Path:
    """The bundled tiny DalleBart: a complete checkpoint with a tokenizer, as the hub publishes them."""
    return bundled.DALLEBART


@pytest.fixture
def folder(tiny, tmp_path) -> Path:
    """A copy of the tiny checkpoint for a test to break."""
    return Path(shutil.copytree(tiny, tmp_path / "model"))


def _remove(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).unlink()


def _edit_json(path: Path, **changes) -> None:
    content = json.loads(path.read_text())
    content.update(changes)
    for name in [name for name, value in changes.items() if value is None]:
        del content[name]
    path.write_text(json.dumps(content))


def test_complete_folder_passes(folder):
    tokenizer = checkpoints.load_tokenizer(folder)
    assert (len(tokenizer), tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (1000, 0, 1, 2)
    assert checkpoints.read_dallebart_config(folder) == DALLEBART_PRESETS["tiny"]


@pytest.mark.parametrize("kept", ["tokenizer.json", "vocab.json + merges.txt"])
def test_either_tokenizer_format_is_enough(folder, tiny, kept):
    _remove(folder, *(["vocab.json", "merges.txt"] if kept == "tokenizer.json" else ["tokenizer.json"]))
    ids = [checkpoints.load_tokenizer(f)(" a cat on a red chair")["input_ids"] for f in (folder, tiny)]
    assert ids[0] == ids[1]


@pytest.mark.parametrize("removed, named", [
    # transformers would build a five-token tokenizer here and turn every prompt into [2, 3]
    (["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"],
     "tokenizer.json or vocab.json + merges.txt"),
    (["tokenizer.json", "merges.txt"], "tokenizer.json or merges.txt"),
    (["config.json", "flax_model.msgpack", "tokenizer.json", "vocab.json"],
     "config.json, flax_model.msgpack, tokenizer.json or vocab.json"),
])
def test_missing_files_are_named_before_transformers_reads_the_folder(folder, removed, named):
    _remove(folder, *removed)
    with pytest.raises(CheckpointError) as error:
        checkpoints.load_tokenizer(folder)
    assert str(error.value) == f"{folder} is not a complete DalleBart checkpoint: missing {named}"


def test_tokenizer_with_other_special_ids_is_refused(folder):
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        _edit_json(folder / name, bos_token="<unk>", cls_token="<unk>", unk_token="<s>")
    with pytest.raises(CheckpointError) as error:
        checkpoints.load_tokenizer(folder)
    assert str(error.value) == (f"the tokenizer in {folder} has the special ids bos=3 pad=1 eos=2 unk=0, "
                                "not BART's bos=0 pad=1 eos=2 unk=3")


def test_tokenizer_of_another_size_is_refused(folder):
    write_tiny_tokenizer(folder, vocab_size=600)  # same special ids, another vocabulary
    with pytest.raises(CheckpointError) as error:
        checkpoints.load_tokenizer(folder)
    assert str(error.value) == f"the tokenizer in {folder} has 600 tokens but config.json's encoder_vocab_size is 1000"


def test_unreadable_tokenizer_is_named(folder):
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=f"^the tokenizer in {folder} cannot be read \\(JSONDecodeError: "):
        checkpoints.load_tokenizer(folder)


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "bart"}, " is not a DalleBart config: model_type is 'bart', not 'dallebart'"),
    ({"model_type": None}, " is not a DalleBart config: model_type is None, not 'dallebart'"),
    ({"d_model": None, "image_vocab_size": None}, " lacks d_model, image_vocab_size"),  # would load as mini's
    ({"decoder_start_token_id": 257},
     ": decoder_start_token_id 257 is not a row of the decoder embedding (ids 0..256)"),
])
def test_config_of_another_model_is_refused(folder, changes, message):
    _edit_json(folder / "config.json", **changes)
    for load in (checkpoints.load_tokenizer, checkpoints.load_dallebart):
        with pytest.raises(CheckpointError) as error:
            load(folder)
        assert str(error.value) == f"{folder / 'config.json'}{message}"


@pytest.mark.parametrize("top_k, read", [
    (7, 7),
    (None, 50),  # absent: transformers' default, as upstream's generate reads it
    ("null", 257),  # upstream's "no top-k": every code and the start token's column kept
    (0, 257),
])
def test_config_top_k_is_the_model_s_sampling_default(folder, top_k, read):
    content = json.loads((folder / "config.json").read_text())
    content.pop("top_k")
    if top_k is not None:
        content["top_k"] = None if top_k == "null" else top_k
    (folder / "config.json").write_text(json.dumps(content))
    assert checkpoints.read_dallebart_config(folder).top_k == read


@pytest.mark.parametrize("top_k", [-1, 2.5, "3", True, [3]])
def test_config_top_k_that_is_not_a_count_is_refused(folder, top_k):
    _edit_json(folder / "config.json", top_k=top_k)
    with pytest.raises(CheckpointError) as error:
        checkpoints.load_dallebart(folder)
    assert str(error.value) == (f"{folder / 'config.json'}: top_k is {top_k!r}, not a whole number of codes to keep "
                                "when sampling (0 or null: all of them)")


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ("[1, 2]", "is not a config (a JSON list, not an object)"),
])
def test_config_that_is_not_a_json_object_is_named(folder, content, message):
    (folder / "config.json").write_text(content)
    with pytest.raises(CheckpointError) as error:
        checkpoints.load_dallebart(folder)
    assert str(error.value) == f"{folder / 'config.json'} {message}"


def test_truncated_weights_name_the_folder(folder):
    path = folder / "flax_model.msgpack"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as error:
        checkpoints.load_dallebart(folder)
    assert str(error.value) == f"{path} is not a flax msgpack checkpoint (OutOfData)"


@pytest.mark.parametrize("model, codebook, draws", [
    ("tiny", "f16_16384", 256),  # would draw a fraction of the codebook
    ("mini", "tiny", 16384),  # codes past 255 would be clamped
])
def test_vqgan_of_another_codebook_is_refused(model, codebook, draws):
    with pytest.raises(CheckpointError) as error:
        checkpoints.check_pair(DALLEBART_PRESETS[model], VQGAN_PRESETS[codebook], Path("vqgan-folder"))
    assert str(error.value) == (f"the VQGAN in vqgan-folder has {VQGAN_PRESETS[codebook].n_embed} codes but the "
                                f"DalleBart model draws {draws} (ids below its start, eos and pad ids)")


@pytest.mark.parametrize("model", ["mini", "mega"])
def test_published_pairs_pass(model):
    # mega's image vocabulary is padded to 16415 ids; its codes are still the 16384 below the start token
    checkpoints.check_pair(DALLEBART_PRESETS[model], VQGAN_PRESETS["f16_16384"], Path("vqgan-folder"))


def test_engine_checks_the_tokenizer_and_the_pair(folder, tmp_path):
    vqgan_folder = tmp_path / "vqgan-512"
    vqgan_folder.mkdir()
    config = dataclasses.replace(VQGAN_PRESETS["tiny"], n_embed=512)
    (vqgan_folder / "config.json").write_text(json.dumps(config.to_dict()))
    (vqgan_folder / "flax_model.msgpack").write_bytes(msgpack_serialize(vqgan.init_params(config, 0)))
    with pytest.raises(CheckpointError, match=f"^the VQGAN in {vqgan_folder} has 512 codes but the DalleBart model "
                                              "draws 256 "):
        Engine.from_pretrained(folder, vqgan=vqgan_folder)
    _remove(folder, "tokenizer.json", "vocab.json")
    with pytest.raises(CheckpointError, match="missing tokenizer.json or vocab.json$"):
        Engine.from_pretrained(folder, vqgan=None)
