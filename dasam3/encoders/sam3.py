"""transformers' Sam3Model vision and text towers as DA-SAM3's frozen encoders.

The towers come from a local `Sam3Model.from_pretrained` directory (the weights are gated on the hub:
users download them themselves) or, randomly initialised, from a `Sam3Config` dict (tests, toy runs).
Option "image_size" sets the ViT's input resolution (SAM3's is 1008; its weights do not depend on it,
so e.g. 336 runs the same checkpoint 9x cheaper).  Both towers stay frozen: no stage trains them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dasam3._common import masked_mean

from .base import CachedTextEncoder, ImageEncoder

_SAM3_MEAN, _SAM3_STD = 0.5, 0.5  # Sam3ImageProcessor's normalisation (IMAGENET_STANDARD_*)
_PROMPT_LENGTH = 32  # Sam3Processor pads text prompts to 32 tokens


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError("the sam3 encoders need transformers with Sam3Model: pip install 'dasam3[sam3]'") from error
    return transformers


@dataclass
class Sam3Towers:
    vision: nn.Module | None
    text: nn.Module | None
    text_projection: nn.Linear | None
    source: str | None  # the local directory the weights came from, None when built from a config
    text_config: Any


def load_sam3_towers(options: dict[str, Any], *, vision: bool, text: bool) -> Sam3Towers:
    """The towers of a Sam3Model given {"pretrained": local dir} or {"config": Sam3Config dict}."""
    transformers = _transformers()
    if "pretrained" in options:
        path = str(options["pretrained"])
        config = _with_image_size(transformers.Sam3Config.from_pretrained(path, local_files_only=True), options)
        model = transformers.Sam3Model.from_pretrained(path, config=config, local_files_only=True)
        return Sam3Towers(model.vision_encoder if vision else None, model.text_encoder if text else None,
                          model.text_projection if text else None, path, model.config.text_config)
    if "config" in options:
        config = _with_image_size(transformers.Sam3Config.from_dict(dict(options["config"])), options)
        from transformers.models.clip.modeling_clip import CLIPTextModelWithProjection
        from transformers.models.sam3.modeling_sam3 import Sam3VisionModel

        return Sam3Towers(
            Sam3VisionModel(config.vision_config) if vision else None,
            CLIPTextModelWithProjection(config.text_config) if text else None,
            nn.Linear(config.text_config.hidden_size, config.detr_encoder_config.hidden_size) if text else None,
            None, config.text_config)
    raise ValueError(f"sam3 encoder options need 'pretrained' (a local Sam3Model directory) or 'config' "
                     f"(a Sam3Config dict), got keys {sorted(options)}")


def _with_image_size(config, options: dict[str, Any]):
    if "image_size" in options:
        size, patch = int(options["image_size"]), _pair(config.vision_config.backbone_config.patch_size)[0]
        if size < patch or size % patch:
            raise ValueError(f"sam3 image_size must be a positive multiple of the patch size {patch}, got {size}")
        config.vision_config.backbone_config.image_size = size
    return config


def _frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False)


class Sam3ImageEncoder(ImageEncoder):
    """Sam3Model's ViT + FPN neck, frozen; the three finest FPN levels (strides patch/4, patch/2, patch).

    Images [B, 1 or 3, H, W] in [0, 1] are resized to the tower's input size and normalised as
    Sam3ImageProcessor does; a single channel is repeated to three.
    """

    def __init__(self, vision_model: nn.Module, pretrained_source: str | None = None):
        super().__init__()
        self.vision = _frozen(vision_model)
        self.pretrained_source = pretrained_source
        config = vision_model.config
        backbone = config.backbone_config
        self.input_size = _pair(backbone.image_size)
        patch = _pair(backbone.patch_size)
        grid = (self.input_size[0] // patch[0], self.input_size[1] // patch[1])
        token_scale = config.scale_factors[-2]  # the last level SAM3 itself uses
        self.token_grid = (int(grid[0] * token_scale), int(grid[1] * token_scale))
        self.channels = [config.fpn_hidden_size] * (len(config.scale_factors) - 1)

    def grid_size(self, image_size: int) -> tuple[int, int]:
        return self.token_grid

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=False)
        outputs = self.vision((images - _SAM3_MEAN) / _SAM3_STD)
        return list(outputs.fpn_hidden_states[:-1])  # SAM3 drops the coarsest (stride 2·patch) level too


class Sam3TextEncoder(CachedTextEncoder):
    """Sam3Model's CLIP text tower and its projection to the DETR width, frozen; masked mean over the prompt.

    Cached per concept string: no stage trains the text tower (SPEC section 3), so its embeddings are fixed.
    """

    def __init__(self, text_model: nn.Module, projection: nn.Linear,
                 tokenizer: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
                 pretrained_source: str | None = None):
        super().__init__()
        self.text = _frozen(text_model)
        self.projection = _frozen(projection)
        self.tokenizer = tokenizer
        self.pretrained_source = pretrained_source
        self.dim = projection.out_features

    def _compute(self, concepts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenizer(concepts)
        device = self.projection.weight.device
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.projection(self.text(input_ids=ids, attention_mask=mask).last_hidden_state)
        return masked_mean(hidden, mask)


class ByteTokenizer:
    """A stand-in tokenizer for towers built from a config (no vocabulary files): UTF-8 bytes mod vocab."""

    def __init__(self, text_config: Any, length: int = _PROMPT_LENGTH):
        self.vocab_size = text_config.vocab_size
        self.length = min(length, text_config.max_position_embeddings)
        self.bos, self.eos = text_config.bos_token_id % self.vocab_size, text_config.eos_token_id % self.vocab_size
        self.pad = (text_config.pad_token_id or 0) % self.vocab_size

    def __call__(self, concepts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(concepts), self.length), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, concept in enumerate(concepts):
            tokens = [self.bos, *(b % self.vocab_size for b in concept.encode("utf-8"))][: self.length - 1]
            tokens.append(self.eos)
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return ids, mask


class HFTokenizer:
    """The CLIP tokenizer saved with a SAM3 checkpoint, padded as Sam3Processor pads prompts."""

    def __init__(self, path: str):
        try:
            self.tokenizer = _transformers().AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"no tokenizer in {path}: text_encoder='sam3' needs the checkpoint's tokenizer "
                             "files (or text_encoder_options['tokenizer'] = a directory holding them, "
                             "or 'bytes' for a toy byte tokenizer)") from error

    def __call__(self, concepts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.tokenizer(concepts, padding="max_length", max_length=_PROMPT_LENGTH, truncation=True,
                                 return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]


def make_tokenizer(options: dict[str, Any], towers: Sam3Towers):
    choice = options.get("tokenizer", towers.source or "bytes")
    return ByteTokenizer(towers.text_config) if choice == "bytes" else HFTokenizer(str(choice))


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, (int, float)) else (int(value[0]), int(value[1]))
