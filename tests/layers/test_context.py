"""ConceptContext: shapes, the stop-gradient on e_c, and a query that actually matters."""

from __future__ import annotations

import pytest
import torch

from dasam3.layers import ConceptContext


def test_output_is_attended_visual_context_then_the_detached_concept():
    module = ConceptContext(16, 6, pool=(4, 4), num_heads=4)
    concept = torch.randn(3, 6, requires_grad=True)
    visual = torch.randn(3, 9, 7, 16, requires_grad=True)
    context = module(concept, visual)
    assert context.shape == (3, 16 + 6) and module.out_dim == 22
    assert torch.equal(context[:, 16:], concept)
    (grad_concept,) = torch.autograd.grad(context[:, 16:].sum(), concept, retain_graph=True)
    assert (grad_concept == 0).all()  # stop-gradient on the raw embedding
    context[:, :16].sum().backward()
    assert concept.grad.abs().max() > 0 and visual.grad.abs().max() > 0


def test_the_query_changes_the_attention_over_the_pooled_grid():
    """With a single pooled key attention ignores its query (the published code's defect); a grid does not."""
    torch.manual_seed(0)
    visual = torch.randn(1, 8, 8, 16).expand(2, -1, -1, -1)
    concepts = torch.randn(2, 6)
    grid = ConceptContext(16, 6, pool=(4, 4), num_heads=4)
    single = ConceptContext(16, 6, pool=(1, 1), num_heads=4)
    single.load_state_dict(grid.state_dict())
    out_grid, out_single = grid(concepts, visual)[:, :16], single(concepts, visual)[:, :16]
    assert torch.allclose(out_single[0], out_single[1], atol=1e-6)
    assert not torch.allclose(out_grid[0], out_grid[1], atol=1e-3)


def test_bad_shapes_are_value_errors():
    with pytest.raises(ValueError, match=r"num_heads must divide d_model=16, got num_heads=5"):
        ConceptContext(16, 6, num_heads=5)
    module = ConceptContext(16, 6, num_heads=4)
    with pytest.raises(ValueError, match=r"concept must be \[B, 6\], got shape \(2, 5\)"):
        module(torch.randn(2, 5), torch.randn(2, 4, 4, 16))
    with pytest.raises(ValueError, match=r"visual must be \[B=2, H, W, 16\], got shape \(2, 16, 4, 4\)"):
        module(torch.randn(2, 6), torch.randn(2, 16, 4, 4))
