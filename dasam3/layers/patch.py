"""Dropping the DA-MoE layer into other transformers: `patch_ffn` upcycles the FFNs of the blocks it knows.

The blocks and how each is patched are `layouts.py`'s (a registry users extend with
`register_ffn_layout`).  The block's activation is kept and its frozen weights become the layer's
`gate`/`fc1`/`fc2`, so every expert equals the FFN at initialisation; each patch is checked on a probe
input against the block, so a block whose forward is not its layout's FFN is refused rather than changed.

* FFN containers (timm `Mlp`/`SwiGLU`/`GluMlp`, segment-anything `MLPBlock`, transformers' LLaMA-style,
  Phi-3, T5, GPT-2, CLIP-style MLPs, torchvision's `MLPBlock`) are replaced in their parent.
* Layers that compute their FFN inline as `linear2(dropout(activation(linear1(x))))` (torch's
  `nn.TransformerEncoderLayer` / `nn.TransformerDecoderLayer`, the `sam3` package's encoder layer):
  `linear1` becomes the DA-MoE layer and `activation`, `dropout`, `linear2` identities.  Their fused
  inference fast path and the nested-tensor path of an enclosing `nn.TransformerEncoder` read
  `linear1.weight` directly and would bypass the experts, so both are switched off; padded positions
  still get what the nested path gives them.
* BERT/ViT-style layers (`intermediate.dense` then `output.dense` + residual + LayerNorm): `intermediate`
  becomes the DA-MoE layer and `output.dense` an identity, so the residual and the norm stay outside.

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
from .layouts import FFNLayout, match, resolve, supported_names

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
    """The name of DAMoE's activation that `fn` computes (one of `dasam3_kernels.ACTIVATIONS`).

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


# -- finding the FFN blocks -------------------------------------------------------------------------


@dataclass(frozen=True)
class FoundBlock:
    """An FFN block under the patched module: its qualified name, the module, its layout (None for a DA-MoE
    layer found in place of a container), and whether a DA-MoE layer already stands in for its FFN."""

    name: str
    block: nn.Module
    layout: FFNLayout | None
    patched: bool


def find_ffn_blocks(module: nn.Module) -> list[FoundBlock]:
    """The FFN blocks under `module` (itself included), outermost first, in module order."""
    found: list[FoundBlock] = []
    for name, sub in module.named_modules():
        if any(name.startswith(f"{f.name}.") or not f.name for f in found):
            continue
        if isinstance(sub, DAMoE):
            found.append(FoundBlock(name, sub, None, True))
            continue
        layout = match(sub)
        if layout is not None:
            replaced = resolve(sub, layout.replace) if layout.replace else None
            found.append(FoundBlock(name, sub, layout, isinstance(replaced, DAMoE)))
    return found


# -- patching ----------------------------------------------------------------------------------------

_TAKEN_FROM_BLOCK = ("d_model", "d_ff", "bias", "activation", "dropout", "context_dim", "gated")


def patch_ffn(module: nn.Module, layers: str | Sequence[int] | Sequence[str] | None = None, *,
              context: ContextSlot | None = None, **damoe_kwargs) -> list[str]:
    """Replace the FFNs of the supported blocks under `module` by upcycled DA-MoE layers, in place.

    layers: None or "all" (every block found), "hierarchical" (the paper's positions among the blocks
    found, in module order), 0-based indices into the blocks found, or the blocks' qualified names.
    context: a ContextSlot the routers read (context_dim = context.dim); None: token-only routers.
    damoe_kwargs: DAMoE's keywords (num_experts, top_k, rank, alpha, router, expert_type, adapt,
    backend); the dimensions, activation, gating and dropout come from the block.
    All or nothing: when a block cannot be patched nothing is changed.  Each new layer takes the training
    mode of the module it replaces.  Returns the qualified names of the new DA-MoE layers.
    """
    taken = sorted(set(damoe_kwargs) & set(_TAKEN_FROM_BLOCK))
    if taken:
        raise ValueError(f"patch_ffn takes {taken} from the patched block (context_dim from `context`), "
                         f"got them as keywords")
    blocks = find_ffn_blocks(module)
    if not blocks:
        raise ValueError(f"no supported FFN block found in {type(module).__name__} (supported: "
                         f"{', '.join(supported_names())}); for another block, register its layout with "
                         "dasam3.layers.register_ffn_layout(...) or upcycle it by hand with DAMoE.from_ffn")
    chosen = _chosen(blocks, layers)
    patched = [b.name or type(module).__name__ for b in chosen if b.patched]
    if patched:
        raise ValueError(f"{type(module).__name__} is already patched: {patched} hold DA-MoE layers "
                         "(patch_ffn patches a block once; patch a fresh copy of the model to change the layers)")
    requires_grad = {p: p.requires_grad for p in module.parameters()}
    try:
        plans = [_plan(module, found, context, damoe_kwargs) for found in chosen]
    except Exception:
        for param, flag in requires_grad.items():  # from_ffn froze the FFNs planned so far
            param.requires_grad_(flag)
        raise
    for plan in plans:  # nothing below can fail: the model changes only once every block is planned
        plan.apply()
    _keep_padding_as_nested(module)
    return [plan.name for plan in plans]


