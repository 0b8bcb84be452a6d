"""The DA-MoE layer: a Dynamic Expert Router over Decomposed Parameterized Experts (SPEC section 1)."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dasam3_kernels import aux_losses, random_route, resolve_backend
from dasam3_kernels.activations import check_activation
from dasam3_kernels.backends import Backend, check_backend_name, load_backend

ROUTERS = ("learned", "random")
EXPERT_TYPES = ("lowrank", "full")
PROJECTIONS = ("fc1", "fc2")
GATED_PROJECTIONS = ("gate", "fc1", "fc2")  # a gated FFN: fc2(act(gate(x)) ⊙ fc1(x))


class Router(nn.Module):
    """The Dynamic Expert Router: `l_t = token_proj(x_t) + context_proj(c_b)`, top-k, softmax."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, context_dim: int = 0,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.top_k = top_k
        self.token_proj = nn.Linear(d_model, num_experts, **factory)
        self.context_proj = nn.Linear(context_dim, num_experts, bias=False, **factory) if context_dim else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.token_proj.weight, std=0.02)
        nn.init.zeros_(self.token_proj.bias)
        if self.context_proj is not None:
            nn.init.normal_(self.context_proj.weight, std=0.02)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, backend: Backend):
        """x: [T, D], context: [R, context_dim] (R divides T) → indices, weights [T, k]; probs [T, E]."""
        ctx_bias = None
        if self.context_proj is not None:  # once per context row, not per token
            dtype = torch.promote_types(context.dtype, torch.float32)
            ctx_bias = F.linear(context.to(dtype), self.context_proj.weight.to(dtype))
        return backend.route(x, self.token_proj.weight, self.token_proj.bias, ctx_bias, self.top_k)


class RandomRouter(nn.Module):
    """k distinct experts drawn uniformly per token with p = 1/k (the paper's "w/o DER" ablation)."""

    def __init__(self, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, backend: Backend):
        return random_route(x.shape[0], self.num_experts, self.top_k, x.device)


