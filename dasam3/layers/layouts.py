"""Where transformer blocks keep their FFN: the layouts `patch_ffn` recognises, and a registry for more.

A layout names, relative to the block it matches, the FFN's projections (`fc1`, `fc2`, and `gate` for
a gated FFN `fc2(act(gate(x)) ⊙ fc1(x))`), its activation and dropouts, and how the DA-MoE layer takes
the FFN's place: it `replace`s one submodule (or, with replace="", the whole block inside its parent)
and the modules in `identities` become `nn.Identity()` because the layer now computes them.  So the
patched block computes `identities[-1](...(identities[0](replace(x))))` with the DA-MoE layer at the
head of the chain, and `patch_ffn` checks on a probe input that the chain is the FFN before it patches.

`register_ffn_layout(...)` adds a layout for a block this module does not know; user layouts are tried
before the built-in ones.  See docs/layer.md for an example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from dasam3_kernels.activations import ACTIVATIONS

PACKINGS = ("gate_first", "gate_last")


@dataclass(frozen=True)
class FFNLayout:
    """How one kind of block holds its FFN (paths are attribute paths from the block, "a.b" allowed).

    fc1, fc2: the up and down projections (nn.Linear, or transformers' transposed Conv1D).
    gate: the gate projection of a gated FFN, or None.  packed: "gate_first" / "gate_last" when `fc1`
    holds the gate and up projections stacked as one [2F, D] weight (split into two views).
    activation: the path of the block's activation (a module or function, identified numerically), or
    activation_name: a fixed activation of `dasam3_kernels.ACTIVATIONS`.
    hidden_dropout / output_dropout: paths of nn.Dropout modules on the hidden layer / after fc2 inside
    what is replaced.  replace, identities: see the module docstring.
    requires_identity: paths that must be nn.Identity (e.g. timm's hidden `norm`), else the block is refused.
    refusal: when set, the block is recognised but cannot be rewritten; the text says what to do instead.
    """

    name: str
    matches: Callable[[nn.Module], bool] = field(repr=False)
    fc1: str
    fc2: str
    gate: str | None = None
    packed: str | None = None
    activation: str | None = None
    activation_name: str | None = None
    hidden_dropout: str | None = None
    output_dropout: str | None = None
    replace: str = ""
    identities: tuple[str, ...] = ()
    requires_identity: tuple[str, ...] = ()
    refusal: str | None = None

    def __post_init__(self):
        if (self.activation is None) == (self.activation_name is None):
            raise ValueError(f"layout {self.name!r}: give exactly one of activation (a path in the block) and "
                             f"activation_name (one of {ACTIVATIONS}), got {self.activation!r} and "
                             f"{self.activation_name!r}")
        if self.activation_name is not None and self.activation_name not in ACTIVATIONS:
            raise ValueError(f"layout {self.name!r}: activation_name must be one of {ACTIVATIONS}, "
                             f"got {self.activation_name!r}")
        if self.packed is not None and (self.packed not in PACKINGS or self.gate is not None):
            raise ValueError(f"layout {self.name!r}: packed must be one of {PACKINGS} with gate=None, got "
                             f"packed={self.packed!r}, gate={self.gate!r}")

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.packed is not None

    def formula(self) -> str:
        act = self.activation or self.activation_name
        if self.packed:
            return f"{self.fc2}({act}(gate) ⊙ up) with [gate; up] = {self.fc1}(x) ({self.packed})"
        if self.gate:
            return f"{self.fc2}({act}({self.gate}(x)) ⊙ {self.fc1}(x))"
        return f"{self.fc2}({act}({self.fc1}(x)))"


def resolve(block: nn.Module, path: str):
    """The attribute at `path` ("" is the block itself)."""
    target = block
    for part in path.split(".") if path else ():
        target = getattr(target, part)
    return target


# -- the registry ------------------------------------------------------------------------------------

_USER_LAYOUTS: list[FFNLayout] = []


def register_ffn_layout(matches: type | Callable[[nn.Module], bool], *, fc1: str, fc2: str, gate: str | None = None,
                        packed: str | None = None, activation: str | None = None,
                        activation_name: str | None = None, hidden_dropout: str | None = None,
                        output_dropout: str | None = None, replace: str = "", identities: tuple[str, ...] = (),
                        requires_identity: tuple[str, ...] = (), name: str | None = None) -> FFNLayout:
    """Teach `patch_ffn` a block: `matches` is the block's class (instances and subclasses match) or a
    predicate on modules; the keywords are `FFNLayout`'s.  Returns the layout (for `unregister_ffn_layout`).

    Layouts registered later are tried first, and every registered layout before the built-in ones.
    """
    predicate = (lambda module: isinstance(module, matches)) if isinstance(matches, type) else matches
    if not callable(predicate):
        raise ValueError(f"matches must be a class or a predicate on modules, got {matches!r}")
    label = name or (matches.__name__ if isinstance(matches, type) else getattr(matches, "__name__", "custom"))
    layout = FFNLayout(label, predicate, fc1, fc2, gate, packed, activation, activation_name, hidden_dropout,
                       output_dropout, replace, tuple(identities), tuple(requires_identity))
    _USER_LAYOUTS.insert(0, layout)
    return layout


def unregister_ffn_layout(layout: FFNLayout) -> None:
    """Remove a layout `register_ffn_layout` returned."""
    if layout not in _USER_LAYOUTS:
        raise ValueError(f"layout {layout.name!r} is not registered")
    _USER_LAYOUTS.remove(layout)


def ffn_layouts() -> list[FFNLayout]:
    """Every layout in the order `patch_ffn` tries them: the registered ones, then the built-in ones."""
    return [*_USER_LAYOUTS, *BUILTIN_LAYOUTS]


# -- matching helpers --------------------------------------------------------------------------------


def _is_class(module: nn.Module, *qualified: str) -> bool:
    """Whether `module` is an instance of a class named `package.module.Class`, without importing it."""
    return any(f"{c.__module__}.{c.__qualname__}" in qualified for c in type(module).__mro__)


def _linear(module: nn.Module, *paths: str) -> bool:
    return all(isinstance(_get(module, p), nn.Linear) for p in paths)


def _get(module: nn.Module, path: str):
    try:
        return resolve(module, path)
    except AttributeError:
        return None


def _holds_only(module: nn.Module, *names: str | None) -> bool:
    """A container: its child modules are among `names` (what the FFN uses), so its forward is the FFN."""
    return {n for n, _ in module.named_children()} <= set(names)


def _callable(module: nn.Module, name: str) -> bool:
    return callable(_get(module, name))


_HF_ACTIVATIONS = ("activation_fn", "act_fn", "act", "activation")


def _hf_activation(module: nn.Module) -> str | None:
    return next((n for n in _HF_ACTIVATIONS if _callable(module, n)), None)


def _hf_dropout(module: nn.Module) -> str | None:
    return "dropout" if isinstance(getattr(module, "dropout", None), nn.Dropout) else None


def _hf_mlp(fc1: str, fc2: str, gate: str | None = None, packed: str | None = None, name: str = "",
            output_dropout: bool = False):
    """Layouts of transformers' MLP containers, whose activation attribute name varies by model."""

    def matches(module: nn.Module) -> bool:
        act = _hf_activation(module)
        paths = [p for p in (fc1, fc2, gate) if p]
        return act is not None and _linear(module, *paths) and _holds_only(module, *paths, act, _hf_dropout(module))

    def layouts(module: nn.Module) -> FFNLayout:
        dropout = _hf_dropout(module)
        return FFNLayout(name, matches, fc1, fc2, gate, packed, activation=_hf_activation(module),
                         hidden_dropout=None if output_dropout else dropout,
                         output_dropout=dropout if output_dropout else None)

    return _Dynamic(name, matches, layouts)


@dataclass(frozen=True)
class _Dynamic:
    """A built-in layout whose attribute names depend on the instance (HF's activation names)."""

    name: str
    matches: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], FFNLayout]
    refused: bool = False


