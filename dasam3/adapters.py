"""DA-MoE adapters on their own: the trained tensors without the frozen weights they adapt.

An adapter file is a safetensors file holding the tensors the paper trains (lora factors or full
experts, routers, concept contexts, LayerNorms, the Concat baseline's projections:
`dasam3.layers.trainable_parameters(model, "warmup")`), keyed by their names in the model, with a small
JSON config in the file's metadata (the format and the DA-MoE layers' hyper-parameters).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from dasam3.io import atomic_output
from dasam3.layers.damoe import DAMoE
from dasam3.layers.training import trainable_parameters

FORMAT = "dasam3-adapter"
FORMAT_VERSION = 1
_METADATA_KEY = "dasam3_adapter"
# The DA-MoE hyper-parameters that must agree for an adapter to mean the same thing in another model.
_LAYER_FIELDS = ("d_model", "d_ff", "num_experts", "top_k", "rank", "alpha", "activation", "context_dim",
                 "adapt", "router_type", "expert_type", "gated")
# What an adapter written before a field existed means by its absence.
_FIELD_DEFAULTS = {"gated": False}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors of `model` by name (what `save_adapter` writes)."""
    wanted = {id(p) for p in trainable_parameters(model, "warmup")}
    return {name: p for name, p in model.named_parameters() if id(p) in wanted}


def _layer_configs(model: nn.Module) -> dict[str, dict]:
    configs = {}
    for name, layer in model.named_modules():
        if isinstance(layer, DAMoE):
            configs[name] = {f: list(getattr(layer, f)) if f == "adapt" else getattr(layer, f) for f in _LAYER_FIELDS}
    return configs


def save_adapter(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the adapter of `model` to `path` (a .safetensors file), atomically.  Returns the path.

    An existing file is only replaced with overwrite=True.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tensors = {name: p.detach().contiguous().cpu() for name, p in adapter_tensors(model).items()}
    if not tensors:
        raise ValueError(f"{type(model).__name__} has no adapter tensors (no DA-MoE layer, router, context or "
                         "LayerNorm)")
    config = {"format": FORMAT, "version": FORMAT_VERSION, "model": type(model).__name__,
              "layers": _layer_configs(model)}
    with atomic_output(path) as temporary:
        save_file(tensors, str(temporary), metadata={_METADATA_KEY: json.dumps(config)})
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the config of an adapter file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if _METADATA_KEY not in metadata:
            raise ValueError(f"{path} is not a dasam3 adapter (no {_METADATA_KEY!r} metadata)")
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    config = json.loads(metadata[_METADATA_KEY])
    if config.get("format") != FORMAT or config.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}, got "
                         f"{config.get('format')!r} version {config.get('version')}")
    return tensors, config


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load an adapter file into `model` (in place) and return its config.

    The adapter must match the model exactly: a ValueError lists the tensors missing from the file,
    those the model does not have, those whose shapes differ, and DA-MoE layers whose
    hyper-parameters differ; nothing is loaded then.
    """
    tensors, config = read_adapter(path)
    targets = adapter_tensors(model)
    problems = _tensor_differences(targets, tensors) + _layer_differences(_layer_configs(model), config["layers"])
    if problems:
        raise ValueError(f"adapter {path} does not fit this {type(model).__name__}:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for name, param in targets.items():
            param.copy_(tensors[name])
    return config


def _tensor_differences(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> list[str]:
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    mismatched = [f"{n}: model {tuple(targets[n].shape)}, adapter {tuple(tensors[n].shape)}"
                  for n in sorted(set(targets) & set(tensors)) if targets[n].shape != tensors[n].shape]
    problems = []
    if missing:
        problems.append(f"missing from the adapter: {missing}")
    if unexpected:
        problems.append(f"unexpected (not in the model): {unexpected}")
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    return problems


def _layer_differences(model_layers: dict[str, dict], adapter_layers: dict[str, dict]) -> list[str]:
    problems = []
    for name in sorted(set(model_layers) & set(adapter_layers)):
        stored = {f: adapter_layers[name].get(f, _FIELD_DEFAULTS.get(f)) for f in _LAYER_FIELDS}
        differ = [f"{f} model={model_layers[name][f]!r} adapter={stored[f]!r}"
                  for f in _LAYER_FIELDS if model_layers[name][f] != stored[f]]
        if differ:
            problems.append(f"DA-MoE layer {name}: " + ", ".join(differ))
    return problems
