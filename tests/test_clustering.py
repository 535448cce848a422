"""FINCH, constrained post-clustering and K-means on constructed data with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_conceptexpress.clustering import (
    connected_components,
    constrained_finch,
    finch,
    first_neighbours,
    kmeans,
    masks_touch,
    pairwise_distance,
)


def same_partition(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return bool(((a[:, None] == a[None, :]) == (b[:, None] == b[None, :])).all())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_first_level_matches_published_finch(seed):
    pytest.importorskip("finch", reason="finch-clust is a test dependency ([test] extra)")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from finch import FINCH
    rng = np.random.default_rng(seed)
    n, d = [(300, 16), (500, 8), (200, 32), (400, 4)][seed]
    x = rng.normal(size=(n, d)).astype(np.float32) + rng.integers(0, 3, size=(n, 1)) * 2.0
    ref, ref_counts, _ = FINCH(x, distance="cosine", verbose=False)
    ours = finch(torch.from_numpy(x), "cosine")
    assert same_partition(ours.levels[0].labels.numpy(), ref[:, 0])
    assert ours.num_clusters[0] == ref_counts[0]


def test_symmetric_kl_matches_direct_formula():
    p = torch.rand(5, 7).softmax(-1)
    q = torch.rand(3, 7).softmax(-1)
    kl = lambda a, b: (a * (a / b).log()).sum()  # noqa: E731
    direct = torch.tensor([[0.5 * (kl(a, b) + kl(b, a)) for b in q] for a in p])
    torch.testing.assert_close(pairwise_distance(p, q), direct, atol=1e-5, rtol=1e-4)
    nn, dist = first_neighbours(p, block_size=2)
    full = pairwise_distance(p) + torch.eye(5) * 1e9
    assert torch.equal(nn, full.argmin(1))
    torch.testing.assert_close(dist, full.min(1).values, atol=1e-5, rtol=1e-4)


def test_connected_components_known_graph():
    src = torch.tensor([0, 2, 5, 6])
    dst = torch.tensor([1, 3, 2, 7])
    labels = connected_components(9, src, dst)
    assert labels.tolist() == [0, 0, 1, 1, 2, 1, 3, 3, 4]


def test_finch_threshold_counts_mutual_links_twice_and_shared_neighbours():
    # 1-D points: 0 <-> 1 mutual (d=1, weight 2), 3 -> 1 (d=2), 10 <-> 10.5 mutual (d=0.5, weight 2),
    # 0 and 3 share first neighbour 1 (d=3): tau = max(2, 2, 1, 3) = 3.
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0], [10.5]])
    tree = finch(x, "euclidean")
    assert tree.levels[0].labels.tolist() == [0, 0, 0, 1, 1]
    assert tree.levels[0].threshold == pytest.approx(3.0)
    assert tree.num_clusters == [2, 1]


def test_finch_recovers_planted_distributions():
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(4, 50, generator=g).mul(4).softmax(-1)
    labels = torch.arange(4).repeat_interleave(30)
    rows = (centres[labels] * (1 + 0.05 * torch.rand(120, 50, generator=g))).clamp_min(1e-6)
    rows = rows / rows.sum(-1, keepdim=True)
    tree = finch(rows)
    counts = tree.num_clusters
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == len(counts)
    # Levels are nested: a cluster of level l+1 is a union of clusters of level l.
    for fine, coarse in zip(tree.levels, tree.levels[1:], strict=False):
        for c in fine.labels.unique():
            assert coarse.labels[fine.labels == c].unique().numel() == 1
    # The last level with >= 4 clusters is pure: no cluster mixes two planted distributions.
    level = [lv for lv in tree.levels if lv.num_clusters >= 4][-1]
    for c in level.labels.unique():
        assert labels[level.labels == c].unique().numel() == 1


def test_masks_touch_4_connectivity():
    m = torch.zeros(3, 4, 4, dtype=torch.bool)
    m[0, 0, 0] = True
    m[1, 0, 1] = True  # 4-neighbour of mask 0
    m[2, 1, 2] = True  # only diagonal to mask 1
    t = masks_touch(m)
    assert t[0, 1] and t[1, 0]
    assert not t[1, 2] and not t[0, 2]
    assert t.diagonal().all()


def _two_regions(touching: bool):
    masks = torch.zeros(2, 6, 6, dtype=torch.bool)
    masks[0, :, :2] = True
    if touching:
        masks[1, :, 2:4] = True
    else:
        masks[1, :, 4:] = True
    return masks


def test_constrained_finch_merges_close_touching_clusters_only():
    close = torch.tensor([[0.5, 0.3, 0.2], [0.49, 0.31, 0.2]])
    labels, merged, counts = constrained_finch(close, _two_regions(touching=True), threshold=1.0)
    assert labels.tolist() == [0, 0] and merged.shape[0] == 1 and counts == [2, 1]
    assert torch.equal(merged[0], _two_regions(True).any(0))
    labels, merged, counts = constrained_finch(close, _two_regions(touching=False), threshold=1.0)
    assert labels.tolist() == [0, 1] and merged.shape[0] == 2
    labels, _, _ = constrained_finch(close, _two_regions(touching=True), threshold=1e-6)
    assert labels.tolist() == [0, 1]  # above the threshold: no merge


def test_kmeans_recovers_blobs_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    x = centres[truth] + torch.randn(60, 2, generator=g)
    a = kmeans(x, 3, generator=torch.Generator().manual_seed(1))
    b = kmeans(x, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert same_partition(a, truth)
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x, 61)
