"""The engine against upstream dalle-mini 0.1.5 ``generate`` for the settings users pick: top-p with and without
top-k, temperature, several prompts in one batch, condition scale 1, a prompt cut to 64 tokens, and text prompts
through the tokenizer (and normaliser) of a real checkpoint folder.

Golden arrays: tests/fixtures/dallebart-tiny/expected_more.npz (made by tests/fixtures/make_upstream_fixtures.py,
described in that folder's README). Every upstream row was sampled with its prompt alone and ``PRNGKey(seed)``:
the engine gives each image its own key, split as upstream splits its batch key, so each engine row must equal
the upstream row of the same prompt and seed, bit for bit, whatever else is in the batch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dalle_space import bundled, text
from dalle_space.engine import Engine, seed_keys

FIXTURE = Path(__file__).parent / "fixtures" / "dallebart-tiny"


@pytest.fixture(scope="module")
def more():
    return dict(np.load(FIXTURE / "expected_more.npz"))


def _settings(values, vocab: int) -> dict:
    """Stored [condition scale, top-k, top-p, temperature] as engine arguments (0 / nan: not set upstream)."""
    scale, top_k, top_p, temperature = (float(v) for v in values)
    return dict(condition_scale=scale, top_k=int(top_k) or vocab,  # top-k over the whole vocabulary keeps all
                top_p=None if np.isnan(top_p) else top_p, temperature=1.0 if np.isnan(temperature) else temperature)


def _sample(engine, more, name):
    """The engine's tokens for one stored case, all its rows in one batch, prompt-major as the case lists them."""
    rows = more[f"{name}_rows"]
    prompts = list(dict.fromkeys(rows[:, 0].tolist()))
    assert rows[:, 0].tolist() == [p for p in prompts for _ in range(len(rows) // len(prompts))]
    return engine.sample_tokens(more["input_ids"][prompts], more["attention_mask"][prompts],
                                seed_keys(rows[:, 1]), mode="parallel",
                                **_settings(more[f"{name}_settings"], engine.config.image_vocab_size + 1))


@pytest.mark.parametrize("name", [
    "topp09_k50_cs3",
    "topp05_cs3",  # top-p alone; row 2 draws the end-of-image id, the rest of that row is padding
    "temp05_k50_cs3",
    "temp2_topp08_cs5",  # temperature before top-p, as upstream
    "batch_k50_cs3",  # 3 prompts of 5, 17 and 64 tokens x 2 seeds in one batch
    "cs1_k50",  # scale 1: the conditional sampler; rows 0 and 2 end early too
    "long_k50_cs3",  # a text prompt upstream's processor cut to 64 tokens
])
def test_rows_equal_upstream_alone(engine, more, name):
    """Parallel mode only, to keep this file quick: test_engine.py checks serial = parallel (one and several
    prompts, top-p on) and serial against upstream."""
    np.testing.assert_array_equal(_sample(engine, more, name), more[name][:, 1:])


def test_long_prompt_is_the_truncated_text_prompt(more):
    """Row 3 is the long text prompt cut to the fixture's 64 tokens; the bundled model's text rows cut it to its
    own 40: the same tokens up to there, then the end token."""
    ids, mask = more["input_ids"][3], more["attention_mask"][3]
    assert mask.all() and ids[0] == 0 and ids[-1] == 2
    shorter = more["text_input_ids"][2]
    np.testing.assert_array_equal(shorter, [*ids[:len(shorter) - 1], 2])


# ------------------------------------------------------------------------------------------------
# Text prompts on the bundled tiny model (its own weights and tokenizer): Engine.generate(prompts, seed=s)


def _check_bundled_is_the_sampled_one(more) -> None:
    """The text arrays were sampled from the bundled model as the package ships it; if its files change, the
    fixture must be regenerated rather than the engine suspected."""
    for name, digest in zip(more["bundled_files"], more["bundled_sha256"]):
        assert hashlib.sha256((bundled.DALLEBART / name).read_bytes()).hexdigest() == digest, (
            f"bundled tiny model file {name} changed: rerun tests/fixtures/make_upstream_fixtures.py --only more")


def _generate_and_compare(engine, more, prefix):
    prompts = more[f"{prefix}_prompts"].tolist()
    tokenized = text.encode_prompts(engine.tokenizer, prompts, engine.config.max_text_length, engine.normalizer)
    np.testing.assert_array_equal(tokenized.input_ids, more[f"{prefix}_input_ids"])
    np.testing.assert_array_equal(tokenized.attention_mask, more[f"{prefix}_attention_mask"])
    settings = _settings(more["text_settings"], engine.config.image_vocab_size + 1)
    result = engine.generate(prompts, seed=int(more[f"{prefix}_seed"]), **settings)
    np.testing.assert_array_equal(result.tokens, more[f"{prefix}_tokens"][:, 1:])
    return tokenized, result


def test_text_prompts_equal_upstream(more):
    _check_bundled_is_the_sampled_one(more)
    engine = Engine.from_pretrained("tiny")
    assert engine.normalizer is None  # the bundled config does not normalise, as upstream reads it
    tokenized, result = _generate_and_compare(engine, more, "text")
    assert tokenized.truncated == (False, False, True)
    assert len(result.notices) == 1 and result.notices[0].startswith("Prompt 3 ")  # cut to 40 tokens


def test_normalised_text_prompts_equal_upstream(more, tmp_path):
    """The same model with ``normalize_text`` on and a word list for hashtags, as the real checkpoints ship."""
    _check_bundled_is_the_sampled_one(more)
    folder = tmp_path / "dallebart-normalize"
    shutil.copytree(bundled.DALLEBART, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "normalize_text": True}, indent=2, sort_keys=True))
    (folder / "enwiki-words-frequency.txt").write_text("".join(f"{w}\n" for w in more["norm_words"]),
                                                       encoding="utf8")
    engine = Engine.from_pretrained(folder, vqgan="tiny")
    assert [engine.normalizer(p) for p in more["norm_prompts"]] == more["norm_normalized"].tolist()
    _generate_and_compare(engine, more, "norm")