def _torch_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) \
        or _is_class(module, "sam3.model.encoder.TransformerEncoderLayer")


def _timm_mlp(module: nn.Module) -> bool:
    return _linear(module, "fc1", "fc2") and all(hasattr(module, n) for n in ("act", "drop1", "norm", "drop2")) \
        and not _is_class(module, "timm.layers.mlp.GluMlp")


def _timm_glu(module: nn.Module) -> bool:
    return _is_class(module, "timm.layers.mlp.GluMlp") and getattr(module, "chunk_dim", None) == -1 \
        and _linear(module, "fc1", "fc2")


def _bert_style(module: nn.Module) -> bool:
    """transformers' BERT/RoBERTa/ViT layers: `intermediate` (dense + act) then `output` (dense, dropout,
    residual, maybe a LayerNorm), called as `output(intermediate(x), x)`."""
    return _linear(module, "intermediate.dense", "output.dense") \
        and _callable(module, "intermediate.intermediate_act_fn") \
        and _holds_only(module.intermediate, "dense", "intermediate_act_fn")


def _torchvision_mlp(module: nn.Module) -> bool:
    """torchvision's two-layer MLP (ViT's MLPBlock): Linear, activation, Dropout, Linear, Dropout."""
    if not _is_class(module, "torchvision.ops.misc.MLP") or len(module) != 5:
        return False
    kinds = [type(m) for m in module]
    return kinds[0] is nn.Linear and kinds[3] is nn.Linear and kinds[2] is nn.Dropout and kinds[4] is nn.Dropout


def _gpt2_mlp(module: nn.Module) -> bool:
    conv1d = lambda p: _is_class(_get(module, p) or nn.Identity(), "transformers.pytorch_utils.Conv1D")  # noqa: E731
    return conv1d("c_fc") and conv1d("c_proj") and _callable(module, "act") \
        and _holds_only(module, "c_fc", "c_proj", "act", "dropout")


