"""Training helpers: the auxiliary routing loss, the paper's trainable sets, parameter accounting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .context import ConceptConcat, ConceptContext
from .damoe import DAMoE, Router

STAGES = ("warmup", "calibrate")


def damoe_layers(model: nn.Module) -> list[DAMoE]:
    return [m for m in model.modules() if isinstance(m, DAMoE)]


def aux_loss(model: nn.Module, balance: float = 0.01, sparse: float = 0.001) -> torch.Tensor:
    """Σ over the DA-MoE layers that ran in training mode of `balance·L_balance + sparse·L_sparse`.

    A 0-dim zero tensor when none ran.
    """
    terms = [balance * m.aux["balance"] + sparse * m.aux["sparse"] for m in damoe_layers(model) if m.aux]
    if terms:
        return torch.stack(terms).sum()
    param = next(model.parameters(), None)
    return torch.zeros((), device=None if param is None else param.device)


FUSION_MARK = "dasam3_fusion_module"  # a module with this attribute True is a fusion module (see fusion_modules)


def _is_layer_norm(module: nn.Module) -> bool:
    # nn.LayerNorm and the LayerNorm variants of transformers, timm and segment-anything (LayerNorm2d)
    return isinstance(module, nn.LayerNorm) or "LayerNorm" in type(module).__name__


def mark_fusion_module(module: nn.Module) -> nn.Module:
    """Declare `module` a fusion module: "warmup" trains its LayerNorms (and no other model's).  Returns it.

    `adapt_sam3` marks SAM3's fusion encoder; DASAM3's fusion decoder is marked by its class.
    """
    setattr(module, FUSION_MARK, True)
    return module


def fusion_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose LayerNorms "warmup" trains: the marked fusion modules (DASAM3's fusion decoder, an
    adapted SAM3's fusion encoder); in a model without one, the blocks holding DA-MoE layers (each DAMoE
    layer's parent module: the transformer layer or block whose FFN it replaced)."""
    marked = [m for m in model.modules() if getattr(m, FUSION_MARK, False) is True]
    if marked:
        return marked
    named = dict(model.named_modules())
    parents = {name.rpartition(".")[0] for name, m in named.items() if isinstance(m, DAMoE)}  # a root DAMoE: itself
    return [named[name] for name in sorted(parents)]


def needs_autograd(module: nn.Module, *inputs) -> bool:
    """Whether autograd must record a call of `module` on `inputs`: grad mode is on and a parameter of the
    module trains or an input tensor requires grad.  A frozen tower run with this False keeps no
    activations and no backward enters it; its outputs are the same."""
    if not torch.is_grad_enabled():
        return False
    return any(p.requires_grad for p in module.parameters()) or \
        any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs)


class FrozenTowerHooks:
    """Forward hooks that run a module without autograd whenever `needs_autograd` says it may (for towers
    called inside a model's own forward, e.g. Sam3Model's vision and text encoders)."""

    def __init__(self):
        self._modes: list[bool] = []

    def attach(self, module: nn.Module) -> None:
        module.register_forward_pre_hook(self.before, with_kwargs=True)
        # prepended: hooks attached later restore first, so nested attachments unwind in order
        module.register_forward_hook(self.after, always_call=True, prepend=True)

    def before(self, module, args, kwargs):
        self._modes.append(torch.is_grad_enabled())
        torch.set_grad_enabled(needs_autograd(module, *args, *kwargs.values()))

    def after(self, module, args, output):
        torch.set_grad_enabled(self._modes.pop())


