"""Dropping the DA-MoE layer into other transformers: `patch_ffn` upcycles the FFNs of common blocks.

Supported blocks, and how each is patched (the block's activation is kept; its frozen weights are the
layer's `fc1`/`fc2`, so every expert equals the FFN at initialisation):

* FFN containers, replaced in their parent by the DA-MoE layer: timm's `Mlp` (fc1/act/drop1/fc2/drop2),
  segment-anything's `MLPBlock` (lin1/act/lin2) and Hugging Face style MLPs (`fc1`/`fc2` with an
  `activation_fn`/`act_fn`/`act`/`activation` and an optional hidden `dropout`).  The replacement is
  checked on a probe input against the block it replaces, so a container whose forward is not
  `fc2(act(fc1(x)))` is refused rather than silently changed.
* Layers that compute their FFN inline as `linear2(dropout(activation(linear1(x))))`: torch's
  `nn.TransformerEncoderLayer` / `nn.TransformerDecoderLayer` and the `sam3` package's encoder
  `TransformerEncoderLayer`.  `linear1` becomes the DA-MoE layer (holding the original `linear1` and
  `linear2` as its `fc1`/`fc2`); `activation`, `dropout` and `linear2` become identities.  The fused
  inference fast path of `nn.TransformerEncoderLayer` (and the nested-tensor path of an enclosing
  `nn.TransformerEncoder`) read `linear1.weight` directly and would bypass the experts, so both are
  switched off on patched layers.

These blocks have no concept context of their own: their routers see the token alone, unless a
`ContextSlot` is given, which the caller fills (`with slot.provide(context): model(x)`) or a hook does.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from dasam3_kernels.activations import ACTIVATIONS, activation_fn

from .damoe import DAMoE

_PROBE = torch.linspace(-6.0, 6.0, 481)


def hierarchical_layers(num_layers: int) -> list[int]:
    """The paper's DA-MoE positions as 0-based indices: 1-based {ceil(L/6), ceil(L/4), ceil(L/2)}.

    L = 6 → [0, 1, 2]; L = 12 → [1, 2, 5].
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return sorted({math.ceil(num_layers / d) - 1 for d in (6, 4, 2)})


def select_layers(num_layers: int, layers: str | Sequence[int] | None) -> list[int]:
    """0-based layer indices from None/"all" (every layer), "hierarchical", or explicit 0-based indices."""
    if layers is None or layers == "all":
        return list(range(num_layers))
    if layers == "hierarchical":
        return hierarchical_layers(num_layers)
    if isinstance(layers, str) or not all(isinstance(i, int) for i in layers):
        raise ValueError(f"layers must be None, 'all', 'hierarchical' or a list of 0-based ints, got {layers!r}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer indices must be in [0, {num_layers - 1}] (0-based), got {bad}")
    return sorted(set(layers))


def identify_activation(fn: Callable[[torch.Tensor], torch.Tensor]) -> str:
    """The name of DAMoE's activation that `fn` computes ("gelu", "gelu_tanh", "relu" or "silu").

    Identified numerically on a probe, so any library's module or function for these works
    (nn.GELU, F.relu, transformers' GELUActivation, timm's GELU, ...).
    """
    if isinstance(fn, nn.Module) and any(True for _ in fn.parameters()):
        raise ValueError(f"unsupported activation {fn!r}: it has parameters; DAMoE supports {ACTIVATIONS}")
    try:
        out = fn(_PROBE.clone())
    except Exception as error:  # noqa: BLE001 (any failure means: not an elementwise activation we know)
        raise ValueError(f"unsupported activation {fn!r}: calling it on a probe failed ({error})") from error
    for name in ACTIVATIONS:
        if torch.allclose(out, activation_fn(name)(_PROBE), rtol=0, atol=1e-6):
            return name
    raise ValueError(f"unsupported activation {fn!r}: DAMoE supports {ACTIVATIONS}")