def _chosen(blocks: list[FoundBlock], layers) -> list[FoundBlock]:
    names = [b.name for b in blocks]
    if layers is not None and not isinstance(layers, str) and any(isinstance(i, str) for i in layers):
        unknown = [n for n in layers if n not in names]
        if unknown:
            raise ValueError(f"no supported FFN block named {unknown}; the blocks found are {names}")
        return [b for b in blocks if b.name in layers]
    return [blocks[i] for i in select_layers(len(blocks), layers)]


@dataclass
class _Plan:
    """The substitutions that patch one block: (parent module, attribute, new module) in order."""

    name: str
    block: nn.Module
    substitutions: list[tuple[nn.Module, str, nn.Module]]

    def apply(self) -> None:
        for parent, attr, new in self.substitutions:
            setattr(parent, attr, new)
        if hasattr(self.block, "activation_relu_or_gelu"):
            self.block.activation_relu_or_gelu = 0  # torch's fused fast path would use linear1/linear2 directly


def _plan(root: nn.Module, found: FoundBlock, context: ContextSlot | None, damoe_kwargs: dict) -> _Plan:
    name, block, layout = found.name, found.block, found.layout
    where = f"{name or type(root).__name__} ({type(block).__name__})"
    if layout.refusal is not None:
        raise ValueError(f"cannot patch {where}: " + layout.refusal.format(
            activation=_activation(block, layout, where), act_path=layout.activation))
    for path in layout.requires_identity:
        if not isinstance(resolve(block, path), nn.Identity):
            raise ValueError(f"cannot patch {where}: it normalises its hidden layer ({path}={resolve(block, path)!r}), "
                             "which DAMoE does not model")
    fc1, fc2, gate = _projections(block, layout, where)
    dropout = lambda path: resolve(block, path).p if path else 0.0  # noqa: E731
    batch_first = getattr(getattr(block, "self_attn", None), "batch_first", True)
    moe = PatchedFFN.from_ffn(
        fc1, fc2, _activation(block, layout, where), gate=gate, dropout=dropout(layout.hidden_dropout),
        output_dropout=dropout(layout.output_dropout), context_dim=context.dim if context is not None else 0,
        context_slot=context, batch_dim=0 if batch_first else 1, **damoe_kwargs,
    )
    replaced = resolve(block, layout.replace)
    moe.train(replaced.training)
    chain = [replaced, *(resolve(block, path) for path in layout.identities)]
    _check_same_function(where, chain, layout, moe)
    if layout.replace:
        substitutions = [(*_parent(block, layout.replace), moe)]
        new_name = f"{name}.{layout.replace}" if name else layout.replace
    elif name:
        substitutions = [(*_parent(root, name), moe)]
        new_name = name
    else:
        raise ValueError(f"patch_ffn replaces an FFN block in its parent; it was given the block itself "
                         f"({type(block).__name__}): pass the module that contains it")
    substitutions += [(*_parent(block, path), nn.Identity()) for path in layout.identities]
    return _Plan(new_name, block, substitutions)


