"""DA-SAM3: frozen encoders, the Hierarchical Fusion Decoder with DA-MoE layers, and a mask head."""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from dasam3._common import factory_of
from dasam3.encoders import build_encoders
from dasam3.encoders.cache import FeatureCache
from dasam3.io import atomic_output, check_weights_fit, load_config, load_safetensors, write_text
from dasam3.layers.context import ConceptConcat, ConceptContext
from dasam3.layers.damoe import DAMoE
from dasam3.layers.patch import select_layers
from dasam3.layers.training import mark_trainable, needs_autograd, trainable_parameters

from .config import DASAM3Config, MoEConfig, known_fields
from .decoder import HierarchicalFusionDecoder, MaskHead

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"

# The ablations of the paper as upcycle() keywords ("concat" is the non-MoE baseline, see add_concat_fusion).
VARIANTS: dict[str, dict | None] = {
    "da-sam3": {},
    "wo-der": {"router": "random"},
    "wo-dpe": {"expert_type": "full"},
    "standard-moe": {"expert_type": "full", "use_context": False},
    "lora": {"num_experts": 1, "top_k": 1, "use_context": False},
    "concat": None,
}

Concepts = Sequence[str] | torch.Tensor | None


class DASAM3(nn.Module):
    """Concept-prompted segmentation: `model(images [B, C, H, W], concepts) -> logits [B, K, H, W]`.

    concepts: K strings (the same for every image), embeddings [B, Dt] (K = 1) or [B, K, Dt], or None
    for `config.concepts`.  Logit k of a pixel says whether it shows concept k (sigmoid, per concept).
    The encoders run without autograd whenever nothing in them trains (SPEC section 3: no backward
    through a frozen tower); the fusion decoder is the model's fusion module (`mark_trainable`).
    """

    def __init__(self, config: DASAM3Config):
        super().__init__()
        self.config = copy.deepcopy(config)  # upcycle() records itself here: never in the caller's object
        config = self.config
        self.image_encoder, self.text_encoder = build_encoders(config)
        grid = self.image_encoder.grid_size(config.image_size)
        channels = self.image_encoder.channels
        self.decoder = HierarchicalFusionDecoder(
            channels, grid, self.text_encoder.dim, config.d_model, config.num_layers, config.num_heads,
            config.d_ff, config.activation, config.dropout, config.memory_levels)
        self.mask_head = MaskHead(channels, config.d_model, config.mask_dim)
        self._feature_cache: FeatureCache | None = None  # set by image_feature_cache(), never saved
        if config.moe is not None:
            self._install_moe(config.moe)
        if config.concat_layers is not None:
            self._install_concat(config.concat_layers)

    @property
    def text_dim(self) -> int:
        return self.text_encoder.dim

    # -- forward -------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, concepts: Concepts = None) -> torch.Tensor:
        self._check_images(images)
        embeddings = self.encode_concepts(concepts, images.shape[0], images.device)
        features = self.encode_images(images)
        decoded, query = self.decoder(features, embeddings.to(features[-1].dtype))
        logits = self.mask_head(decoded, query, features, tuple(images.shape[-2:]))
        return logits.reshape(images.shape[0], embeddings.shape[1], *images.shape[-2:])

    def encode_images(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The image encoder's levels [B, c_i, h_i, w_i]; without autograd when nothing in the encoder
        trains (and images need no gradient), and then from the feature cache when one is active."""
        if needs_autograd(self.image_encoder, images):
            return self.image_encoder(images)
        if self._feature_cache is not None:
            return self._feature_cache.encode(self.image_encoder, images)
        with torch.no_grad():
            return self.image_encoder(images)

    @contextlib.contextmanager
    def image_feature_cache(self, cache: FeatureCache | None) -> Iterator[None]:
        """Within the block, frozen image features come from `cache` (None: no caching)."""
        previous, self._feature_cache = self._feature_cache, cache
        try:
            yield
        finally:
            self._feature_cache = previous

    @torch.no_grad()
    def predict_labels(self, images: torch.Tensor, concepts: Concepts = None, threshold: float = 0.5) -> torch.Tensor:
        """Label map [B, H, W] (long): 0 = background, i = concept i-1; argmax over the concepts'
        sigmoid probabilities, background where none exceeds `threshold`.  Runs in eval mode."""
        was_training = self.training
        self.eval()
        try:
            probs = self(images, concepts).sigmoid()
        finally:
            self.train(was_training)
        best, index = probs.max(dim=1)
        return torch.where(best > threshold, index + 1, torch.zeros_like(index))

    def encode_concepts(self, concepts: Concepts, batch: int, device: torch.device) -> torch.Tensor:
        """Concept strings or embeddings → [B, K, Dt]."""
        if concepts is None:
            if not self.config.concepts:
                raise ValueError("no concepts given and config.concepts is empty: pass a list of concept strings")
            concepts = self.config.concepts
        if isinstance(concepts, str):
            raise ValueError(f"concepts must be a list of strings, got the string {concepts!r} (wrap it in a list)")
        if isinstance(concepts, torch.Tensor):
            return self._check_embeddings(concepts, batch).to(device)
        concepts = list(concepts)
        if not concepts or not all(isinstance(c, str) for c in concepts):
            raise ValueError(f"concepts must be a non-empty list of strings or an embedding tensor, got {concepts!r}")
        return self.text_encoder(concepts, device).unsqueeze(0).expand(batch, -1, -1)

    def _check_embeddings(self, embeddings: torch.Tensor, batch: int) -> torch.Tensor:
        if embeddings.dim() not in (2, 3) or embeddings.shape[0] != batch or embeddings.shape[-1] != self.text_dim:
            raise ValueError(f"concept embeddings must be [B={batch}, {self.text_dim}] or [B={batch}, K, "
                             f"{self.text_dim}] (text_dim={self.text_dim}), got shape {tuple(embeddings.shape)}")
        return embeddings.unsqueeze(1) if embeddings.dim() == 2 else embeddings

    def _check_images(self, images: torch.Tensor) -> None:
        expected = self.config.in_channels
        if images.dim() != 4 or images.shape[1] != expected:
            raise ValueError(f"images must be [B, {expected}, H, W] (in_channels={expected}), got shape "
                             f"{tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")

    # -- adaptation ----------------------------------------------------------------------------------

    def upcycle(self, num_experts: int = 4, top_k: int = 2, rank: int = 8, **damoe_kwargs) -> "DASAM3":
        """Turn the decoder FFNs at `layers` (default: the hierarchical ones) into DA-MoE layers.

        damoe_kwargs: MoEConfig's fields (alpha, router, expert_type, use_context, adapt, backend, layers,
        context_pool).  The routers read a ConceptContext per layer (context_dim = d_model + text_dim)
        unless use_context is False.  The model's outputs are unchanged at initialisation.  Recorded in
        `config.moe`, so `from_pretrained` rebuilds the upcycled model.  Returns self.
        """
        if self.config.moe is not None:
            raise ValueError(f"the model is already upcycled (config.moe={self.config.moe})")
        moe = MoEConfig(num_experts=num_experts, top_k=top_k, rank=rank, **known_fields(MoEConfig, damoe_kwargs))
        self._install_moe(moe)
        self.config.moe = moe
        return self

    def add_concat_fusion(self, layers: str | Sequence[int] = "hierarchical") -> "DASAM3":
        """The "Concat" baseline: at `layers`, the FFN input becomes `Linear([h ; e_c])` (identity at
        initialisation, so the outputs are unchanged).  Recorded in `config.concat_layers`.  Returns self."""
        if self.config.concat_layers is not None:
            raise ValueError(f"concat fusion is already on at layers {self.config.concat_layers}")
        chosen = select_layers(self.config.num_layers, layers)
        self._install_concat(chosen)
        self.config.concat_layers = chosen
        return self

    def apply_variant(self, name: str, **overrides) -> "DASAM3":
        """One of the paper's variants by name (see VARIANTS), e.g. "wo-der"; overrides go to upcycle."""
        if name not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {name!r}")
        if VARIANTS[name] is None:
            return self.add_concat_fusion(**overrides)
        return self.upcycle(**{**VARIANTS[name], **overrides})

    def _install_moe(self, moe: MoEConfig) -> None:
        config = self.config
        for index in select_layers(config.num_layers, moe.layers):
            layer = self.decoder.layers[index]
            factory = factory_of(layer)
            context_dim = config.d_model + self.text_dim if moe.routes_on_context else 0
            layer.ffn = DAMoE.from_ffn(
                layer.ffn.fc1, layer.ffn.fc2, activation=config.activation, num_experts=moe.num_experts,
                top_k=moe.top_k, rank=moe.rank, alpha=moe.alpha, context_dim=context_dim, dropout=config.dropout,
                adapt=moe.adapt, router=moe.router, expert_type=moe.expert_type, backend=moe.backend)
            if context_dim:
                layer.concept_context = ConceptContext(config.d_model, self.text_dim, pool=tuple(moe.context_pool),
                                                       num_heads=config.num_heads, **factory)

    def _install_concat(self, layers: list[int]) -> None:
        for index in select_layers(self.config.num_layers, layers):
            layer = self.decoder.layers[index]
            layer.concept_concat = ConceptConcat(self.config.d_model, self.text_dim).to(**factory_of(layer))

    def trainable_parameters(self, stage: str) -> list[nn.Parameter]:
        """What `stage` trains: `dasam3.layers.trainable_parameters` (lora factors or experts, routers,
        contexts, LayerNorms in "warmup"; routers and contexts in "calibrate"; the Concat baseline's
        projections in both)."""
        return trainable_parameters(self, stage)

    def mark_trainable(self, stage: str) -> int:
        """Freeze all but `trainable_parameters(stage)`; return the trainable parameter count."""
        return mark_trainable(self, stage)

    # -- checkpoints ---------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write `config.json` and `model.safetensors` to `directory` (atomically, file by file).

        The checkpoint holds every weight except those of encoders loaded from a local pretrained
        directory (recorded in the config by path; no stage trains them, and a tensor of theirs that
        trains would be kept).  Existing checkpoint files are only replaced with overwrite=True.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        existing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if (directory / n).exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{directory} already holds {existing}; pass overwrite=True to replace them")
        directory.mkdir(parents=True, exist_ok=True)
        referenced = self._referenced_keys()
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k not in referenced}
        with atomic_output(directory / WEIGHTS_NAME) as temporary:
            save_file(state, str(temporary), metadata={"format": "pt"})
        write_text(directory / CONFIG_NAME, self.config.to_json())
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "DASAM3":
        """Rebuild a model saved by `save_pretrained` (in eval mode, on `map_location`)."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{directory} is not a DASAM3 checkpoint: {CONFIG_NAME} is missing")
        config = load_config(directory / CONFIG_NAME, DASAM3Config)
        check_weights_fit(lambda: cls(config), directory / WEIGHTS_NAME, directory / CONFIG_NAME)
        return cls(config).load_weights(directory).to(map_location).eval()

    def load_weights(self, directory: str | os.PathLike) -> "DASAM3":
        """Load `model.safetensors` from a checkpoint of this very architecture (same config); returns self."""
        path = Path(directory) / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{Path(directory)} is not a DASAM3 checkpoint: {WEIGHTS_NAME} is missing")
        check_weights_fit(lambda: self, path, Path(directory) / CONFIG_NAME)
        result = self.load_state_dict(load_safetensors(path), strict=False)
        missing = sorted(set(result.missing_keys) - self._referenced_keys())
        if missing or result.unexpected_keys:
            raise ValueError(f"checkpoint {Path(directory)} does not match the model: missing {missing}, "
                             f"unexpected {sorted(result.unexpected_keys)}")
        return self

    def _referenced_keys(self) -> set[str]:
        """State-dict keys of encoders whose weights load from a pretrained source, except trainable ones."""
        trainable = {id(p) for p in self.trainable_parameters("warmup")}
        keys = set()
        for prefix, encoder in (("image_encoder", self.image_encoder), ("text_encoder", self.text_encoder)):
            if encoder.pretrained_source is None:
                continue
            tensors = {**dict(encoder.named_parameters()), **dict(encoder.named_buffers())}
            keys |= {f"{prefix}.{name}" for name, t in tensors.items() if id(t) not in trainable}
        return keys