def other_adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of other libraries' adapters, whose trainability `mark_trainable` leaves alone.

    PEFT's tuner layers (LoRA, ...) list their adapter sub-modules in `adapter_layer_names`; their
    frozen base layers are not adapters and are frozen like the rest of the model.
    """
    params: list[nn.Parameter] = []
    for module in model.modules():
        for name in getattr(module, "adapter_layer_names", ()) or ():
            adapter = getattr(module, name, None)
            if isinstance(adapter, (nn.Module, nn.ParameterDict)):
                params += adapter.parameters()
    return params


def trainable_parameters(model: nn.Module, stage: str) -> list[nn.Parameter]:
    """The parameters the paper trains in `stage` (see `mark_trainable`)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    params: list[nn.Parameter] = []
    concat: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, (Router, ConceptContext)):
            params += module.parameters()
        elif isinstance(module, ConceptConcat):
            concat += module.parameters()
        elif stage == "warmup" and isinstance(module, DAMoE):
            params += module.expert_parameters()
    if stage == "warmup":
        params += [p for fusion in fusion_modules(model) for m in fusion.modules() if _is_layer_norm(m)
                   for p in m.parameters(recurse=False)]
    # The Concat projections come last: this order fixes the optimizer state's indices and the grad-norm sum.
    return list({id(p): p for p in params + concat}.values())


def freeze_all_but(model: nn.Module, params: Iterable[nn.Parameter], *,
                   leave: Iterable[nn.Parameter] = ()) -> int:
    """Set requires_grad on exactly those of the model's parameters that are in `params`, clear it on the
    rest but `leave` (untouched); return the trainable parameter count (elements, each shared parameter once)."""
    keep = {id(p) for p in params}
    untouched = {id(p) for p in leave} - keep
    for param in model.parameters():
        if id(param) not in untouched:
            param.requires_grad_(id(param) in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def mark_trainable(model: nn.Module, stage: str) -> int:
    """Freeze everything but what the paper trains in `stage`; return the trainable parameter count.

    "warmup": the lora factors (or full experts), the routers, the ConceptContext modules and the
    LayerNorm parameters of the fusion module only (`fusion_modules`: DASAM3's fusion decoder, an adapted
    SAM3's fusion encoder, else the blocks holding DA-MoE layers): the image and text encoders stay
    entirely frozen.  "calibrate": the routers and the ConceptContext modules only.  In both, the
    "Concat" baseline's ConceptConcat projections (its analogue of the routers).  Other adapters'
    parameters (PEFT's LoRA factors) keep their requires_grad, so DA-MoE and PEFT train side by side.
    """
    return freeze_all_but(model, trainable_parameters(model, stage), leave=other_adapter_parameters(model))


@dataclass(frozen=True)
class ParamReport:
    """Parameter accounting of a model with DA-MoE layers."""

    trainable: int
    frozen: int
    damoe_layers: int
    damoe_added: int  # what the DA-MoE layers add to the FFNs they wrap (experts + routers)
    full_experts_added: int  # what E full experts per layer (plus the same routers) would add

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    @property
    def reduction(self) -> float:
        """1 − damoe_added / full_experts_added (the paper claims > 80 %)."""
        return 1.0 - self.damoe_added / self.full_experts_added if self.full_experts_added else 0.0

    def table(self) -> str:
        rows = [
            ("trainable parameters", f"{self.trainable:,}"),
            ("frozen parameters", f"{self.frozen:,}"),
            ("DA-MoE layers", f"{self.damoe_layers}"),
            ("added by DA-MoE (experts + routers)", f"{self.damoe_added:,}"),
            ("added by E full experts per layer", f"{self.full_experts_added:,}"),
            ("reduction", f"{100 * self.reduction:.2f} %"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value:>14}" for name, value in rows)

    def __str__(self) -> str:
        return self.table()


def param_report(model: nn.Module) -> ParamReport:
    """Trainable and frozen counts, and the DA-MoE layers' cost against full experts."""
    layers = damoe_layers(model)
    added = full = 0
    for layer in layers:
        router = sum(p.numel() for p in layer.router.parameters())
        ffn = sum(p.numel() for name in layer.projections for p in getattr(layer, name).parameters())
        added += router + sum(p.numel() for p in layer.expert_parameters())
        full += router + layer.num_experts * ffn
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    frozen = sum(p.numel() for p in unique if not p.requires_grad)
    return ParamReport(trainable, frozen, len(layers), added, full)
