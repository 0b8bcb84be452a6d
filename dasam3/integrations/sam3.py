"""DA-SAM3 on SAM3 itself: upcycle the FFNs of SAM3's text-image fusion encoder into DA-MoE layers.

Two implementations of SAM3 are supported, without importing either here:

* transformers' `Sam3Model` (or its `Sam3DetrEncoder`): the DETR encoder layers' `mlp` (`fc1`/`fc2`, ReLU);
* Meta's `sam3` package: `TransformerEncoderFusion` (found anywhere inside the given model), whose
  `TransformerEncoderLayer`s compute `linear2(dropout(activation(linear1(x))))`.

How the routers get their concept context: every adapted layer owns a `ConceptContext` and a forward
pre-hook that computes `context = ConceptContext(e_c, V)` from that layer call's own inputs, V being the
image tokens entering the layer (as a [B, H, W, D] grid) and e_c the masked mean of the prompt tokens it
cross-attends to; a forward hook clears it when the layer returns.  So a context never outlives its
call, and activation checkpointing (which Meta's encoder uses in training) recomputes the same one.  The
grid sizes (and, for transformers, the prompt's padding mask, which its layers only see as an attention
bias) are read by a pre-hook on the fusion encoder.

Training scope (SPEC section 3): the fusion encoder is marked as the fusion module, so
`mark_trainable(model, "warmup")` trains its LayerNorms and no encoder tower's.  A tower in which nothing
requires grad builds no autograd graph (no activation of its kept, no backward into it); hooks on the
image and text towers (transformers' `vision_encoder`/`text_encoder`, Meta's `backbone.vision_backbone`/
`backbone.language_backbone`) also run them under `no_grad` while nothing in them trains (Meta's
backbone calls its towers' `forward` directly, past the hooks: there the frozen parameters alone do it).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from dasam3._common import factory_of, masked_mean
from dasam3.layers.context import ConceptContext
from dasam3.layers.damoe import DAMoE, resolve_use_context
from dasam3.layers.patch import ContextSlot, patch_ffn, select_layers
from dasam3.layers.training import FrozenTowerHooks, mark_fusion_module

# The frozen towers of the two implementations, by attribute path from the model.
_TOWERS = ("vision_encoder", "text_encoder", "backbone.vision_backbone", "backbone.language_backbone")


def adapt_sam3(model: nn.Module, num_experts: int = 4, top_k: int = 2, rank: int = 8,
               layers: str | Sequence[int] = "hierarchical", *, use_context: bool | None = None,
               context_pool: tuple[int, int] = (4, 4), **damoe_kwargs) -> nn.Module:
    """Replace the fusion-encoder FFNs of a SAM3 model at `layers` by upcycled DA-MoE layers, in place.

    model: transformers' `Sam3Model` or `Sam3DetrEncoder`, or a model of Meta's `sam3` package holding a
    `TransformerEncoderFusion` (or that encoder itself).  layers: "hierarchical" (1-based
    {ceil(L/6), ceil(L/4), ceil(L/2)}: the first three of SAM3's six), "all", or 0-based indices.
    use_context: whether the routers see the concept context (default: yes for router="learned", no for
    router="random", which ignores it).  damoe_kwargs: alpha, router, expert_type, adapt, backend.
    At initialisation the model computes exactly what it computed before.  The fusion encoder becomes the
    model's fusion module (`mark_trainable`) and the towers run without autograd while frozen.  Returns `model`.
    """
    fusion = _find_fusion_encoder(model)
    use_context = resolve_use_context(use_context, damoe_kwargs.get("router", "learned"))
    already = [i for i, layer in enumerate(fusion.layers) if any(isinstance(m, DAMoE) for m in layer.modules())]
    if already:
        raise ValueError(f"the fusion encoder's layers {already} already hold DA-MoE layers: adapt a fresh model")
    for index in select_layers(len(fusion.layers), layers):
        layer = fusion.layers[index]
        slot = ContextSlot(2 * fusion.d_model) if use_context else None
        patch_ffn(layer, context=slot, num_experts=num_experts, top_k=top_k, rank=rank, **damoe_kwargs)
        if slot is not None:
            layer.concept_context = ConceptContext(fusion.d_model, fusion.d_model, pool=context_pool,
                                                   num_heads=fusion.num_heads, **factory_of(layer))
            feed = _ContextFeed(fusion.watch, fusion.read_layer_call, slot)
            layer.register_forward_pre_hook(feed.before, with_kwargs=True)
            layer.register_forward_hook(feed.after, always_call=True)
    if use_context:
        fusion.encoder.register_forward_pre_hook(fusion.watch.before, with_kwargs=True)
        fusion.encoder.register_forward_hook(fusion.watch.after, always_call=True)
    mark_fusion_module(fusion.encoder)
    for tower in _towers(model):
        FrozenTowerHooks().attach(tower)
    return model


def _towers(model: nn.Module) -> list[nn.Module]:
    """The image and text towers of a SAM3 model (none when given the fusion encoder alone)."""
    towers = []
    for path in _TOWERS:
        try:
            towers.append(model.get_submodule(path))
        except AttributeError:
            continue
    return towers


# -- the two SAM3 implementations ----------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The arguments of a module call by parameter name (the forward's signature is looked up once per class)."""
    if "forward" in vars(module):  # a forward set on the instance: its own signature
        return inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    return _forward_signature(type(module)).bind_partial(module, *args, **kwargs).arguments


@dataclass
class _EncoderWatch:
    """The fusion encoder's call in progress: its feature grids (by token count) and prompt mask.

    read_call(encoder, args, kwargs) -> (grid sizes [(H, W), ...], prompt validity [B, S] bool or None).
    The grids are kept by token count (a checkpointed layer recomputes after the encoder returned);
    the prompt mask only while the encoder runs.
    """

    read_call: Callable
    grids: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    prompt_valid: torch.Tensor | None = None

    def before(self, encoder, args, kwargs):
        sizes, self.prompt_valid = self.read_call(encoder, args, kwargs)
        self.grids[sum(h * w for h, w in sizes)] = sizes

    def after(self, encoder, args, output):
        self.prompt_valid = None

    def grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, D] → the first feature level's tokens as [B, H, W, D]."""
        sizes = self.grids.get(tokens.shape[1])
        if sizes is None:
            raise RuntimeError(f"no feature grid of {tokens.shape[1]} tokens was seen by the fusion encoder: run "
                               "the model (or its fusion encoder), not an adapted layer alone")
        height, width = sizes[0]
        return tokens[:, :height * width].reshape(tokens.shape[0], height, width, tokens.shape[2])


