"""The Hierarchical Fusion Decoder and the mask head of DA-SAM3 (SPEC section 3).

Shapes: B images, K concepts per image, P = B·K (image, concept) pairs, N = h·w visual tokens,
S = N + 2 decoder tokens ([V_tok ; C_tok ; S_tok]), M memory tokens, d = d_model, Dt = text width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dasam3.layers.context import ConceptConcat, ConceptContext
from dasam3.layers.damoe import DAMoE
from dasam3_kernels.activations import activation_fn


class FeedForward(nn.Module):
    """`fc2(drop(act(fc1(x))))`: the dense FFN a DA-MoE layer upcycles (same names: fc1, fc2)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.activation, self.dropout = activation, nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(activation_fn(self.activation)(self.fc1(x))))


class FusionLayer(nn.Module):
    """Pre-norm self-attention over [V ; C ; S], cross-attention to the encoder memory, then the FFN.

    The FFN is a FeedForward or, once upcycled, a DAMoE whose router reads `concept_context(e_c, V)`
    computed from this layer's FFN input.
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, activation: str, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ffn: FeedForward | DAMoE = FeedForward(d_model, d_ff, activation, dropout)
        self.concept_context: ConceptContext | None = None
        self.concept_concat: ConceptConcat | None = None

    def forward(self, x: torch.Tensor, memory_keys: torch.Tensor, memory: torch.Tensor, concept: torch.Tensor,
                grid: tuple[int, int]) -> torch.Tensor:
        """x: [P, S, d]; memory_keys, memory: [P, M, d]; concept: [P, Dt]; grid: (h, w) of V → [P, S, d]."""
        h = self.norm1(x)
        x = x + self.dropout(self.self_attn(h, h, h, need_weights=False)[0])
        h = self.norm2(x)
        x = x + self.dropout(self.cross_attn(h, memory_keys, memory, need_weights=False)[0])
        h = self.norm3(x)
        if self.concept_concat is not None:
            h = self.concept_concat(h, concept)
        if not isinstance(self.ffn, DAMoE):
            return x + self.dropout(self.ffn(h))
        context = None
        if self.concept_context is not None:
            visual = h[:, : grid[0] * grid[1]].reshape(h.shape[0], grid[0], grid[1], h.shape[2])
            context = self.concept_context(concept, visual)
        return x + self.dropout(self.ffn(h, context))


def sine_positions(height: int, width: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed 2-D sine/cosine positions (DETR's), [height·width, dim]; dim must be a multiple of 4."""
    quarter = dim // 4
    freqs = torch.exp(torch.arange(quarter, device=device) * (-math.log(10000.0) / quarter))
    ys = torch.arange(height, device=device, dtype=torch.float32)[:, None].expand(height, width).reshape(-1)
    xs = torch.arange(width, device=device, dtype=torch.float32)[None, :].expand(height, width).reshape(-1)
    parts = [f(c[:, None] * freqs) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)


