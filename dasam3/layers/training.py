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


def _is_layer_norm(module: nn.Module) -> bool:
    # nn.LayerNorm and the LayerNorm variants of transformers, timm and segment-anything (LayerNorm2d)
    return isinstance(module, nn.LayerNorm) or "LayerNorm" in type(module).__name__


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
        elif stage == "warmup" and _is_layer_norm(module):
            params += module.parameters(recurse=False)
    # The Concat projections come last: this order fixes the optimizer state's indices and the grad-norm sum.
    return list({id(p): p for p in params + concat}.values())


def freeze_all_but(model: nn.Module, params: Iterable[nn.Parameter]) -> int:
    """Set requires_grad on exactly those of the model's parameters that are in `params`, clear it on the
    rest; return the trainable parameter count (elements, each shared parameter once)."""
    keep = {id(p) for p in params}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def mark_trainable(model: nn.Module, stage: str) -> int:
    """Freeze everything but what the paper trains in `stage`; return the trainable parameter count.

    "warmup": the lora factors (or full experts), the routers, the ConceptContext modules and the
    LayerNorm parameters.  "calibrate": the routers and the ConceptContext modules only.  In both, the
    "Concat" baseline's ConceptConcat projections (its analogue of the routers).
    """
    return freeze_all_but(model, trainable_parameters(model, stage))


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
        ffn = sum(p.numel() for p in (*layer.fc1.parameters(), *layer.fc2.parameters()))
        added += router + sum(p.numel() for p in layer.expert_parameters())
        full += router + layer.num_experts * ffn
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    frozen = sum(p.numel() for p in unique if not p.requires_grad)
    return ParamReport(trainable, frozen, len(layers), added, full)
