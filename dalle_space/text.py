"""Prompt text: upstream-compatible normalisation, BART tokenizer loading and fixed-length encoding.

The published checkpoints were trained on text that went through dalle-mini's normaliser and a BART byte-level
BPE tokenizer, so prompts must be prepared the same way for the encoder to see familiar tokens.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from pathlib import Path
from typing import Iterable, Sequence

import emoji
import ftfy
import numpy as np
from tokenizers import AddedToken, ByteLevelBPETokenizer, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import BartTokenizerFast
from unidecode import unidecode

# Stand-ins that carry a dot, apostrophe or slash worth keeping past the step that turns punctuation into commas.
# Word characters, so the patterns in between see them as upstream saw its letter placeholders; non-ASCII, so they
# cannot come from the transliterated prompt.
_DOT, _APOSTROPHE, _SLASH = "\u03b4", "\u03b1", "\u03c3"  # Greek delta, alpha, sigma


def _substitutions(*rules: tuple[str, str]) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile(pattern), replacement) for pattern, replacement in rules]


# Applied in order before hashtags are expanded.
_CLEAN = _substitutions(
    (r"\s+", " "),  # early, so that later patterns never scan long runs of blanks
    (r"\A\s*\[\d+\]|\[\d+\]\s*\Z", ""),  # wikipedia-style reference marks at either end
    (r"<[^<]+?>", " "),  # html tags
    (r"http\S+", ""),  # urls
    # thousands separators, 1,000,000 -> 1000000; twice, as a pass skips a group whose digit it just consumed
    (r"(\d),(\d{3})", r"\1\2"),
    (r"(\d),(\d{3})", r"\1\2"),
    (r"(\w)\.(\w)", rf"\1{_DOT}\2"),  # decimals, abbreviations: 3.14
    (r"'(?=(?:[stdm]|ll|re|ve)\b)", _APOSTROPHE),  # contractions: it's, we'll
    (r"(\d)/(\d)", rf"\1{_SLASH}\2"),  # dates and fractions: 12/25
    (r"(\w)-(\w)", r"\1 \2"),  # hyphenated words: well-known -> well known
    (r"([%&/$*])", r" \1 "),
)

# Applied in order after hashtags are expanded.
_PUNCTUATE = _substitutions(
    (r"[_#\\]", " "),
    (r"['\"`]", ' " '),
    (r"[()\[\].,|:;?!=+~\-/{}]", ","),  # every other punctuation mark separates phrases
    (_DOT, "."),
    (_APOSTROPHE, "'"),
    (_SLASH, "/"),
    (r"(\D)\1{3,}", r"\1"),  # 4+ repeats collapse ("heyyyy"); 3 survive for roman numerals like viii
    (r'(\s*"+\s*)+', ' " '),
    (r"(\s*,+\s*)+", ", "),
    (r"\s+", " "),
)


class _WordSplitter:
    """Splits run-together words ("sunsetbeach") into the likeliest word sequence under a Zipf model.

    A word's cost is log(1 + its rank) in the frequency file (most frequent first); the segmentation with the
    least total cost wins, ties going to the shorter last word. Adjacent digit groups are kept together.
    """

    def __init__(self, path: str | Path):
        self._cost: dict[str, float] = {}
        ranked = (line.split()[0] for line in Path(path).read_text(encoding="utf8").splitlines() if line.split())
        for rank, word in enumerate(ranked):
            self._cost[word] = math.log(rank + 1)
        if not self._cost:
            raise ValueError(f"word frequency file {path} lists no words")
        self._longest = max(map(len, self._cost))

    def __call__(self, tag: str) -> str:
        return " ".join(word for part in tag.split("_") for word in self._segment(part))

    def _segment(self, s: str) -> list[str]:
        # best[i] = (least cost of s[:i], length of the last word in that split)
        best = [(0.0, 0)]
        for i in range(1, len(s) + 1):
            best.append(
                min(
                    (best[i - n][0] + self._cost.get(s[i - n : i], math.inf), n)
                    for n in range(1, min(i, self._longest) + 1)
                )
            )
        words: list[str] = []
        i = len(s)
        while i > 0:
            word = s[i - best[i][1] : i]
            if words and word[-1].isdigit() and words[-1][0].isdigit():
                words[-1] = word + words[-1]
            else:
                words.append(word)
            i -= len(word)
        return words[::-1]


class TextNormalizer:
    """Rewrites a prompt the way dalle-mini's ``TextNormalizer`` rewrote the training captions.

    Repairs mojibake, spells emoji out as words, transliterates to lower-case ASCII, drops urls and html, turns
    punctuation into comma separators and tidies spacing. Hashtags are split into words only when a word
    frequency file (one word per line, most frequent first, e.g. upstream's ``enwiki-words-frequency.txt``)
    is given; otherwise they just lose the ``#``. As upstream, the result starts with one space, which the
    byte-level BPE tokenizer turns into word-initial tokens.
    """

    def __init__(self, word_frequency_path: str | Path | None = None):
        self._split_words = _WordSplitter(word_frequency_path) if word_frequency_path is not None else None

    def __call__(self, text: str) -> str:
        t = html.unescape(html.unescape(ftfy.fix_text(text)))
        t = unidecode(emoji.demojize(t)).lower()
        for pattern, replacement in _CLEAN:
            t = pattern.sub(replacement, t)
        if self._split_words is not None:  # placeholders end a hashtag, so "#sunset's" keeps its apostrophe
            t = re.sub(r"#([a-z0-9_]+)", lambda m: self._split_words(m.group(1)), t)
        for pattern, replacement in _PUNCTUATE:
            t = pattern.sub(replacement, t)
        t = t.strip().removesuffix(",").removeprefix(",").strip()
        return f" {t}"


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenized:
    """A batch of prompts as the encoder takes them, plus what the user may want to be told."""

    input_ids: np.ndarray  # (P, max_length) int32: <s> tokens </s> <pad> ...
    attention_mask: np.ndarray  # (P, max_length) int32: 1 on <s> ... </s>, 0 on padding
    truncated: tuple[bool, ...]  # prompt had more tokens than fit; its tail was dropped
    normalized: tuple[str, ...]  # the text actually tokenized


def load_tokenizer(folder: str | Path) -> BartTokenizerFast:
    """The BART tokenizer stored with a checkpoint, read from its folder only (never the hub). Unchecked: given a
    folder without tokenizer files, transformers builds a five-token tokenizer, so a folder a user names goes
    through ``checkpoints.load_tokenizer``, which looks for the files first and checks what was read."""
    return BartTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def _encode(tokenizer: BartTokenizerFast, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    # The exact call upstream's DalleBartProcessor makes.
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length)
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)


def encode_prompts(
    tokenizer: BartTokenizerFast,
    prompts: Sequence[str],
    max_length: int,
    normalizer: TextNormalizer | None,
) -> Tokenized:
    """Tokenize prompts to ``max_length`` ids each, padded and truncated exactly as upstream.

    A truncated prompt keeps its first ``max_length - 2`` tokens and still ends in ``</s>``.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a string")
    texts = [normalizer(p) for p in prompts] if normalizer is not None else list(prompts)
    if not texts:
        empty = np.zeros((0, max_length), np.int32)
        return Tokenized(empty, empty.copy(), (), ())
    input_ids, attention_mask = _encode(tokenizer, texts, max_length)
    # Cutting at one more than fits tells which prompts did not fit, without tokenizing very long ones whole.
    longer = tokenizer(texts, truncation=True, max_length=max_length + 1)["input_ids"]
    return Tokenized(
        input_ids=input_ids,
        attention_mask=attention_mask,
        truncated=tuple(len(ids) > max_length for ids in longer),
        normalized=tuple(texts),
    )


def unconditional_ids(tokenizer: BartTokenizerFast, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """The empty prompt ``<s></s><pad>...`` (ids and mask, each (1, max_length)) used for super conditioning."""
    return _encode(tokenizer, [""], max_length)


_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, as in BART; <mask> takes the last id

# Training text for the bundled tiny model's tokenizer: prompt-like English, so common words get their own tokens.
_TINY_CORPUS = """
a photo of a red fox sleeping in the snow under a pine tree at dawn
an oil painting of a lighthouse on a rocky coast during a storm with huge waves
a watercolor sketch of a small village by a river in spring with cherry blossoms
a cat wearing a tiny hat sitting on a wooden chair next to a window
a dog running across a green field chasing a yellow ball on a sunny afternoon
a bowl of ramen with an egg and green onions on a dark table, studio lighting
a castle on top of a mountain surrounded by clouds, fantasy art, highly detailed
an astronaut riding a horse on the moon, digital art
a city street at night in the rain with neon signs reflected in puddles
a cozy living room with a fireplace, a bookshelf, a sofa and a sleeping cat
a plate of pancakes with blueberries and maple syrup, morning light
a robot reading a newspaper in a busy cafe in paris
an old man fishing from a boat on a calm lake at sunset
a child flying a kite on a windy beach with dunes and tall grass
a bicycle leaning against a brick wall covered in ivy
a forest path in autumn with orange and golden leaves on the ground
a snowy mountain village with warm lights in every window at twilight
a pencil drawing of an owl perched on a branch under a full moon
a bright kitchen with white cabinets, a marble counter and fresh flowers in a vase
a sailing ship crossing the ocean under a starry sky
a giraffe eating leaves from a tall tree on the african savanna
a family of ducks swimming across a pond in the park
a vintage car parked in front of a diner in the desert
a mug of hot chocolate with whipped cream on a winter morning
a portrait of a woman with curly hair, soft light, painted in the style of an old master
a man in a suit holding an umbrella on a crowded bridge
a treehouse in a giant oak tree with a rope ladder and lanterns
a pixel art scene of a knight fighting a dragon in a cave
a underwater scene with colorful coral, fish and a sea turtle
a field of sunflowers under a blue sky with white clouds
a train crossing a stone bridge over a deep green valley
a teddy bear having a picnic with a rabbit on a checkered blanket
a close up photograph of a butterfly resting on a purple flower
a futuristic city with flying cars and glass towers at sunrise
a basket of apples, pears and grapes on a rustic wooden table
a black and white photo of a jazz band playing in a small club
a penguin standing on an ice floe looking at the northern lights
a stained glass window showing a tree of life in blue and gold
a cup of coffee and a croissant on a balcony overlooking the sea
a skier racing down a steep slope, motion blur, action shot
a library with tall shelves, ladders and a round window of light
a hot air balloon drifting over fields of lavender in the summer
a desert landscape with cactus plants and red rocks under the midday sun
a panda eating bamboo in a misty bamboo forest
a birthday cake with candles and colorful sprinkles on a party table
an elephant walking along a dusty road with her calf
a garden with a fountain, roses and a white bench in the shade
a cartoon of a happy frog playing a guitar on a lily pad
a medieval market with tents, baskets of bread and people trading goods
a waterfall falling into a clear blue pool in the jungle
a sketch of a sports car, side view, clean lines, concept design
a quiet snowy street with one lamp post glowing in the evening
a lion resting on a rock in the golden light of late afternoon
a wooden cabin by a frozen lake with smoke rising from the chimney
a bowl of fruit salad with strawberries, kiwi and mango, top view
a wizard reading a glowing book in a tower full of candles
a cute baby elephant wearing rain boots, splashing in puddles
a photograph of earth from space showing oceans, deserts and clouds
a horse standing in a meadow with mountains in the background
a 3d render of a small island with palm trees and a hut
an abstract painting with bold shapes in red, blue and yellow
a squirrel holding an acorn on a mossy log in the woods
a busy harbor with fishing boats, seagulls and stacked wooden crates
"""


def write_tiny_tokenizer(folder: str | Path, vocab_size: int = 1000, extra_lines: Iterable[str] = ()) -> None:
    """Write a small BART-style byte-level BPE tokenizer for the bundled offline ``tiny`` model.

    Trained on a fixed inline corpus plus ``extra_lines`` (training/train.py passes the training captions, so
    that every scene word is one token); the same lines give the same bytes on every run. Ids 0..3 are
    ``<s> <pad> </s> <unk>``, ``<mask>`` is ``vocab_size - 1``, and there are exactly ``vocab_size`` tokens.
    Writes vocab.json, merges.txt, tokenizer.json, special_tokens_map.json and tokenizer_config.json.
    """
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(
        [*_TINY_CORPUS.strip().splitlines(), *extra_lines],
        vocab_size=vocab_size - 1,
        min_frequency=1,
        show_progress=False,
        special_tokens=list(_SPECIALS),
    )
    model = json.loads(trainer.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    if len(vocab) != vocab_size - 1:
        raise ValueError(f"the tiny corpus only supports {len(vocab) + 1} tokens, not {vocab_size}")
    vocab["<mask>"] = vocab_size - 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer.add_special_tokens([*_SPECIALS, AddedToken("<mask>", lstrip=True)])

    specials = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "cls_token": "<s>",
        "mask_token": "<mask>",
    }
    config = {
        **specials,
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": 1024,
        "tokenizer_class": "BartTokenizer",
        "trim_offsets": True,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ordered = dict(sorted(vocab.items(), key=lambda item: item[1]))
    (folder / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False), encoding="utf8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf8")
    (folder / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf8")
