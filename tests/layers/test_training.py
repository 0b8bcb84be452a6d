"""mark_trainable and param_report: the paper's trainable sets and its parameter accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dasam3.adapters import load_adapter, read_adapter, save_adapter
from dasam3.layers.training import FrozenTowerHooks
from dasam3.layers import (ConceptContext, DAMoE, fusion_modules, mark_fusion_module, mark_trainable, param_report,
                           patch_ffn)


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


def test_param_report_counts_a_gated_ffn_by_hand():
    D, F, E, r = 16, 32, 3, 2
    report = param_report(DAMoE(D, F, num_experts=E, top_k=2, rank=r, gated=True))
    lora = E * r * (D + F) * 3  # gate, fc1 and fc2 adapted
    router = E * D + E
    ffn = 3 * D * F + 2 * F + D  # W_g, W1, W2 and their biases: a full expert copies all three
    assert report.damoe_added == lora + router
    assert report.full_experts_added == E * ffn + router


def test_reduction_exceeds_95_percent_at_the_sam3_shape():
    report = param_report(DAMoE(256, 2048, num_experts=4, top_k=2, rank=8))
    assert report.reduction > 0.95


# -- the fusion-module scope, and PEFT beside DA-MoE ------------------------------------------------------


class HFStyleMLP(nn.Module):
    def __init__(self, d=16, f=32):
        super().__init__()
        self.fc1, self.fc2, self.activation_fn = nn.Linear(d, f), nn.Linear(f, d), nn.GELU()

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d)
        self.mlp = HFStyleMLP(d)

    def forward(self, x):
        x = x + self.q_proj(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.final_norm = nn.LayerNorm(16)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)


def _patched_net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    patch_ffn(net, layers=[1], num_experts=3, top_k=2, rank=2)  # blocks.1.mlp becomes the DA-MoE layer
    return net


OURS = {"blocks.1.mlp.fc1_lora_A", "blocks.1.mlp.fc1_lora_B", "blocks.1.mlp.fc2_lora_A", "blocks.1.mlp.fc2_lora_B",
        "blocks.1.mlp.router.token_proj.weight", "blocks.1.mlp.router.token_proj.bias",
        "blocks.1.norm1.weight", "blocks.1.norm1.bias", "blocks.1.norm2.weight", "blocks.1.norm2.bias"}


def test_patched_model_trains_the_norms_of_the_blocks_holding_da_moe_only():
    net = _patched_net()
    assert fusion_modules(net) == [net.blocks[1]]
    mark_trainable(net, "warmup")
    assert trainable_names(net) == OURS  # not blocks.0's norms, not the final norm


def test_marked_fusion_module_decides_the_norms():
    net = _patched_net()
    mark_fusion_module(net)  # the whole net is the fusion module: every LayerNorm trains
    mark_trainable(net, "warmup")
    assert trainable_names(net) == OURS | {f"{m}.{p}" for m in ("blocks.0.norm1", "blocks.0.norm2", "final_norm")
                                           for p in ("weight", "bias")}


def _randomise_all(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)


def test_peft_lora_and_da_moe_train_side_by_side(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_patched_net(), peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    peft_names = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(peft_names) == 4  # both blocks' q_proj
    prefix = "base_model.model."
    assert not trainable_names(model) & {prefix + n for n in OURS}  # PEFT alone freezes our factors ...
    count = mark_trainable(model, "warmup")  # ... the recipe: mark_trainable after get_peft_model
    assert trainable_names(model) == peft_names | {prefix + n for n in OURS}
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    model(torch.randn(2, 5, 16)).square().mean().backward()
    assert all(model.get_parameter(n).grad is not None for n in peft_names | {prefix + n for n in OURS})
    mark_trainable(model, "calibrate")  # PEFT's factors keep their requires_grad in every stage
    assert trainable_names(model) == peft_names | {prefix + n for n in OURS if ".router." in n}

    # combined save / load: PEFT's adapter with PEFT, ours with save_adapter; each file holds only its own
    mark_trainable(model, "warmup")
    _randomise_all(model, seed=1)
    model.eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "peft")
    save_adapter(model, tmp_path / "damoe.safetensors")
    ours, _ = read_adapter(tmp_path / "damoe.safetensors")
    assert set(ours) == {prefix + n for n in OURS}
    from safetensors.torch import load_file

    assert not any("mlp" in k or "norm" in k for k in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    restored = peft.PeftModel.from_pretrained(_patched_net(), tmp_path / "peft").eval()
    with torch.no_grad():
        assert (restored(x) - expected).abs().max() > 1e-3
        load_adapter(restored, tmp_path / "damoe.safetensors")
        torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)


def test_frozen_tower_hooks_run_without_autograd_and_restore_the_mode_when_nested():
    tower = nn.Sequential(nn.Linear(4, 4)).requires_grad_(False)
    seen = []
    tower.register_forward_pre_hook(lambda m, args: seen.append(torch.is_grad_enabled()))  # before ours: grad on
    FrozenTowerHooks().attach(tower)
    FrozenTowerHooks().attach(tower)  # e.g. two adaptations of one model
    tower[0].register_forward_hook(lambda m, args, out: seen.append(torch.is_grad_enabled()))  # inside the tower
    out = tower(torch.randn(2, 4))
    assert seen == [True, False] and torch.is_grad_enabled() and out.grad_fn is None
    x = torch.randn(2, 4, requires_grad=True)  # an input that needs its gradient keeps autograd
    assert tower(x).grad_fn is not None and torch.is_grad_enabled()
    tower[0].weight.requires_grad_(True)  # so does a tower that trains
    assert tower(torch.randn(2, 4)).grad_fn is not None
    with pytest.raises(RuntimeError):
        tower(torch.randn(2, 3))  # a failing call restores the mode too
    assert torch.is_grad_enabled()
