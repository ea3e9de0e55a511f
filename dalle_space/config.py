"""Frozen model configurations, read from a checkpoint's ``config.json`` with upstream field names.

Only the architecture the published DALL·E mini / mega checkpoints use is implemented (normformer layer
norms, GLU feed-forward, no biases, learned absolute positions). A checkpoint asking for anything else is
refused at load with a message naming the option, instead of silently computing something different.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


class UnsupportedConfigError(ValueError):
    """A checkpoint's config asks for an option this implementation does not compute."""


def _refuse_unsupported(model: str, raw: Mapping[str, Any], fixed: Mapping[str, Any]) -> None:
    """Raise one error naming every option whose value this implementation does not compute."""
    unsupported = [f"{name}={raw[name]!r} (supported: {expected!r})"
                   for name, expected in fixed.items() if name in raw and raw[name] != expected]
    if unsupported:
        raise UnsupportedConfigError(
            f"{model} config asks for options this implementation does not support: " + ", ".join(unsupported))


def _known_fields(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
    return {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw}


@dataclasses.dataclass(frozen=True)
class DalleBartConfig:
    d_model: int = 1024  # width of every hidden state
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 2730  # GLU inner width
    decoder_ffn_dim: int = 2730
    encoder_vocab_size: int = 50264  # text tokens
    image_vocab_size: int = 16384  # VQGAN codes; the decoder has one more row, the start token
    image_length: int = 256  # image tokens per picture (16 x 16 grid)
    max_text_length: int = 64  # text tokens per prompt, after padding / truncation
    bos_token_id: int = 16384
    eos_token_id: int = 16384  # a sampled eos ends the picture: it and every later token become pad
    pad_token_id: int = 16384
    decoder_start_token_id: int = 16384  # fed at position 0
    normalize_text: bool = False  # whether prompts go through the text normaliser first
    # The codes sampling keeps at each position unless a request says otherwise: upstream's generate reads it
    # from config.json, as transformers' configs carry it (their default 50, where 0 or null keeps every code).
    top_k: int = 50

    @property
    def decoder_vocab_size(self) -> int:
        """Rows of the decoder embedding and columns of lm_head: image codes plus the start token."""
        return self.image_vocab_size + 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.decoder_attention_heads

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "DalleBartConfig":
        """Build from an upstream ``config.json`` dict, refusing options whose computation differs."""
        _refuse_unsupported("DalleBart", raw, _DALLEBART_FIXED)
        values = _known_fields(cls, raw)
        # Upstream's DalleBartConfig sets every special id to image_vocab_size unless given.
        image_vocab_size = values.get("image_vocab_size", cls.image_vocab_size)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            if values.get(name) is None:
                values[name] = image_vocab_size
        if "top_k" in values and values["top_k"] in (None, 0) and values["top_k"] is not False:
            values["top_k"] = image_vocab_size + 1  # no top-k: every code kept
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content upstream would read back to the same model."""
        return {**_DALLEBART_FIXED, **dataclasses.asdict(self), "model_type": "dallebart"}


# Upstream options whose value changes the computation, fixed to what the published checkpoints use.
_DALLEBART_FIXED: dict[str, Any] = {
    "ln_type": "layernorm",
    "ln_positions": "normformer",
    "use_glu": True,
    "use_bias": False,
    "force_ln_scale": False,
    "use_final_ln_encoder": True,
    "use_final_ln_decoder": True,
    "scale_embedding": False,
    "use_absolute_position_embeddings": True,
    "activation_function": "gelu",
    "tie_word_embeddings": False,
    "use_alibi": False,
    "use_cosine_attention": False,
    "use_deepnet_scaling": False,
    "use_head_scale": False,
    "use_swin_position_embeddings": False,
    "use_subln_init": False,
    "sinkhorn_iters": 1,
}


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    ch: int = 128  # base channel count, multiplied per resolution by ch_mult
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)  # feature-map sides that get a self-attention block
    resolution: int = 256  # output image side
    z_channels: int = 256
    embed_dim: int = 256  # codebook vector width
    n_embed: int = 16384  # codebook size
    in_channels: int = 3
    out_ch: int = 3

    @property
    def num_resolutions(self) -> int:
        return len(self.ch_mult)

    @property
    def downsampling(self) -> int:
        """Side in pixels of the square one code stands for: the decoder's total upsampling."""
        return 2 ** (self.num_resolutions - 1)

    @property
    def grid_side(self) -> int:
        """Side of the code grid: the image side divided by ``downsampling``."""
        return self.resolution // self.downsampling

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "VQGANConfig":
        num_resolutions = {"num_resolutions": len(raw.get("ch_mult", cls.ch_mult))}
        _refuse_unsupported("VQGAN", raw, {**_VQGAN_FIXED, **num_resolutions})
        values = _known_fields(cls, raw)
        for name in ("ch_mult", "attn_resolutions"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return {**_VQGAN_FIXED, **values, "num_resolutions": self.num_resolutions, "architectures": ["del"]}


_VQGAN_FIXED: dict[str, Any] = {
    "double_z": False,
    "resamp_with_conv": True,
    "give_pre_end": False,
    "dropout": 0.0,
}


def _special_ids(start: int, end: int) -> dict[str, int]:
    """Start-of-image id and the bos/eos/pad id, as the checkpoints' config.json files set them."""
    return {"decoder_start_token_id": start, "bos_token_id": end, "eos_token_id": end, "pad_token_id": end}


DALLEBART_PRESETS: dict[str, DalleBartConfig] = {
    # The bundled model (dalle_space/models/tiny), trained on synthetic scenes: loads and samples in seconds
    # on a CPU. Its tokenizer has every scene word as one token, so 40 tokens hold the longest caption (33).
    "tiny": DalleBartConfig(
        d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
        encoder_vocab_size=1000, image_vocab_size=256, max_text_length=40, **_special_ids(256, 256),
        top_k=3,  # its colours and shapes are drawn right more often than at 50 (training/README.md)
    ),
    # hub dalle-mini/dalle-mini (wandb artifact mini-1:v0)
    "mini": DalleBartConfig(**_special_ids(16384, 16385)),
    # hub dalle-mini/dalle-mega
    "mega": DalleBartConfig(
        d_model=2048, encoder_layers=24, decoder_layers=24, encoder_attention_heads=32,
        decoder_attention_heads=32, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
        encoder_vocab_size=50272, image_vocab_size=16415, **_special_ids(16384, 16385),
    ),
}

VQGAN_PRESETS: dict[str, VQGANConfig] = {
    # The bundled model's: 16 x 16 codes from a 256-entry codebook, decoded to 64 x 64 pixels; one resnet block
    # per level and attention only in the middle, to train in budget on a CPU.
    "tiny": VQGANConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(), resolution=64,
                        z_channels=32, embed_dim=32, n_embed=256),
    # hub dalle-mini/vqgan_imagenet_f16_16384
    "f16_16384": VQGANConfig(),
}
