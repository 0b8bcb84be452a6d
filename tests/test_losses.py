"""The segmentation loss against MONAI's DiceFocalLoss(sigmoid=True)."""

from __future__ import annotations

import pytest
import torch

from dasam3.losses import dice_loss, focal_loss, segmentation_loss

monai_losses = pytest.importorskip("monai.losses")


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 1, 9, 7), (4, 2, 5, 6, 3)])
def test_equals_monai_dice_focal(shape):
    logits = 3 * torch.randn(shape, requires_grad=True)
    targets = (torch.rand(shape) > 0.7).float()
    targets[0, 0] = 0  # an absent concept: MONAI's smoothing decides its Dice term
    expected = monai_losses.DiceFocalLoss(sigmoid=True)(logits, targets)
    actual = segmentation_loss(logits, targets)
    assert torch.allclose(actual, expected, atol=1e-6)
    grad_actual, = torch.autograd.grad(actual, logits)
    grad_expected, = torch.autograd.grad(expected, logits)
    assert torch.allclose(grad_actual, grad_expected, atol=1e-6)


def test_terms_equal_monai_separately():
    logits, targets = torch.randn(3, 2, 8, 8) * 5, (torch.rand(3, 2, 8, 8) > 0.5).float()
    assert torch.allclose(dice_loss(logits, targets), monai_losses.DiceLoss(sigmoid=True)(logits, targets), atol=1e-6)
    assert torch.allclose(focal_loss(logits, targets), monai_losses.FocalLoss()(logits, targets), atol=1e-6)


def test_perfect_prediction_has_near_zero_loss_and_shape_mismatch_is_an_error():
    targets = (torch.rand(2, 2, 8, 8) > 0.5).float()
    assert segmentation_loss(40 * (2 * targets - 1), targets) < 1e-4
    with pytest.raises(ValueError, match=r"same shape .*\(2, 2, 8, 8\) and \(2, 1, 8, 8\)"):
        segmentation_loss(torch.zeros(2, 2, 8, 8), torch.zeros(2, 1, 8, 8))
