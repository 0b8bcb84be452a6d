"""mark_trainable and param_report: the paper's trainable sets and its parameter accounting."""

from __future__ import annotations

import pytest
from torch import nn

from dasam3.layers import ConceptContext, DAMoE, mark_trainable, param_report


class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.context = ConceptContext(16, 8, num_heads=2)
        self.moe = DAMoE(16, 32, num_experts=3, rank=2, context_dim=24)
        self.head = nn.Linear(16, 1)


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_warmup_trains_lora_routers_contexts_and_layer_norms():
    model = TinyDecoder()
    count = mark_trainable(model, "warmup")
    expected = {"norm.weight", "norm.bias", "moe.fc1_lora_A", "moe.fc1_lora_B", "moe.fc2_lora_A",
                "moe.fc2_lora_B", "moe.router.token_proj.weight", "moe.router.token_proj.bias",
                "moe.router.context_proj.weight"}
    expected |= {f"context.{n}" for n, _ in model.context.named_parameters()}
    assert trainable_names(model) == expected
    assert count == sum(p.numel() for n, p in model.named_parameters() if n in expected)


def test_calibrate_trains_routers_and_contexts_only():
    model = TinyDecoder()
    mark_trainable(model, "warmup")
    mark_trainable(model, "calibrate")
    expected = {"moe.router.token_proj.weight", "moe.router.token_proj.bias", "moe.router.context_proj.weight"}
    expected |= {f"context.{n}" for n, _ in model.context.named_parameters()}
    assert trainable_names(model) == expected


def test_full_experts_are_the_experts_in_warmup():
    model = nn.Sequential(DAMoE(8, 16, expert_type="full", num_experts=2))
    mark_trainable(model, "warmup")
    assert trainable_names(model) == {"0.expert_fc1_weight", "0.expert_fc1_bias", "0.expert_fc2_weight",
                                      "0.expert_fc2_bias", "0.router.token_proj.weight", "0.router.token_proj.bias"}


def test_unknown_stage_is_a_value_error():
    with pytest.raises(ValueError, match=r"stage must be one of \('warmup', 'calibrate'\), got 'train'"):
        mark_trainable(TinyDecoder(), "train")


def test_param_report_counts_by_hand():
    model = TinyDecoder()
    mark_trainable(model, "warmup")
    report = param_report(model)
    D, F, E, r, C = 16, 32, 3, 2, 24
    lora = E * r * (D + F) * 2
    router = E * D + E + E * C
    ffn = 2 * D * F + F + D
    assert report.damoe_layers == 1
    assert report.damoe_added == lora + router
    assert report.full_experts_added == E * ffn + router
    assert report.trainable + report.frozen == sum(p.numel() for p in model.parameters())
    assert report.frozen == ffn + sum(p.numel() for p in model.head.parameters())
    assert report.reduction == pytest.approx(1 - (lora + router) / (E * ffn + router))
    assert "reduction" in report.table()


def test_reduction_exceeds_95_percent_at_the_sam3_shape():
    report = param_report(DAMoE(256, 2048, num_experts=4, top_k=2, rank=8))
    assert report.reduction > 0.95