class ContextSlot:
    """The router context of the forward in progress, read by the `PatchedFFN` layers that share it.

    `set(context)` / `clear()`, or `with slot.provide(context): ...`.  context: [B, dim].
    Reading an empty slot raises, so a layer never routes on a context left from an earlier forward.
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"context dim must be >= 1, got {dim}")
        self.dim = dim
        self._context: torch.Tensor | None = None

    def set(self, context: torch.Tensor) -> None:
        if context.dim() != 2 or context.shape[1] != self.dim:
            raise ValueError(f"context must be [B, {self.dim}], got shape {tuple(context.shape)}")
        self._context = context

    def clear(self) -> None:
        self._context = None

    @property
    def is_set(self) -> bool:
        return self._context is not None

    @contextlib.contextmanager
    def provide(self, context: torch.Tensor) -> Iterator[None]:
        self.set(context)
        try:
            yield
        finally:
            self.clear()

    def read(self, x: torch.Tensor, batch_dim: int) -> torch.Tensor:
        """The context laid out for DAMoE: [B, dim] for batch-first x, one row per token otherwise."""
        if self._context is None:
            raise RuntimeError(
                "no router context: this DA-MoE layer reads its context from a ContextSlot that is empty; "
                "run the model through the call that fills it (or `with slot.provide(context): ...`)"
            )
        context = self._context
        if x.dim() < 3:  # an unbatched sequence [S, D]: one sample
            batch, tokens = 1, x.shape[0]
        else:
            batch, tokens = x.shape[batch_dim], x.shape[0]
        if context.shape[0] != batch:
            raise ValueError(
                f"the router context has {context.shape[0]} rows but the layer's input (shape {tuple(x.shape)}) "
                f"holds batch size {batch}"
            )
        if x.dim() < 3:
            return context.expand(tokens, -1)
        if batch_dim == 1:  # sequence-first [S, B, D]: token s·B + b belongs to sample b
            return context.repeat(tokens, 1)
        return context


class PatchedFFN(DAMoE):
    """A DA-MoE layer standing in for a block's FFN: called as the block calls its FFN, `ffn(x)`.

    It reads its router context from `context_slot` when it has one (context_dim = slot.dim), and
    applies the block's output dropout (timm's `drop2`) when the FFN it replaces had one.
    batch_dim: where x keeps the batch (0 for [B, ..., D], 1 for sequence-first [S, B, D]).
    """

    def __init__(self, *args, context_slot: ContextSlot | None = None, batch_dim: int = 0,
                 output_dropout: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if (context_slot is not None) != (self.context_dim > 0):
            raise ValueError(f"a context slot needs context_dim > 0 and vice versa, got context_dim="
                             f"{self.context_dim} and context_slot={context_slot!r}")
        self.context_slot = context_slot
        self.batch_dim = batch_dim
        self.output_dropout = nn.Dropout(output_dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None and self.context_slot is not None:
            context = self.context_slot.read(x, self.batch_dim)
        return self.output_dropout(super().forward(x, context))


# -- block layouts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where a block keeps its FFN.  inline: the FFN is computed inside a larger layer's forward."""

    fc1: str
    fc2: str
    activation: str
    hidden_dropout: str | None = None
    output_dropout: str | None = None
    inline: bool = False


_TORCH_LAYER = _Layout("linear1", "linear2", "activation", "dropout", inline=True)
_TIMM_MLP = _Layout("fc1", "fc2", "act", "drop1", "drop2")
_SAM_MLP = _Layout("lin1", "lin2", "act")
_HF_ACTIVATIONS = ("activation_fn", "act_fn", "act", "activation")


def _linear(module: nn.Module, name: str) -> bool:
    return isinstance(getattr(module, name, None), nn.Linear)


def _is_sam3_package_encoder_layer(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__ == "sam3.model.encoder" and cls.__name__ == "TransformerEncoderLayer"


def _layout(module: nn.Module) -> _Layout | None:
    """The FFN layout of `module`, or None if it is not an FFN block this helper knows."""
    if isinstance(module, DAMoE):
        return None
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) \
            or _is_sam3_package_encoder_layer(module):
        return _TORCH_LAYER
    if _linear(module, "lin1") and _linear(module, "lin2") and callable(getattr(module, "act", None)):
        return _SAM_MLP
    if not (_linear(module, "fc1") and _linear(module, "fc2")):
        return None
    if all(hasattr(module, n) for n in ("act", "drop1", "norm", "drop2")):
        if not isinstance(module.norm, nn.Identity):
            raise ValueError(f"cannot patch {type(module).__name__}: it normalises its hidden layer "
                             f"(norm={module.norm!r}), which DAMoE does not model")
        return _TIMM_MLP
    act = next((n for n in _HF_ACTIVATIONS if callable(getattr(module, n, None))), None)
    if act is None:
        return None
    dropout = "dropout" if isinstance(getattr(module, "dropout", None), nn.Dropout) else None
    return _Layout("fc1", "fc2", act, dropout)


def find_ffn_blocks(module: nn.Module) -> list[tuple[str, nn.Module, _Layout]]:
    """The supported FFN blocks under `module` (itself included), outermost first, in module order."""
    found: list[tuple[str, nn.Module, _Layout]] = []
    inside: list[str] = []
    for name, sub in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        layout = _layout(sub)
        if layout is not None:
            found.append((name, sub, layout))
            inside.append(name)
    return found


# -- patching ----------------------------------------------------------------------------------------

_TAKEN_FROM_BLOCK = ("d_model", "d_ff", "bias", "activation", "dropout", "context_dim")


