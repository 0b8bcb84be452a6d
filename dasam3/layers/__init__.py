"""The DA-MoE layer and its companions: `from dasam3.layers import DAMoE`."""

from .context import ConceptConcat, ConceptContext
from .damoe import DAMoE, RandomRouter, Router
from .layouts import FFNLayout, ffn_layouts, register_ffn_layout, unregister_ffn_layout
from .patch import ContextSlot, PatchedFFN, hierarchical_layers, patch_ffn
from .training import (ParamReport, aux_loss, damoe_layers, freeze_all_but, mark_trainable, param_report,
                       trainable_parameters)

__all__ = [
    "ConceptConcat",
    "ConceptContext",
    "ContextSlot",
    "DAMoE",
    "FFNLayout",
    "ParamReport",
    "PatchedFFN",
    "RandomRouter",
    "Router",
    "aux_loss",
    "damoe_layers",
    "ffn_layouts",
    "freeze_all_but",
    "hierarchical_layers",
    "mark_trainable",
    "param_report",
    "patch_ffn",
    "register_ffn_layout",
    "trainable_parameters",
    "unregister_ffn_layout",
]
