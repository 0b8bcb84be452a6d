"""The DA-MoE layer and its companions: `from dasam3.layers import DAMoE`."""

from .context import ConceptConcat, ConceptContext
from .damoe import DAMoE, RandomRouter, Router
from .patch import ContextSlot, PatchedFFN, hierarchical_layers, patch_ffn
from .training import (ParamReport, aux_loss, damoe_layers, freeze_all_but, mark_trainable, param_report,
                       trainable_parameters)

__all__ = [
    "ConceptConcat",
    "ConceptContext",
    "ContextSlot",
    "DAMoE",
    "ParamReport",
    "PatchedFFN",
    "RandomRouter",
    "Router",
    "aux_loss",
    "damoe_layers",
    "freeze_all_but",
    "hierarchical_layers",
    "mark_trainable",
    "param_report",
    "patch_ffn",
    "trainable_parameters",
]