class DAMoE(nn.Module):
    """Mixture of low-rank experts over a frozen FFN, routed per token and per image concept.

    `layer(x, context=None) -> y`, x: [..., D], y: x's shape.  context: None, [B, context_dim] for
    x [B, ..., D] (broadcast to the sample's tokens) or [T, context_dim] (one row per token).
    gated=True wraps a gated FFN `fc2(act(gate(x)) ⊙ fc1(x))` (SwiGLU, GeGLU); adapt then defaults to
    ("gate", "fc1", "fc2").  docs/layer.md gives the exact formula, the parameters and the backends.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        num_experts: int = 4,
        top_k: int = 2,
        rank: int = 8,
        alpha: float | None = None,
        activation: str = "gelu",
        context_dim: int = 0,
        dropout: float = 0.0,
        adapt: Sequence[str] | None = None,
        router: str = "learned",
        expert_type: str = "lowrank",
        bias: bool = True,
        gated: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
        _ffn: tuple[nn.Linear, ...] | None = None,
    ):
        super().__init__()
        projections = GATED_PROJECTIONS if gated else PROJECTIONS
        adapt = projections if adapt is None else adapt
        _check_config(d_model, d_ff, num_experts, top_k, rank, activation, context_dim, dropout, adapt,
                      router, expert_type, backend, projections)
        self.d_model, self.d_ff = d_model, d_ff
        self.num_experts, self.top_k, self.rank = num_experts, top_k, rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.activation, self.context_dim, self.dropout = activation, context_dim, float(dropout)
        self.gated, self.projections = bool(gated), projections
        self.adapt = tuple(p for p in projections if p in adapt)
        self.router_type, self.expert_type, self.backend = router, expert_type, backend
        if backend not in ("auto", "reference", "torch"):
            load_backend(backend)  # fail now, with what is missing, not at the first forward

        if _ffn is None:
            factory = {"device": device, "dtype": dtype}
            _ffn = (nn.Linear(d_model, d_ff, bias=bias, **factory), nn.Linear(d_ff, d_model, bias=bias, **factory))
            if gated:
                _ffn += (nn.Linear(d_model, d_ff, bias=bias, **factory),)
        self.fc1, self.fc2 = _ffn[:2]
        self.gate = _ffn[2] if gated else None
        for name in projections:
            getattr(self, name).requires_grad_(False)
        factory = {"device": self.fc1.weight.device if device is None else device,
                   "dtype": self.fc1.weight.dtype if dtype is None else dtype}

        if router == "learned":
            self.router = Router(d_model, num_experts, top_k, context_dim, **factory)
        else:
            self.router = RandomRouter(num_experts, top_k)
        if expert_type == "lowrank":
            for name in self.adapt:
                n_in, n_out = (d_ff, d_model) if name == "fc2" else (d_model, d_ff)
                setattr(self, f"{name}_lora_A", nn.Parameter(torch.empty(num_experts, rank, n_in, **factory)))
                setattr(self, f"{name}_lora_B", nn.Parameter(torch.empty(num_experts, n_out, rank, **factory)))
        else:
            for name in projections:
                base = getattr(self, name)
                setattr(self, f"expert_{name}_weight",
                        nn.Parameter(torch.empty(num_experts, *base.weight.shape, **factory)))
                if base.bias is not None:
                    setattr(self, f"expert_{name}_bias",
                            nn.Parameter(torch.empty(num_experts, *base.bias.shape, **factory)))
        self.aux: dict[str, torch.Tensor] = {}
        self.last_routing: dict[str, torch.Tensor] = {}
        self.reset_parameters()

    @classmethod
    def from_ffn(cls, fc1: nn.Linear, fc2: nn.Linear, activation: str = "gelu", *, gate: nn.Linear | None = None,
                 **kwargs) -> "DAMoE":
        """Upcycle a pretrained FFN `fc2(act(fc1(x)))`, or with `gate` the gated `fc2(act(gate(x)) ⊙ fc1(x))`
        (HF: gate=gate_proj, fc1=up_proj, fc2=down_proj): the layer holds (and freezes) these modules.

        At initialisation every expert equals the FFN, so the layer reproduces it exactly.
        """
        modules = {"fc1": fc1, "fc2": fc2, **({"gate": gate} if gate is not None else {})}
        wrong = {n: type(m).__name__ for n, m in modules.items() if not isinstance(m, nn.Linear)}
        if wrong:
            raise ValueError(f"from_ffn expects nn.Linear modules, got {wrong}")
        if fc2.in_features != fc1.out_features or fc2.out_features != fc1.in_features:
            raise ValueError(
                f"fc2 must map d_ff={fc1.out_features} back to d_model={fc1.in_features}, "
                f"got fc2 [{fc2.out_features}, {fc2.in_features}]"
            )
        if gate is not None and gate.weight.shape != fc1.weight.shape:
            raise ValueError(f"gate must have fc1's shape [d_ff, d_model] = {list(fc1.weight.shape)}, "
                             f"got gate {list(gate.weight.shape)}")
        if (fc1.bias is None) != (fc2.bias is None):
            raise ValueError("fc1 and fc2 must both have a bias or both have none")
        for key in ("d_model", "d_ff", "bias", "gated"):
            if key in kwargs:
                raise ValueError(f"from_ffn takes {key} from the given modules, got {key}={kwargs[key]!r}")
        return cls(fc1.in_features, fc1.out_features, activation=activation, bias=fc1.bias is not None,
                   gated=gate is not None, _ffn=tuple(modules.values()), **kwargs)

    def reset_parameters(self) -> None:
        """Initialise the trainable parameters; the frozen FFN is left as it is."""
        if isinstance(self.router, Router):
            self.router.reset_parameters()
        with torch.no_grad():
            for name in self.adapt if self.expert_type == "lowrank" else ():
                A, B = getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")
                for expert in A:  # independent Kaiming draws per expert, as nn.Linear/PEFT do
                    nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
                nn.init.zeros_(B)
            for name in self.projections if self.expert_type == "full" else ():
                base = getattr(self, name)
                getattr(self, f"expert_{name}_weight").copy_(base.weight.expand_as(getattr(self, f"expert_{name}_weight")))
                if base.bias is not None:
                    getattr(self, f"expert_{name}_bias").copy_(base.bias.expand_as(getattr(self, f"expert_{name}_bias")))

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable expert tensors: the lora factors, or the full expert copies."""
        for name, param in self.named_parameters(recurse=False):
            if name.endswith(("_lora_A", "_lora_B")) or name.startswith("expert_"):
                yield param

    def _lora(self, name: str, factor: str) -> torch.Tensor | None:
        return getattr(self, f"{name}_lora_{factor}", None)

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x, context)
        tokens = x.reshape(-1, self.d_model)
        compute_dtype = _autocast_dtype(x.device) or x.dtype
        dropout_active = self.training and self.dropout > 0
        backend = resolve_backend(self.backend, x.device, full_experts=self.expert_type == "full",
                                  dropout=dropout_active, dtype=compute_dtype)
        if dropout_active and self.backend not in ("auto", backend.name):
            _warn_once(f"backend {self.backend!r} has no dropout; training with dropout runs the torch path")

        keep = None
        if dropout_active:
            keep = torch.rand(tokens.shape[0], self.top_k, self.d_ff, device=x.device) >= self.dropout
        with _autocast_off(x.device):  # routing in fp32, experts in compute_dtype
            indices, weights, probs = self.router(tokens, context, backend)
            self.last_routing = {"indices": indices.detach(), "weights": weights.detach(), "probs": probs.detach()}
            self.aux = aux_losses(indices, probs) if self.training else {}
            y = self._experts(backend, tokens.to(compute_dtype), indices, weights, compute_dtype, keep)
        return y.reshape(x.shape)

    def _experts(self, backend: Backend, x, indices, weights, dtype, keep) -> torch.Tensor:
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731 (autocast's casts, done once)
        dropout = {"dropout_mask": keep, "dropout_p": self.dropout} if keep is not None else {}
        if self.expert_type == "full":
            expert = lambda n, w: cast(getattr(self, f"expert_{n}_{w}", None))  # noqa: E731
            tensors = [expert(n, w) for n in PROJECTIONS for w in ("weight", "bias")]
            gate = {"gate_weight": expert("gate", "weight"), "gate_bias": expert("gate", "bias")} if self.gated else {}
            return backend.full_moe(x, indices, weights, *tensors, self.activation, **dropout, **gate)
        frozen = [t for n in self.projections for t in (getattr(self, n).weight, getattr(self, n).bias)]
        lora = [self._lora(n, f) for n in self.projections for f in ("A", "B")]
        op = backend.gated_moe if self.gated else backend.lowrank_moe
        return op(x, indices, weights, *map(cast, frozen), *map(cast, lora), self.scale, self.activation, **dropout)

    def _check_input(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dimension d_model={self.d_model}, got shape {tuple(x.shape)}")
        if _autocast_dtype(x.device) is None and x.dtype != self.fc1.weight.dtype:
            raise ValueError(
                f"x has dtype {x.dtype} but the layer's weights are {self.fc1.weight.dtype}; "
                "convert one of them or run under torch.autocast"
            )
        if self.context_dim == 0:
            if context is not None:
                raise ValueError(f"context given (shape {tuple(context.shape)}) but the layer has context_dim=0")
            return
        if context is None:
            raise ValueError(f"context of shape [B or T, {self.context_dim}] is required (context_dim="
                             f"{self.context_dim}), got None")
        num_tokens = x.numel() // self.d_model
        batch = x.shape[0] if x.dim() > 2 else num_tokens
        if context.dim() != 2 or context.shape[1] != self.context_dim:
            raise ValueError(f"context must be [B or T, {self.context_dim}], got shape {tuple(context.shape)}")
        if context.shape[0] not in (batch, num_tokens):
            raise ValueError(
                f"context must have one row per sample (B={batch}) or per token (T={num_tokens}), "
                f"got {context.shape[0]} rows"
            )

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"rank={self.rank}, alpha={self.alpha:g}, activation={self.activation!r}, "
                f"context_dim={self.context_dim}, adapt={self.adapt}, router={self.router_type!r}, "
                f"expert_type={self.expert_type!r}, gated={self.gated}, backend={self.backend!r}")


def resolve_use_context(use_context: bool | None, router: str) -> bool:
    """Whether the routers read a concept context: None means yes for router="learned" and no for
    router="random" (which ignores it); True with router="random" is an error."""
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
    if use_context is None:
        return router == "learned"
    if use_context and router == "random":
        raise ValueError("router='random' ignores the concept context: use_context must be False or None, got True")
    return use_context


def _check_config(d_model, d_ff, num_experts, top_k, rank, activation, context_dim, dropout, adapt, router,
                  expert_type, backend, projections) -> None:
    for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    check_activation(activation)
    if context_dim < 0:
        raise ValueError(f"context_dim must be >= 0, got {context_dim}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if isinstance(adapt, str) or not set(adapt) <= set(projections):
        gate_hint = " ('gate' needs gated=True)" if not isinstance(adapt, str) and "gate" in adapt else ""
        raise ValueError(f"adapt must be a subset of {projections}{gate_hint}, got {adapt!r}")
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
    if expert_type not in EXPERT_TYPES:
        raise ValueError(f"expert_type must be one of {EXPERT_TYPES}, got {expert_type!r}")
    check_backend_name(backend)


def _autocast_off(device: torch.device):
    """torch.autocast(enabled=False), or nothing on devices without autocast (meta, for shape inference),
    where torch.autocast raises."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)  # the default filter shows it once per site
