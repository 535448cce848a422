"""The trainer's objectives (research/toyworld_training/losses.py) on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from research.toyworld_training.losses import (
    NoiseLevelWeights,
    eot_objectness_loss,
    self_attention_coherence_loss,
    self_attention_grouping_loss,
    self_attention_separation_loss,
    slot_contrast_loss,
)


def test_noise_level_weights_equalise_each_bins_share():
    levels = NoiseLevelWeights(bins=4, num_timesteps=100, decay=0.5)
    t = torch.tensor([0, 30, 60, 99])
    assert torch.equal(levels.bin(t), torch.tensor([0, 1, 2, 3]))
    assert torch.equal(levels.weights(t), torch.ones(4))  # nothing seen yet: plain MSE
    mse = torch.tensor([0.4, 0.1, 0.02, 0.005])  # low noise is hard, high noise easy
    for _ in range(3):
        levels.update(t, mse)
    w = levels.weights(t)
    share = w * mse
    assert torch.allclose(share, share[0].expand(4))  # every noise level weighs the same
    assert w.mean().item() == pytest.approx(1.0)  # plain MSE's scale
    assert w[3] > w[0]  # the high-noise steps gain
    levels.update(torch.tensor([10]), torch.tensor([0.2]))  # running mean: 0.5 * 0.4 + 0.5 * 0.2
    assert levels.mean[0].item() == pytest.approx(0.3)
    fresh = NoiseLevelWeights(bins=4, num_timesteps=100, decay=0.5)
    fresh.load_state_dict(levels.state_dict())
    assert torch.equal(fresh.weights(t), levels.weights(t))
    fresh.update(torch.tensor([99]), torch.tensor([0.0]))  # a copy, not a view of the original's state
    assert not torch.equal(fresh.mean, levels.mean)


def test_slot_contrast_loss_ranks_the_candidate_with_the_lowest_masked_error():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    pred = eps[:, None].repeat(1, 3, 1, 1, 1) + 0.5  # every candidate off by 0.5 everywhere ...
    pred[0, 2] = eps[0]  # ... but scene 0's candidate 2 is exact
    pred[1, 0, :, 2:6, 2:6] = eps[1, :, 2:6, 2:6]  # and scene 1's candidate 0 is exact INSIDE the mask only
    loss, top1 = slot_contrast_loss(pred, eps, mask, torch.tensor([2, 0]))
    assert top1.item() == 1.0
    # the others' summed squared error inside the 4x4x4 mask is 64 x 0.25 = 16: logits (16 apart) -> ~e^-16
    assert loss.item() < 1e-6
    loss, top1 = slot_contrast_loss(pred, eps, mask, torch.tensor([1, 1]))
    assert top1.item() == 0.0 and loss.item() > 15.0
    # outside the mask nothing counts: scene 1's candidate 0, off by 0.5 there, scores as scene 0's exact one
    # (both 0 against 16 for the others: logits 1 apart at temperature 16)
    loss, _ = slot_contrast_loss(pred, eps, mask, torch.tensor([2, 0]), temperature=16.0)
    assert abs(loss.item() - float(torch.log(1 + 2 * torch.exp(torch.tensor(-1.0))))) < 1e-5


def test_slot_contrast_hinge_is_zero_past_the_margin_and_the_error_ratio_short_of_it():
    eps = torch.zeros(1, 4, 4, 4)
    mask = torch.ones(1, 1, 4, 4)
    # candidates off by 0.1, 0.2 and 0.4 everywhere: summed squared errors 0.64, 2.56, 10.24 (ratios 4 and 16)
    pred = torch.stack([torch.full((4, 4, 4), v) for v in (0.1, 0.2, 0.4)])[None].requires_grad_()
    # own slot 0 leads the next (slot 1) by log 4 = 1.386: past a margin of 1, so zero and no gradient
    loss, top1 = slot_contrast_loss(pred, eps, mask, torch.tensor([0]), margin=1.0)
    assert loss.item() == 0.0 and top1.item() == 1.0
    loss.backward()
    assert pred.grad.abs().sum().item() == 0.0
    # short of a margin of 2: 2 - log 4
    loss, _ = slot_contrast_loss(pred, eps, mask, torch.tensor([0]), margin=2.0)
    assert abs(loss.item() - (2.0 - float(np.log(4.0)))) < 1e-5
    # own slot 2 trails the best other (slot 0) by log 16: margin + log 16
    loss, top1 = slot_contrast_loss(pred, eps, mask, torch.tensor([2]), margin=1.0)
    assert abs(loss.item() - (1.0 + float(np.log(16.0)))) < 1e-5 and top1.item() == 0.0


def test_slot_contrast_own_only_has_the_same_value_and_moves_only_the_own_slot():
    eps = torch.zeros(1, 4, 4, 4)
    mask = torch.ones(1, 1, 4, 4)
    pred = torch.stack([torch.full((4, 4, 4), v) for v in (0.1, 0.2, 0.4)])[None].requires_grad_()
    for margin in (None, 1.0):
        full, _ = slot_contrast_loss(pred, eps, mask, torch.tensor([2]), margin=margin)
        (grad_full,) = torch.autograd.grad(full, pred)
        own, _ = slot_contrast_loss(pred, eps, mask, torch.tensor([2]), margin=margin, own_only=True)
        (grad_own,) = torch.autograd.grad(own, pred)
        assert abs(own.item() - full.item()) < 1e-6
        # the full loss also pushes the best other slot (0) away; own-only leaves every other slot alone
        assert grad_full[0, 0].abs().sum() > 0 and grad_own[0, :2].abs().sum().item() == 0.0
        # and pulls the own slot (0.4, above eps = 0) down exactly as the full loss does
        assert torch.allclose(grad_own[0, 2], grad_full[0, 2]) and (grad_own[0, 2] > 0).all()


def test_eot_objectness_loss_known_answers():
    labels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    labels[0, :4, :4] = 1  # object 1: the top-left quarter (a 2x2 block of the 4x4 map)
    labels[0, 4:, 4:] = 2  # object 2: the bottom-right quarter
    on_objects = torch.zeros(1, 4, 4)
    on_objects[0, :2, :2] = on_objects[0, 2:, 2:] = 1.0
    # objects hold all the mass: ratio 2 each (= the target, and 0.9 / coverage 0.5 = 1.8 caps it below 2),
    # and the background cells are at 0 < 0.5 x the mean: nothing to pull
    assert eot_objectness_loss(on_objects, labels).item() == pytest.approx(0.0, abs=1e-6)
    # a flat map: every ratio is 1 -> log(1.8) per object; every background cell is at 1 x the mean -> 0.5
    flat = torch.ones(1, 4, 4, requires_grad=True)
    loss = eot_objectness_loss(flat, labels)
    assert loss.item() == pytest.approx(np.log(1.8) + 0.5, rel=1e-5)
    loss.backward()
    assert flat.grad[0, 0, 0] < 0 < flat.grad[0, 0, 3]  # raise the objects, lower the background
    # only object 1 lit: object 2 (ratio 0) costs the clamped log, object 1 is fine
    one = torch.zeros(1, 4, 4)
    one[0, :2, :2] = 1.0
    assert eot_objectness_loss(one, labels).item() > eot_objectness_loss(on_objects, labels).item() + 1.0


def test_self_attention_grouping_loss_known_answers():
    labels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    labels[0, :4, :4] = 1  # the object: the top-left 2x2 cells of a 4x4 grid; 12 background cells
    obj = torch.zeros(16, dtype=torch.bool)
    obj[[0, 1, 4, 5]] = True
    grouped = torch.zeros(1, 16, 16)
    grouped[0][obj[:, None] & obj[None]] = 1 / 4  # object rows spread over the object
    grouped[0][~obj[:, None] & ~obj[None]] = 1 / 12  # background rows over the background
    assert self_attention_grouping_loss([grouped], labels).item() == pytest.approx(0.0, abs=1e-7)
    # uniform rows: object cells put 4/16 on the object (0.8 - 0.25 short), background cells 12/16 (0.05 short)
    uniform = torch.full((1, 16, 16), 1 / 16, requires_grad=True)
    loss = self_attention_grouping_loss([uniform], labels)
    assert loss.item() == pytest.approx((4 * 0.55 + 12 * 0.05) / 16, rel=1e-5)
    loss.backward()
    # more of an object row on the object lowers the loss; more of it on the background raises nothing
    assert uniform.grad[0, 0, 5] < 0 and uniform.grad[0, 0, 15] == 0
    # 2x2 grid, object = half of the top-left cell: that mixed cell is not scored; the 3 background cells
    # put 1/4 x (0.5 + 1 + 1 + 1) = 0.875 of their rows on the background (keys count by covered share)
    coarse = torch.full((1, 4, 4), 1 / 4)
    labels_half = torch.zeros(1, 8, 8, dtype=torch.uint8)
    labels_half[0, :2, :4] = 1
    assert self_attention_grouping_loss([coarse], labels_half).item() == pytest.approx(0.0, abs=1e-7)
    got = self_attention_grouping_loss([coarse], labels_half, target=0.9).item()
    assert got == pytest.approx(0.9 - 0.875, rel=1e-5)
    # layers are averaged
    both = self_attention_grouping_loss([grouped, uniform.detach()], labels).item()
    assert both == pytest.approx(loss.item() / 2, rel=1e-5)


def test_self_attention_coherence_loss_known_answers():
    labels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    labels[0, :4, :4] = 1  # the object: cells 0, 1, 4, 5 of a 4x4 grid
    obj = [0, 1, 4, 5]
    same = torch.full((1, 16, 16), 1 / 16)
    assert self_attention_coherence_loss(same, labels, 0.0).item() == pytest.approx(0.0, abs=1e-7)
    # two object rows peaked on different halves of a 2-cell support, two uniform over it: the mean row is
    # uniform over the 2 cells; each peaked row (0.9 / 0.1) is at symKL 0.5 * (0.4 ln 1.8 - 0.4 ln 0.2) from it
    rows = torch.full((1, 16, 16), 1 / 16)
    for i, (a, b) in zip(obj, [(0.9, 0.1), (0.1, 0.9), (0.5, 0.5), (0.5, 0.5)], strict=True):
        rows[0, i] = 0.0
        rows[0, i, 0], rows[0, i, 1] = a, b
    kl = 0.5 * (0.4 * np.log(1.8) - 0.4 * np.log(0.2))
    rows.requires_grad_(True)
    loss = self_attention_coherence_loss(rows, labels, 0.0, background=False)
    assert loss.item() == pytest.approx(2 * kl / 4, rel=1e-4)
    # the 12 uniform background rows equal their mean row: scored, they add 0 over 16 cells
    with_bg = self_attention_coherence_loss(rows.detach(), labels, 0.0).item()
    assert with_bg == pytest.approx(2 * kl / 16, rel=1e-4)
    loss.backward()
    assert rows.grad[0, 0, 0] > 0 > rows.grad[0, 0, 1]  # the peaked row is pulled towards the mean
    assert self_attention_coherence_loss(rows.detach(), labels, kl + 1e-3).item() == pytest.approx(
        0.0, abs=1e-7
    )


def test_self_attention_separation_loss_known_answers():
    labels = torch.zeros(2, 8, 8, dtype=torch.uint8)
    labels[:, :4, :4] = 1  # object 1: cells 0, 1, 4, 5 of a 4x4 grid
    labels[:, 4:, 4:] = 2  # object 2: cells 10, 11, 14, 15
    labels[1, 4:, 4:] = 0  # the second scene has one object: no pair
    same = torch.full((2, 16, 16), 1 / 16)
    # alike objects: symKL 0, the full margin
    assert self_attention_separation_loss(same, labels, 0.7).item() == pytest.approx(0.7, rel=1e-6)
    # object 1's rows on cell 0 (0.9) and cell 1 (0.1), object 2's the other way round: their means are at
    # symKL 0.5 * (0.8 ln 9 + 0.8 ln 9) = 0.8 ln 9
    rows = same.clone()
    for cells, (a, b) in (([0, 1, 4, 5], (0.9, 0.1)), ([10, 11, 14, 15], (0.1, 0.9))):
        rows[0, cells] = 0.0
        rows[0, cells, 0], rows[0, cells, 1] = a, b
    dist = 0.8 * np.log(9)
    rows.requires_grad_(True)
    loss = self_attention_separation_loss(rows, labels, dist + 0.5)
    assert loss.item() == pytest.approx(0.5, rel=1e-4)
    loss.backward()
    assert rows.grad[0, 0, 0] < 0 < rows.grad[0, 0, 1]  # object 1 is pushed further onto cell 0
    assert self_attention_separation_loss(rows.detach(), labels, dist - 0.1).item() == 0.0
