"""The DA-MoE layer and its companions: `from dasam3.layers import DAMoE`."""

from .context import ConceptContext
from .damoe import DAMoE, RandomRouter, Router
from .training import ParamReport, aux_loss, damoe_layers, mark_trainable, param_report, trainable_parameters

__all__ = [
    "ConceptContext",
    "DAMoE",
    "ParamReport",
    "RandomRouter",
    "Router",
    "aux_loss",
    "damoe_layers",
    "mark_trainable",
    "param_report",
    "trainable_parameters",
]
