"""Prompt normalisation, the tiny tokenizer and fixed-length encoding (dalle_space.text)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from dalle_space.text import (
    TextNormalizer,
    Tokenized,
    encode_prompts,
    load_tokenizer,
    unconditional_ids,
    write_tiny_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json")

# Expected values were checked against upstream dalle-mini 0.1.5's TextNormalizer (it always adds a leading space).
NORMALIZED = [
    # mojibake and accents
    ("cafÃ© au lait", " cafe au lait"),
    ("Ünïcödé", " unicode"),
    ("naïve café résumé", " naive cafe resume"),
    ("ﬁne ligature", " fine ligature"),
    ("привет мир", " privet mir"),
    # emoji become their names, separated by commas
    ("a cat 🐱 on a 🚲", " a cat, cat face, on a, bicycle"),
    ("🐱", " cat face"),
    ("🐱🐱", " cat face, cat face"),
    # quotes, apostrophes, dashes
    ("he said “hello” — it’s fine", ' he said " hello ", it\'s fine'),
    ("mother’s day", " mother's day"),
    ("I'm here, you're there", " i'm here, you're there"),
    ("`back`", ' " back "'),
    ("snow-covered mountains at dawn", " snow covered mountains at dawn"),
    ("naïve—really", " naive, really"),
    ("x - y", " x, y"),
    # punctuation, numbers, symbols
    ("a photo of a cat.", " a photo of a cat"),
    ("(hello) [world] {x}", " hello, world, x"),
    ("a, b,, c ,, d", " a, b, c, d"),
    (", leading and trailing ,", " leading and trailing"),
    ("hello?!", " hello"),
    ("1,000,000 stars", " 1000000 stars"),
    ("3.14 is pi", " 3.14 is pi"),
    ("on 12/25/2020", " on 12/25/2020"),
    ("½ cup", " 1/2 cup"),
    ("50% off", " 50 % off"),
    ("Tom & Jerry", " tom & jerry"),
    ("heyyyyy!!!!", " hey"),
    ("chapter viii", " chapter viii"),
    # html, urls, reference marks
    ("AT&amp;T logo", " at & t logo"),
    ("<b>bold</b> text", " bold text"),
    ("see https://example.com now", " see now"),
    ("[1] a cat", " a cat"),
    # spacing and control characters
    ("a   b\n\nc\t d", " a b c d"),
    ("  padded  ", " padded"),
    ("\x00\x01ctrl\x7f", " ctrl"),
    ("", " "),
    ("   \n\t ", " "),
    # upstream quirks, kept so prompts tokenize as the training captions did
    ("it's.png", ' it " s.png'),
    ("the 80s-'s look", " the 80s 's look"),
    ("a-b-c", " a b, c"),
    ("v1.2.3", " v1.2, 3"),
    # hashtags without a word frequency file only lose the '#'
    ("#sunsetbeach photo", " sunsetbeach photo"),
    ("#NewYorkCity at night", " newyorkcity at night"),
]


@pytest.mark.parametrize("raw, expected", NORMALIZED)
def test_normalizer_table(raw, expected):
    assert TextNormalizer()(raw) == expected


@pytest.fixture(scope="module")
def word_frequency_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("words") / "words.txt"
    words = "the of and in a cat sunset beach love sun set be ach new york city 20 22 goals hashtag with underscore"
    path.write_text("".join(f"{w} {1000 - i}\n" for i, w in enumerate(words.split())), encoding="utf8")
    return path


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("#sunsetbeach photo", " sunset beach photo"),
        ("#NewYorkCity at night", " new york city at night"),
        ("i love #newyorkcity!", " i love new york city"),
        ("#hashtag_with_underscore", " hashtag with underscore"),
        ("#2022goals", " 2022 goals"),  # digit runs stay whole
        ("no hashtag: sunsetbeach", " no hashtag, sunsetbeach"),
    ],
)
def test_hashtags_split_with_word_frequencies(word_frequency_file, raw, expected):
    assert TextNormalizer(word_frequency_file)(raw) == expected


def test_empty_word_frequency_file_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf8")
    with pytest.raises(ValueError, match="no words"):
        TextNormalizer(tmp_path / "empty.txt")


def test_long_prompt_keeps_every_word():
    assert TextNormalizer()("A red fox  " * 1000) == " " + " ".join(["a red fox"] * 1000)


@pytest.mark.parametrize(
    "raw",
    [
        "\ud800 lone surrogate \udfff",
        "🐱" * 3000,
        " " * 10000,
        "\n\t" * 5000,
        "#" * 10000,
        "#" + "ab" * 5000,
        '"' * 10000,
        "<a" * 5000,
        "".join(chr(c) for c in range(0, 0x3000, 3)),
    ],
)
def test_normalizer_never_raises(word_frequency_file, raw):
    for normalizer in (TextNormalizer(), TextNormalizer(word_frequency_file)):
        out = normalizer(raw)
        assert out.startswith(" ") and out.isascii() and "  " not in out


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tiny_folder):
    return load_tokenizer(tiny_folder)


def _read_all(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_tiny_tokenizer_is_deterministic_across_processes(tiny_folder, tmp_path):
    # A fresh interpreter with another hash seed and thread count must write the very same bytes.
    script = f"from dalle_space.text import write_tiny_tokenizer; write_tiny_tokenizer({str(tmp_path)!r})"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "RAYON_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=REPO, capture_output=True)
    assert tuple(_read_all(tmp_path)) == TOKENIZER_FILES
    assert _read_all(tmp_path) == _read_all(tiny_folder)


def test_tiny_tokenizer_training_result_is_pinned(tiny_folder):
    # Guards "same bytes on any machine": a tokenizers release that trains differently shows up here.
    digests = {
        name: hashlib.sha256((tiny_folder / name).read_bytes()).hexdigest() for name in ("vocab.json", "merges.txt")
    }
    assert digests == {
        "vocab.json": "bfb55547d5a9e8735d4d59e428a618fd39dbd7b504b37bca18b1bc8f7eb801e9",
        "merges.txt": "5f57e77b023b1e620f3e4cfbfc252d92e664c1292e26c42860b4e863b0679f17",
    }


@pytest.mark.parametrize("vocab_size", [1000, 600])
def test_tiny_tokenizer_vocabulary(tmp_path, vocab_size):
    write_tiny_tokenizer(tmp_path, vocab_size=vocab_size)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf8"))
    assert sorted(vocab.values()) == list(range(vocab_size))
    assert [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, vocab_size - 1]
    tok = load_tokenizer(tmp_path)
    assert len(tok) == vocab_size
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token_id == vocab_size - 1
    ids = tok(" a cat wearing a tiny hat, ünïcödé 🐱 <mask>")["input_ids"]
    assert ids[0] == 0 and ids[-2:] == [vocab_size - 1, 2] and max(ids) < vocab_size
    # tokenizer.json alone (no transformers) gives the same ids, <mask> swallowing the space before it
    plain = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(" a hat <mask>").ids
    assert plain == tok(" a hat <mask>")["input_ids"] == tok(" a hat")["input_ids"][:-1] + [vocab_size - 1, 2]


def test_tiny_tokenizer_refuses_sizes_its_corpus_cannot_reach(tmp_path):
    with pytest.raises(ValueError, match="tiny corpus"):
        write_tiny_tokenizer(tmp_path, vocab_size=100_000)


def test_tiny_tokenizer_learned_prompt_words(tokenizer):
    assert tokenizer.convert_ids_to_tokens(tokenizer(" a cat on a red chair")["input_ids"]) == [
        "<s>", "Ġa", "Ġcat", "Ġon", "Ġa", "Ġred", "Ġchair", "</s>",
    ]


def _check_rows(tok: Tokenized, max_length: int) -> None:
    assert tok.input_ids.shape == tok.attention_mask.shape == (len(tok.normalized), max_length)
    assert tok.input_ids.dtype == np.int32 and tok.attention_mask.dtype == np.int32
    for ids, mask in zip(tok.input_ids, tok.attention_mask):
        n = int(mask.sum())
        assert list(mask) == [1] * n + [0] * (max_length - n)
        assert ids[0] == 0 and ids[n - 1] == 2 and (ids[n:] == 1).all()
        assert not np.isin(ids[1 : n - 1], [0, 1, 2]).any()


def test_encode_prompts_pads_and_truncates(tokenizer):
    long_prompt = " ".join(["mountain"] * 500)
    out = encode_prompts(tokenizer, ["a cat on a red chair", long_prompt, ""], 64, TextNormalizer())
    _check_rows(out, 64)
    assert out.normalized == (" a cat on a red chair", " " + long_prompt, " ")
    assert out.attention_mask.sum(axis=1).tolist() == [8, 64, 3]  # " " alone is one token
    assert out.input_ids[0, :8].tolist() == tokenizer(" a cat on a red chair")["input_ids"]
    assert out.input_ids[1, -1] == 2
    assert out.truncated == (False, True, False)


def test_encode_prompts_truncation_boundary(tokenizer):
    # " a" is one token, so k of them plus <s> and </s> need k + 2 positions.
    fits, overflows = " a" * 30, " a" * 31
    out = encode_prompts(tokenizer, [fits, overflows], 32, None)
    _check_rows(out, 32)
    assert out.truncated == (False, True)
    assert out.normalized == (fits, overflows)
    assert (out.input_ids[0] == out.input_ids[1]).all()


def test_encode_prompts_batch_edge_cases(tokenizer):
    empty = encode_prompts(tokenizer, [], 16, TextNormalizer())
    assert empty.input_ids.shape == empty.attention_mask.shape == (0, 16)
    assert empty.truncated == () and empty.normalized == ()
    with pytest.raises(TypeError):
        encode_prompts(tokenizer, "a cat", 16, None)


@pytest.mark.parametrize("max_length", [64, 32])
def test_unconditional_ids(tokenizer, max_length):
    ids, mask = unconditional_ids(tokenizer, max_length)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.tolist() == [[0, 2] + [1] * (max_length - 2)]
    assert mask.tolist() == [[1, 1] + [0] * (max_length - 2)]
