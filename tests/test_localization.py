"""Localization on constructed attention matrices with planted concepts (known answers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusers_conceptexpress.localization import (
    LocalizationConfig,
    eot_scores,
    find_eot_index,
    localize,
    select_level,
)

H = W = 16


def planted_scene(seed=0, noise=0.3, eps=0.05, low_eot_region=None):
    """Background (0) and three non-touching objects; rows attend uniformly within their region."""
    g = torch.Generator().manual_seed(seed)
    region = torch.zeros(H, W, dtype=torch.long)
    region[2:7, 2:7] = 1
    region[9:14, 3:8] = 2
    region[4:12, 10:14] = 3
    onehot = F.one_hot(region.flatten(), 4).float()
    same = onehot @ onehot.T
    rows = (1 - eps) * same / same.sum(1, keepdim=True) + eps / (H * W)
    rows = rows * (1 + noise * torch.rand(H * W, H * W, generator=g))
    rows = rows / rows.sum(1, keepdim=True)
    eot = torch.where(region > 0, 1.0, 0.2) + 0.05 * torch.rand(H, W, generator=g)
    if low_eot_region is not None:
        eot[region == low_eot_region] = 0.2
    return rows, eot, region


def region_of(mask, region):
    values = region[mask].unique()
    assert values.numel() == 1, f"mask mixes regions {values.tolist()}"
    return int(values)


@pytest.mark.parametrize("seed", range(3))
def test_planted_objects_recovered_and_background_dropped(seed):
    rows, eot, region = planted_scene(seed)
    result = localize(rows, (H, W), eot)
    assert result.masks.shape == (3, H, W)
    found = {region_of(m, region): m for m in result.masks}
    assert set(found) == {1, 2, 3}
    for r, m in found.items():
        assert torch.equal(m, region == r)
    assert (result.masks.sum(0) <= 1).all()  # disjoint
    assert torch.all(result.scores > 1.0)
    assert list(result.scores) == sorted(result.scores.tolist(), reverse=True)
    torch.testing.assert_close(result.features.sum((1, 2)), torch.ones(3))
    assert result.level is not None and result.cluster_counts[result.level] >= 10
    assert result.notes == []


def test_low_eot_group_is_dropped():
    rows, eot, region = planted_scene(0, low_eot_region=3)
    result = localize(rows, (H, W), eot)
    assert sorted(region_of(m, region) for m in result.masks) == [1, 2]


def test_post_clustering_merges_fragments_of_one_object():
    rows, eot, _ = planted_scene(1)
    raw = localize(rows, (H, W), eot, LocalizationConfig(post_clustering=False))
    merged = localize(rows, (H, W), eot)
    assert raw.masks.shape[0] > 3  # the chosen FINCH level has >= 10 clusters: objects come in fragments
    assert merged.masks.shape[0] == 3
    assert merged.merge_counts[0] == raw.masks.shape[0] and merged.merge_counts[-1] == 3


def test_plain_finch_and_kmeans_localizers():
    rows, eot, region = planted_scene(2)
    plain = localize(rows, (H, W), eot, LocalizationConfig(method="finch"))
    assert plain.masks.shape[0] == plain.cluster_counts[plain.level] >= 10
    assert plain.masks.sum(0).eq(1).all()  # every pixel in exactly one cluster, background included
    km = localize(
        rows,
        (H, W),
        eot,
        LocalizationConfig(method="kmeans", num_concepts=4),
        torch.Generator().manual_seed(0),
    )
    assert km.masks.shape[0] == 4
    assert sorted(region_of(m, region) for m in km.masks) == [0, 1, 2, 3]


def test_fallback_when_no_level_reaches_min_clusters():
    # Two groups of identical rows: FINCH's first level already has only 2 clusters (< 10).
    region = torch.zeros(H, W, dtype=torch.long)
    region[:, W // 2 :] = 1
    onehot = F.one_hot(region.flatten(), 2).float()
    same = onehot @ onehot.T
    rows = 0.9 * same / same.sum(1, keepdim=True) + 0.1 / (H * W)
    eot = torch.where(region > 0, 1.0, 0.1)
    result = localize(rows, (H, W), eot)
    assert result.cluster_counts[0] == 2 and result.level == 0
    assert any("No clustering level had >= 10" in note for note in result.notes)
    assert result.masks.shape[0] == 1 and torch.equal(result.masks[0], region == 1)


def test_filter_keeps_best_cluster_when_it_would_drop_everything():
    rows, _, _ = planted_scene(0)
    result = localize(rows, (H, W), torch.ones(H, W))  # constant EOT: every score is 1.0, none > 1
    assert result.masks.shape[0] >= 1
    assert any("kept the best-scoring cluster" in note for note in result.notes)


def test_select_level_rule():
    assert select_level([120, 40, 12, 9, 3]) == (2, None)
    assert select_level([40, 10, 2]) == (1, None)
    level, note = select_level([8, 3, 1])
    assert level == 0 and "finest" in note
    assert select_level([50, 20, 11]) == (2, None)  # every level >= 10: the last one


def test_eot_scores_known_answer():
    eot = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    masks = torch.tensor([[[False, True], [False, True]], [[True, False], [True, False]]])
    torch.testing.assert_close(eot_scores(eot, masks), torch.tensor([2.0, 0.0]))


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([49406, 49407, 49407, 49407], 1),  # SD 1.x: padded with eos
        ([49406, 49407, 0, 0], 1),  # SD 2.x: padded with "!" (id 0)
        ([49406, 320, 1125, 49407, 0], 3),
    ],
)
def test_find_eot_index(ids, expected):
    assert find_eot_index(ids, 49407) == expected


def test_config_validation():
    with pytest.raises(ValueError, match="num_concepts"):
        LocalizationConfig(method="kmeans")
    with pytest.raises(ValueError, match="only used by method='kmeans'"):
        LocalizationConfig(num_concepts=3)
    with pytest.raises(ValueError, match="Unknown localization method"):
        LocalizationConfig(method="sam")
    with pytest.raises(ValueError, match="Unknown distance"):
        LocalizationConfig(distance="l1")