def patch_ffn(module: nn.Module, layers: str | Sequence[int] | Sequence[str] | None = None, *,
              context: ContextSlot | None = None, **damoe_kwargs) -> list[str]:
    """Replace the FFNs of the supported blocks under `module` by upcycled DA-MoE layers, in place.

    layers: None or "all" (every block found), "hierarchical" (the paper's positions among the blocks
    found, in module order), 0-based indices into the blocks found, or the blocks' qualified names.
    context: a ContextSlot the routers read (context_dim = context.dim); None: token-only routers.
    damoe_kwargs: DAMoE's keywords (num_experts, top_k, rank, alpha, router, expert_type, adapt,
    backend); the dimensions, activation and dropout come from the block.
    Returns the qualified names of the new DA-MoE layers (`module.get_submodule(name)` gives each).
    """
    taken = sorted(set(damoe_kwargs) & set(_TAKEN_FROM_BLOCK))
    if taken:
        raise ValueError(f"patch_ffn takes {taken} from the patched block (context_dim from `context`), "
                         f"got them as keywords")
    blocks = find_ffn_blocks(module)
    if not blocks:
        raise ValueError(f"no supported FFN block found in {type(module).__name__} (supported: "
                         "nn.TransformerEncoderLayer/DecoderLayer, timm Mlp, segment-anything MLPBlock, "
                         "fc1/fc2 MLPs, the sam3 package's TransformerEncoderLayer)")
    patched = []
    for name, block, layout in _chosen(blocks, layers):
        patched.append(_patch_block(module, name, block, layout, context, damoe_kwargs))
    _disable_nested_tensor_paths(module)
    return patched


def _chosen(blocks, layers):
    names = [name for name, _, _ in blocks]
    if layers is not None and not isinstance(layers, str) and any(isinstance(i, str) for i in layers):
        unknown = [n for n in layers if n not in names]
        if unknown:
            raise ValueError(f"no supported FFN block named {unknown}; the blocks found are {names}")
        return [b for b in blocks if b[0] in layers]
    return [blocks[i] for i in select_layers(len(blocks), layers)]


def _patch_block(root: nn.Module, name: str, block: nn.Module, layout: _Layout, context: ContextSlot | None,
                 damoe_kwargs: dict) -> str:
    fc1, fc2 = getattr(block, layout.fc1), getattr(block, layout.fc2)
    dropout = getattr(block, layout.hidden_dropout).p if layout.hidden_dropout else 0.0
    out_dropout = getattr(block, layout.output_dropout).p if layout.output_dropout else 0.0
    batch_first = getattr(getattr(block, "self_attn", None), "batch_first", True)
    moe = PatchedFFN.from_ffn(
        fc1, fc2, identify_activation(getattr(block, layout.activation)), dropout=dropout,
        output_dropout=out_dropout, context_dim=context.dim if context is not None else 0, context_slot=context,
        batch_dim=0 if batch_first else 1, **damoe_kwargs,
    )
    if layout.inline:
        _substitute_inline(block, moe)
        return f"{name}.linear1" if name else "linear1"
    if not name:
        raise ValueError(f"patch_ffn replaces an FFN block in its parent; it was given the block itself "
                         f"({type(block).__name__}): pass the module that contains it")
    _check_same_function(name, block, layout, moe)
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name), attr, moe)
    return name


def _substitute_inline(layer: nn.Module, moe: PatchedFFN) -> None:
    """`linear2(dropout(activation(linear1(x))))` with linear1 = the DA-MoE layer and the rest identities."""
    layer.linear1 = moe
    layer.linear2 = nn.Identity()
    layer.activation = nn.Identity()
    layer.dropout = nn.Identity()
    if hasattr(layer, "activation_relu_or_gelu"):
        layer.activation_relu_or_gelu = 0  # the fused fast path would use linear1/linear2 weights directly


def _disable_nested_tensor_paths(root: nn.Module) -> None:
    for encoder in root.modules():
        if isinstance(encoder, nn.TransformerEncoder) and any(isinstance(layer.linear1, PatchedFFN)
                                                              for layer in encoder.layers):
            encoder.use_nested_tensor = False


def _check_same_function(name: str, block: nn.Module, layout: _Layout, moe: PatchedFFN) -> None:
    """Refuse a container whose forward is not fc2(act(fc1(x))): compare both on a probe input."""
    weight = moe.fc1.weight
    if weight.device.type == "meta":
        return
    probe = torch.randn(2, 3, moe.d_model, generator=torch.Generator().manual_seed(0)).to(weight)
    modes = block.training, moe.training
    block.eval()
    moe.eval()
    try:
        with torch.no_grad():
            expected = block(probe)
            context = None if moe.context_dim == 0 else torch.zeros(2, moe.context_dim).to(weight)
            got = DAMoE.forward(moe, probe, context)
    finally:
        block.train(modes[0])
        moe.train(modes[1])
    relative = 2e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-4  # SPEC's tolerances
    tolerance = relative * max(expected.abs().max().item(), 1.0)
    if expected.shape != got.shape or (expected - got).abs().max().item() > tolerance:
        raise ValueError(f"cannot patch {name} ({type(block).__name__}): its forward is not "
                         f"{layout.fc2}({layout.activation}({layout.fc1}(x))) on a probe input, so replacing it "
                         "would change the model")