def _inline_fc_layer(module: nn.Module) -> bool:
    """A layer that computes fc1/fc2 inside a larger forward (BART, OPT, Mask2Former's pixel decoder)."""
    return _linear(module, "fc1", "fc2") and _hf_activation(module) is not None


_INLINE_REFUSAL = (
    "it computes its FFN inline, between attention and norms, in its own forward, so patch_ffn cannot swap the "
    "FFN alone. Upcycle it by hand: `moe = DAMoE.from_ffn(block.fc1, block.fc2, {activation!r}, num_experts=4)` "
    "and `block.fc1, block.fc2, block.{act_path} = moe, nn.Identity(), nn.Identity()` (exact when the layer's "
    "dropout between fc1 and fc2 is 0 or in eval mode), or describe the block with "
    "dasam3.layers.register_ffn_layout(...)"
)

BUILTIN_LAYOUTS: list[FFNLayout | _Dynamic] = [
    FFNLayout("torch TransformerEncoderLayer/DecoderLayer", _torch_layer, "linear1", "linear2",
              activation="activation", hidden_dropout="dropout", replace="linear1",
              identities=("activation", "dropout", "linear2")),
    FFNLayout("timm SwiGLU", lambda m: _is_class(m, "timm.layers.mlp.SwiGLU"), "fc1_x", "fc2", gate="fc1_g",
              activation="act", hidden_dropout="drop1", output_dropout="drop2", requires_identity=("norm",)),
    FFNLayout("timm GluMlp (gate last)", lambda m: _timm_glu(m) and m.gate_last, "fc1", "fc2", packed="gate_last",
              activation="act", hidden_dropout="drop1", output_dropout="drop2", requires_identity=("norm",)),
    FFNLayout("timm GluMlp / SwiGLUPacked (gate first)", lambda m: _timm_glu(m) and not m.gate_last, "fc1", "fc2",
              packed="gate_first", activation="act", hidden_dropout="drop1", output_dropout="drop2",
              requires_identity=("norm",)),
    FFNLayout("timm Mlp", _timm_mlp, "fc1", "fc2", activation="act", hidden_dropout="drop1",
              output_dropout="drop2", requires_identity=("norm",)),
    FFNLayout("segment-anything MLPBlock", lambda m: _linear(m, "lin1", "lin2") and _callable(m, "act")
              and _holds_only(m, "lin1", "lin2", "act"), "lin1", "lin2", activation="act"),
    _hf_mlp("up_proj", "down_proj", gate="gate_proj", name="LLaMA/Qwen2/Mistral/Gemma/DINOv2 gate/up/down MLP"),
    _hf_mlp("gate_up_proj", "down_proj", packed="gate_first", name="Phi-3 gate_up_proj MLP"),
    FFNLayout("T5 DenseGatedActDense", lambda m: _linear(m, "wi_0", "wi_1", "wo") and _callable(m, "act"),
              "wi_1", "wo", gate="wi_0", activation="act", hidden_dropout="dropout"),
    FFNLayout("T5 DenseActDense", lambda m: _linear(m, "wi", "wo") and _callable(m, "act")
              and _holds_only(m, "wi", "wo", "act", "dropout"), "wi", "wo", activation="act",
              hidden_dropout="dropout"),
    FFNLayout("GPT-2 Conv1D MLP", _gpt2_mlp, "c_fc", "c_proj", activation="act", output_dropout="dropout"),
    FFNLayout("BERT/RoBERTa/ViT intermediate + output", _bert_style, "intermediate.dense", "output.dense",
              activation="intermediate.intermediate_act_fn", replace="intermediate", identities=("output.dense",)),
    FFNLayout("torchvision MLP/MLPBlock", _torchvision_mlp, "0", "3", activation="1", hidden_dropout="2",
              output_dropout="4"),
    _hf_mlp("fc1", "fc2", name="fc1/fc2 MLP (CLIP, SAM3, ...)"),
    _Dynamic("layer with an inline fc1/fc2 FFN (BART, OPT, Mask2Former)", _inline_fc_layer,
             lambda m: FFNLayout("inline fc1/fc2 FFN", _inline_fc_layer, "fc1", "fc2", activation=_hf_activation(m),
                                 refusal=_INLINE_REFUSAL), refused=True),
]


def match(module: nn.Module) -> FFNLayout | None:
    """The layout of `module` (instance-specific names filled in), or None."""
    for layout in ffn_layouts():
        if layout.matches(module):
            return layout.build(module) if isinstance(layout, _Dynamic) else layout
    return None


def supported_names() -> list[str]:
    """The names of the layouts patch_ffn can patch (for error messages)."""
    return [layout.name for layout in ffn_layouts() if not getattr(layout, "refused", False)]