def _parent(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, attr = path.rpartition(".")
    return resolve(module, parent), attr


def _activation(block: nn.Module, layout: FFNLayout, where: str) -> str:
    if layout.activation_name is not None:
        return layout.activation_name
    try:
        return identify_activation(resolve(block, layout.activation))
    except ValueError as error:
        raise ValueError(f"cannot patch {where}: {error}") from error


def _projections(block: nn.Module, layout: FFNLayout, where: str):
    """(fc1, fc2, gate) as nn.Linear: Conv1D transposed, a packed [gate; up] weight split into two views."""
    fc1, fc2 = (_as_linear(resolve(block, p), f"{where}.{p}") for p in (layout.fc1, layout.fc2))
    gate = _as_linear(resolve(block, layout.gate), f"{where}.{layout.gate}") if layout.gate else None
    if layout.packed is not None:
        first, second = _split_rows(fc1, f"{where}.{layout.fc1}")
        gate, fc1 = (first, second) if layout.packed == "gate_first" else (second, first)
    return fc1, fc2, gate


def _as_linear(module: nn.Module, where: str) -> nn.Linear:
    if isinstance(module, nn.Linear):
        return module
    if type(module).__name__ == "Conv1D" and module.weight.dim() == 2:  # transformers' GPT-2 layer: x W + b
        n_in, n_out = module.weight.shape
        linear = nn.Linear(n_in, n_out, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        return linear
    raise ValueError(f"cannot patch {where}: expected an nn.Linear (or a transformers Conv1D), "
                     f"got {type(module).__name__}")


def _split_rows(packed: nn.Linear, where: str) -> tuple[nn.Linear, nn.Linear]:
    """Two nn.Linear whose weights (and biases) are views of the halves of a packed [2F, D] weight."""
    rows = packed.out_features
    if rows % 2:
        raise ValueError(f"cannot patch {where}: a packed gate/up projection has an even number of outputs, "
                         f"got {rows}")
    halves = []
    for part in (slice(0, rows // 2), slice(rows // 2, rows)):
        linear = nn.Linear(packed.in_features, rows // 2, bias=packed.bias is not None, device="meta")
        linear.weight = nn.Parameter(packed.weight.detach()[part], requires_grad=False)
        if packed.bias is not None:
            linear.bias = nn.Parameter(packed.bias.detach()[part], requires_grad=False)
        halves.append(linear)
    return halves[0], halves[1]


def _check_same_function(where: str, chain: list, layout: FFNLayout, moe: PatchedFFN) -> None:
    """Refuse a block whose forward is not the layout's FFN: compare both on a probe input."""
    weight = moe.fc1.weight
    if weight.device.type == "meta":
        return
    probe = torch.randn(2, 3, moe.d_model, generator=torch.Generator().manual_seed(0)).to(weight)
    modules = [m for m in chain if isinstance(m, nn.Module)] + [moe]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            expected = probe
            for step in chain:
                expected = step(expected)
            context = None if moe.context_dim == 0 else torch.zeros(2, moe.context_dim).to(weight)
            got = DAMoE.forward(moe, probe, context)
    except Exception as error:  # noqa: BLE001 (a block that cannot run alone on a probe is not a container)
        raise ValueError(f"cannot patch {where}: calling it on a probe input failed ({error}); describe the block "
                         "with dasam3.layers.register_ffn_layout(...) or upcycle it by hand with DAMoE.from_ffn")
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    relative = 2e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-4  # SPEC's tolerances
    tolerance = relative * max(expected.abs().max().item(), 1.0)
    if expected.shape != got.shape or (expected - got).abs().max().item() > tolerance:
        raise ValueError(f"cannot patch {where}: its forward is not {layout.formula()} on a probe input, so "
                         "replacing it would change the model")


# -- nn.TransformerEncoder's padded positions -------------------------------------------------------------


def _keep_padding_as_nested(root: nn.Module) -> None:
    """Patched layers cannot take the nested-tensor path of an enclosing nn.TransformerEncoder (it reads
    linear1.weight and would bypass the experts), so it is switched off; a hook then gives padded positions
    what that path gives them (zeros, then the final norm) whenever the original would have taken it."""
    for encoder in root.modules():
        if not isinstance(encoder, nn.TransformerEncoder) or not encoder.use_nested_tensor:
            continue
        if any(isinstance(layer.linear1, PatchedFFN) for layer in encoder.layers):
            encoder.use_nested_tensor = False
            encoder.register_forward_hook(_padding_as_nested, with_kwargs=True)


def _padding_as_nested(encoder: nn.TransformerEncoder, args: tuple, kwargs: dict, output: torch.Tensor):
    src = args[0] if args else kwargs["src"]
    mask = args[1] if len(args) > 1 else kwargs.get("mask")
    padding = args[2] if len(args) > 2 else kwargs.get("src_key_padding_mask")
    if not _nested_path_would_run(encoder, src, mask, padding):
        return None
    padded = torch.nn.functional._canonical_mask(mask=padding, mask_name="src_key_padding_mask",
                                                 other_type=None, other_name="", target_type=src.dtype) != 0
    fill = output.new_zeros(output.shape[-1])
    if encoder.norm is not None:
        fill = encoder.norm(fill)
    return torch.where(padded[..., None], fill, output)


def _nested_path_would_run(encoder: nn.TransformerEncoder, src: torch.Tensor, mask, padding) -> bool:
    """torch's own test (nn.TransformerEncoder.forward) for converting to nested tensors, on the patched layers."""
    first = encoder.layers[0]
    if not torch.backends.mha.get_fastpath_enabled() or first.training or src.dim() != 3 or padding is None:
        return False
    if mask is not None or src.is_nested or torch.is_autocast_enabled() or src.device.type not in ("cpu", "cuda"):
        return False
    if getattr(encoder, "mask_check", True):
        if torch.compiler.is_compiling():
            return False
        keep = torch.nn.functional._canonical_mask(mask=padding, mask_name="src_key_padding_mask", other_type=None,
                                                   other_name="", target_type=src.dtype) == 0
        if not torch._nested_tensor_from_mask_left_aligned(src, keep):
            return False
    ffn = first.linear1
    tensors = (src, first.self_attn.in_proj_weight, first.self_attn.in_proj_bias, first.self_attn.out_proj.weight,
               first.self_attn.out_proj.bias, first.norm1.weight, first.norm1.bias, first.norm2.weight,
               first.norm2.bias, ffn.fc1.weight, ffn.fc1.bias, ffn.fc2.weight, ffn.fc2.bias)
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
