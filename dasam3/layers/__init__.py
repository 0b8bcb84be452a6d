"""The DA-MoE layer and its companions: `from dasam3.layers import DAMoE`."""

from .context import ConceptConcat, ConceptContext
from .damoe import DAMoE, RandomRouter, Router
from .layouts import FFNLayout, ffn_layouts, register_ffn_layout, unregister_ffn_layout
from .patch import ContextSlot, PatchedFFN, hierarchical_layers, patch_ffn
from .training import (ParamReport, aux_loss, damoe_layers, freeze_all_but, fusion_modules, mark_fusion_module,
                       mark_trainable, other_adapter_parameters, param_report, trainable_parameters)

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
    "fusion_modules",
    "hierarchical_layers",
    "mark_fusion_module",
    "mark_trainable",
    "other_adapter_parameters",
    "param_report",
    "patch_ffn",
    "register_ffn_layout",
    "trainable_parameters",
    "unregister_ffn_layout",
]