@dataclass
class _ContextFeed:
    """Per adapted layer: computes the router context from the layer call's inputs, for that call only."""

    watch: _EncoderWatch
    read_layer_call: Callable
    slot: ContextSlot

    def before(self, layer, args, kwargs):
        tokens, prompt, valid = self.read_layer_call(layer, args, kwargs, self.watch)
        if prompt.shape[0] not in (1, tokens.shape[0]):
            raise ValueError(f"the prompt has batch size {prompt.shape[0]} but the image tokens have "
                             f"{tokens.shape[0]}")
        concept = masked_mean(prompt, valid).expand(tokens.shape[0], -1)
        self.slot.set(layer.concept_context(concept, self.watch.grid(tokens)))

    def after(self, layer, args, output):
        self.slot.clear()


def _hf_encoder_call(encoder, args, kwargs):
    call = _bind(encoder, args, kwargs)
    spatial = call.get("spatial_sizes")
    features = call["vision_features"]
    sizes = [tuple(s) for s in spatial] if spatial is not None else [tuple(f.shape[-2:]) for f in features]
    text_mask = call.get("text_mask")
    return [(int(h), int(w)) for h, w in sizes], None if text_mask is None else text_mask.bool()


def _hf_layer_call(layer, args, kwargs, watch: _EncoderWatch):
    call = _bind(layer, args, kwargs)
    return call["vision_feats"], call["prompt_feats"], watch.prompt_valid


def _meta_encoder_call(encoder, args, kwargs):
    call = _bind(encoder, args, kwargs)
    sizes = call.get("feat_sizes") or [tuple(x.shape[-2:]) for x in call["src"]]
    return [(int(h), int(w)) for h, w in sizes], None


def _meta_layer_call(layer, args, kwargs, watch: _EncoderWatch):
    call = _bind(layer, args, kwargs)
    padding = call.get("memory_key_padding_mask")  # True = padding
    return call["tgt"], call["memory"], None if padding is None else ~padding.bool()


@dataclass
class _FusionEncoder:
    encoder: nn.Module
    layers: nn.ModuleList
    d_model: int
    num_heads: int
    read_layer_call: Callable
    watch: _EncoderWatch


def _find_fusion_encoder(model: nn.Module) -> _FusionEncoder:
    detr = getattr(model, "detr_encoder", model)
    if type(detr).__name__ == "Sam3DetrEncoder":
        config = detr.config
        return _FusionEncoder(detr, detr.layers, config.hidden_size, config.num_attention_heads, _hf_layer_call,
                              _EncoderWatch(_hf_encoder_call))
    meta = next((m for m in model.modules() if type(m).__name__ == "TransformerEncoderFusion"
                 and type(m).__module__.startswith("sam3.")), None)
    if meta is not None:
        first = meta.layers[0]
        return _FusionEncoder(meta, meta.layers, first.d_model, first.self_attn.num_heads, _meta_layer_call,
                              _EncoderWatch(_meta_encoder_call))
    raise TypeError(f"adapt_sam3 expects transformers' Sam3Model / Sam3DetrEncoder or a model of the sam3 "
                    f"package holding a TransformerEncoderFusion, got {type(model).__name__}")