class HierarchicalFusionDecoder(nn.Module):
    """`X0 = [V_tok ; C_tok ; S_tok] + P`, then L FusionLayers; returns the decoded V and S tokens.

    V_tok: the encoder's coarsest features projected to d; C_tok: the projected concept embedding;
    S_tok: a learnable segmentation query; P: learnable positions (V's interpolated to other grids).
    memory: the encoder levels `memory_levels` (finer ones average-pooled to the token grid), projected
    to d, with sine positions and a level embedding.
    It is DA-SAM3's fusion module: mark_trainable's "warmup" trains its LayerNorms (no encoder's).
    """

    dasam3_fusion_module = True  # dasam3.layers.training.FUSION_MARK

    def __init__(self, encoder_channels: list[int], grid: tuple[int, int], text_dim: int, d_model: int,
                 num_layers: int, num_heads: int, d_ff: int, activation: str, dropout: float,
                 memory_levels: list[int]):
        super().__init__()
        if d_model % 4:
            raise ValueError(f"d_model must be a multiple of 4 (2-D sine positions), got {d_model}")
        num_levels = len(encoder_channels)
        bad = [i for i in memory_levels if not -num_levels <= i < num_levels]
        if bad:
            raise ValueError(f"memory_levels must index the encoder's {num_levels} levels, got {bad}")
        self.memory_levels = [i % num_levels for i in memory_levels]
        self.token_proj = nn.Conv2d(encoder_channels[-1], d_model, 1)
        self.concept_proj = nn.Linear(text_dim, d_model)
        self.seg_query = nn.Parameter(torch.zeros(1, 1, d_model))
        self.visual_pos = nn.Parameter(torch.zeros(1, d_model, *grid))
        self.prompt_pos = nn.Parameter(torch.zeros(1, 2, d_model))  # for C_tok and S_tok
        self.memory_proj = nn.ModuleList(nn.Conv2d(encoder_channels[i], d_model, 1) for i in self.memory_levels)
        self.level_embed = nn.Parameter(torch.zeros(len(self.memory_levels), d_model))
        self.layers = nn.ModuleList(FusionLayer(d_model, num_heads, d_ff, activation, dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        for param in (self.seg_query, self.visual_pos, self.prompt_pos, self.level_embed):
            nn.init.normal_(param, std=0.02)

    def forward(self, features: list[torch.Tensor], concepts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features: the encoder's levels [B, c_i, h_i, w_i]; concepts: [B, K, Dt].

        Returns the decoded visual tokens [P, d, h, w] and segmentation queries [P, d] (pair p = b·K + k).
        """
        batch, num_concepts = concepts.shape[:2]
        concept = concepts.reshape(batch * num_concepts, -1)
        visual = self.token_proj(features[-1])
        grid = tuple(visual.shape[-2:])
        pos = self.visual_pos if tuple(self.visual_pos.shape[-2:]) == grid else \
            F.interpolate(self.visual_pos, size=grid, mode="bilinear", align_corners=False)
        visual = (visual + pos).flatten(2).transpose(1, 2).repeat_interleave(num_concepts, dim=0)  # [P, N, d]
        prompt = torch.cat([self.concept_proj(concept).unsqueeze(1),
                            self.seg_query.expand(concept.shape[0], -1, -1)], dim=1) + self.prompt_pos
        x = torch.cat([visual, prompt], dim=1)
        memory, keys = self._memory(features, num_concepts)
        for layer in self.layers:
            x = layer(x, keys, memory, concept, grid)
        x = self.norm(x)
        decoded = x[:, : grid[0] * grid[1]].transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return decoded, x[:, -1]

    def _memory(self, features, num_concepts):
        grid = features[-1].shape[-2:]
        values, keys = [], []
        for index, (level, proj) in enumerate(zip(self.memory_levels, self.memory_proj)):
            feature = features[level]
            if feature.shape[-2] > grid[0] or feature.shape[-1] > grid[1]:
                # finer levels are pooled to the token grid: their features, at a cost that stays linear
                feature = F.adaptive_avg_pool2d(feature, grid)
            projected = proj(feature)
            tokens = projected.flatten(2).transpose(1, 2)  # [B, h·w, d]
            pos = sine_positions(*projected.shape[-2:], tokens.shape[-1], tokens.device).to(tokens.dtype)
            values.append(tokens)
            keys.append(tokens + pos + self.level_embed[index])
        return (torch.cat(values, 1).repeat_interleave(num_concepts, dim=0),
                torch.cat(keys, 1).repeat_interleave(num_concepts, dim=0))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of [N, C, H, W] (as SAM's mask decoder uses)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MaskHead(nn.Module):
    """Mask logits from the decoded tokens: an FPN-style pixel decoder, dotted with the decoded query.

    The decoded visual grid is upsampled level by level, adding each finer encoder level (projected),
    to a per-pixel embedding [P, mask_dim, h_0, w_0]; the mask logit of a pixel is its embedding's dot
    product with an MLP of the segmentation query.  Logits are resized to the input resolution.
    """

    def __init__(self, encoder_channels: list[int], d_model: int, mask_dim: int):
        super().__init__()
        skips = list(reversed(encoder_channels[:-1]))  # finer levels, coarse to fine
        widths = [max(mask_dim, d_model >> (i + 1)) for i in range(len(skips))]
        widths[-1] = mask_dim
        previous = d_model
        self.lateral = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for channels, width in zip(skips, widths):
            self.lateral.append(nn.Conv2d(channels, width, 1))
            self.blocks.append(nn.Sequential(nn.Conv2d(previous, width, 3, padding=1), LayerNorm2d(width), nn.GELU()))
            previous = width
        self.out = nn.Conv2d(previous, mask_dim, 1)
        self.query_mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, mask_dim))

    def forward(self, decoded: torch.Tensor, query: torch.Tensor, features: list[torch.Tensor],
                output_size: tuple[int, int]) -> torch.Tensor:
        """decoded [P, d, h, w], query [P, d], features per image (P = B·K) → logits [P, H, W]."""
        pairs_per_image = decoded.shape[0] // features[0].shape[0]
        x = decoded
        for lateral, block, skip in zip(self.lateral, self.blocks, reversed(features[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(x) + lateral(skip).repeat_interleave(pairs_per_image, dim=0)
        pixels = self.out(x)
        logits = torch.einsum("pc,pchw->phw", self.query_mlp(query), pixels)
        if tuple(logits.shape[-2:]) != tuple(output_size):
            logits = F.interpolate(logits.unsqueeze(1), size=output_size, mode="bilinear", align_corners=False)[:, 0]
        return logits
