"""Clustering on attention maps: FINCH, constrained FINCH (post-clustering) and K-means.

Everything is a handful of torch operations and runs on whatever device the input lives on.

FINCH (first-neighbour clustering, Sarfraz et al., CVPR 2019) links every sample to its nearest neighbour;
the connected components of that graph are the clusters of the first level. The next level repeats this on
the cluster means (unweighted mean of the member samples), until the number of clusters stops decreasing
or reaches one. The graph of the paper also links two samples that share their first neighbour; this does
not change the components (both are linked to that neighbour), but it does matter for the per-level
threshold ``tau`` that ConceptExpress reads off each level, so those links are taken into account there.

Written from the FINCH paper; no code of the published implementation is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "DISTANCES",
    "FinchLevel",
    "FinchResult",
    "cluster_means",
    "connected_components",
    "constrained_finch",
    "finch",
    "first_neighbours",
    "kmeans",
    "masks_touch",
    "pairwise_distance",
    "union_masks",
]

_EPS = 1e-12


def _symmetric_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Symmetric KL divergence 0.5 * (KL(x||y) + KL(y||x)) between the rows of ``x`` (n, d) and ``y`` (m, d).

    Rows are probability distributions. Uses 0.5 * sum_k (x_k - y_k)(log x_k - log y_k), computed with two
    matrix products. Returns (n, m), non-negative.
    """
    lx = x.clamp_min(_EPS).log()
    ly = y.clamp_min(_EPS).log()
    self_x = (x * lx).sum(-1, keepdim=True)  # (n, 1)
    self_y = (y * ly).sum(-1, keepdim=True).T  # (1, m)
    d = self_x + self_y - x @ ly.T - lx @ y.T
    return d.mul_(0.5).clamp_min_(0.0)


def _cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine distance 1 - cos(x_i, y_j), (n, m)."""
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    yn = y / y.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return (1.0 - xn @ yn.T).clamp_min_(0.0)


def _euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distance, (n, m)."""
    return torch.cdist(x, y)


DISTANCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "symmetric_kl": _symmetric_kl,
    "cosine": _cosine,
    "euclidean": _euclidean,
}


def pairwise_distance(
    x: torch.Tensor, y: torch.Tensor | None = None, metric: str = "symmetric_kl"
) -> torch.Tensor:
    """Distance between every row of ``x`` (n, d) and every row of ``y`` (m, d; default ``x``), shape (n, m).

    ``metric`` is one of :data:`DISTANCES`: "symmetric_kl" (rows are probability distributions), "cosine"
    (1 - cosine similarity) or "euclidean".
    """
    if metric not in DISTANCES:
        raise ValueError(f"Unknown distance {metric!r}; choose one of {sorted(DISTANCES)}.")
    x = x.float()
    return DISTANCES[metric](x, x if y is None else y.float())


class _Rows:
    """Rows of a matrix with what a metric needs precomputed once (logs and entropies for symmetric KL)."""

    def __init__(self, x: torch.Tensor, metric: str) -> None:
        if metric not in DISTANCES:
            raise ValueError(f"Unknown distance {metric!r}; choose one of {sorted(DISTANCES)}.")
        self.x, self.metric = x.float(), metric
        if metric == "symmetric_kl":
            self.log = self.x.clamp_min(_EPS).log_()
            self.neg_entropy = torch.einsum("ij,ij->i", self.x, self.log)

    def distance_to_all(self, rows: slice) -> torch.Tensor:
        """Distances of ``x[rows]`` to every row, (len(rows), n)."""
        if self.metric != "symmetric_kl":
            return pairwise_distance(self.x[rows], self.x, self.metric)
        x, lx = self.x, self.log
        d = self.neg_entropy[rows, None] + self.neg_entropy[None, :]
        d -= x[rows] @ lx.T
        d -= lx[rows] @ x.T
        return d.mul_(0.5).clamp_min_(0.0)


def first_neighbours(
    x: torch.Tensor, metric: str = "symmetric_kl", block_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and distance of every row's nearest other row.

    Computed in blocks of ``block_size`` rows, so the full (n, n) distance matrix never exists (memory:
    one (block_size, n) block, plus one (n, d) log matrix for symmetric KL).

    Args:
        x: (n, d) samples, n >= 2.
    Returns:
        ``(neighbour, distance)``, both (n,): long indices and float distances.
    """
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"first_neighbours needs at least 2 samples, got {n}.")
    rows_ = _Rows(x, metric)
    nn_idx = torch.empty(n, dtype=torch.long, device=x.device)
    nn_dist = torch.empty(n, dtype=torch.float32, device=x.device)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        d = rows_.distance_to_all(slice(start, stop))
        r = torch.arange(stop - start, device=x.device)
        d[r, r + start] = float("inf")
        nn_dist[start:stop], nn_idx[start:stop] = d.min(dim=1)
        del d
    return nn_idx, nn_dist


def connected_components(num_nodes: int, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Connected components of an undirected graph given by edge lists, by min-label propagation.

    Args:
        num_nodes: number of nodes n.
        src, dst: (e,) long tensors, edges ``src[i] -- dst[i]``.
    Returns:
        (n,) long labels in 0..c-1, numbered in order of each component's smallest node index.
    """
    device = src.device
    labels = torch.arange(num_nodes, device=device)
    if src.numel() > 0:
        a = torch.cat([src, dst])
        b = torch.cat([dst, src])
        while True:
            # Each node takes the smallest label among itself and its neighbours, then jumps pointers.
            new = labels.scatter_reduce(0, a, labels[b], reduce="amin")
            new = new[new]
            if torch.equal(new, labels):
                break
            labels = new
    return torch.unique(labels, return_inverse=True)[1]


def cluster_means(x: torch.Tensor, labels: torch.Tensor, num_clusters: int | None = None) -> torch.Tensor:
    """Unweighted mean of the rows of ``x`` (n, d) in each cluster of ``labels`` (n,), shape (c, d)."""
    c = int(labels.max()) + 1 if num_clusters is None else num_clusters
    sums = torch.zeros(c, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=c).clamp_min(1).to(x.dtype)
    return sums / counts[:, None]


def _finch_edges(nn_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first-neighbour edges i -> nn(i) and their weight in FINCH's adjacency: 2 if mutual, else 1."""
    src = torch.arange(nn_idx.numel(), device=nn_idx.device)
    mutual = nn_idx[nn_idx] == src
    return src, nn_idx, 1.0 + mutual.float()


def _level_threshold(
    x: torch.Tensor,
    nn_idx: torch.Tensor,
    nn_dist: torch.Tensor,
    metric: str,
    keep: torch.Tensor | None = None,
) -> float:
    """ConceptExpress's per-level threshold: max over the level's links of A_ij * d_ij.

    A_ij is 2 for mutual first neighbours, 1 for one-way first neighbours and for pairs that share their
    first neighbour. ``keep`` (n,) optionally marks which first-neighbour links survived (post-clustering);
    shared-neighbour links count only when both of their first-neighbour links survived.
    """
    _, _, weight = _finch_edges(nn_idx)
    if keep is None:
        keep = torch.ones_like(nn_idx, dtype=torch.bool)
    if not bool(keep.any()):
        return 0.0
    tau = float((weight * nn_dist)[keep].max())
    # Pairs sharing a first neighbour: distances within each group of the same neighbour.
    members = torch.nonzero(keep).flatten()
    targets = nn_idx[members]
    counts = torch.bincount(targets, minlength=nn_idx.numel())
    for hub in torch.nonzero(counts > 1).flatten().tolist():
        group = members[targets == hub]
        if group.numel() > 1:
            d = pairwise_distance(x[group], x[group], metric)
            # the diagonal is 0 and never the max unless all are 0
            tau = max(tau, float(d.max()))
    return tau


@dataclass
class FinchLevel:
    """One level of a FINCH hierarchy.

    Attributes:
        labels: (n,) long cluster index of every ORIGINAL sample at this level.
        num_clusters: number of clusters c at this level.
        threshold: max over this level's links of A_ij * d_ij (see :func:`finch`), in distance units.
    """

    labels: torch.Tensor
    num_clusters: int
    threshold: float


@dataclass
class FinchResult:
    """All levels of a FINCH run, finest first."""

    levels: list[FinchLevel] = field(default_factory=list)

    @property
    def num_clusters(self) -> list[int]:
        """Cluster count of every level, finest first."""
        return [level.num_clusters for level in self.levels]


def finch(
    x: torch.Tensor,
    metric: str = "symmetric_kl",
    *,
    max_levels: int | None = None,
    block_size: int = 512,
) -> FinchResult:
    """FINCH hierarchical clustering of the rows of ``x``.

    Level 0 clusters the samples; every further level clusters the means of the previous level's clusters
    (means of the original member rows). The run stops when the count stops decreasing or reaches 1; the
    non-improving level is not returned.

    Every level records ``threshold``: the largest A_ij * d_ij over the links that formed it, where A_ij is
    2 for mutual first neighbours and 1 for the other links (one-way first neighbour, shared first
    neighbour), as the ConceptExpress reference implementation reads it.

    Args:
        x: (n, d) samples; for "symmetric_kl" every row must be a probability distribution.
        metric: a key of :data:`DISTANCES`.
        max_levels: stop after this many levels (default: no limit).
        block_size: rows per block when searching first neighbours (memory ~ block_size * n floats).
    Returns:
        :class:`FinchResult` with at least one level (a single sample gives one level with one cluster).
    """
    if x.ndim != 2:
        raise ValueError(f"finch expects a 2-D (samples, features) tensor, got shape {tuple(x.shape)}.")
    n = x.shape[0]
    x = x.float()
    result = FinchResult()
    if n < 2:
        result.levels.append(FinchLevel(torch.zeros(n, dtype=torch.long, device=x.device), n, 0.0))
        return result
    labels = torch.arange(n, device=x.device)
    points = x
    while points.shape[0] > 1:
        nn_idx, nn_dist = first_neighbours(points, metric, block_size)
        src, dst, _ = _finch_edges(nn_idx)
        group = connected_components(points.shape[0], src, dst)
        c = int(group.max()) + 1
        if c >= points.shape[0]:  # no merge: count stopped decreasing
            break
        threshold = _level_threshold(points, nn_idx, nn_dist, metric)
        labels = group[labels]
        result.levels.append(FinchLevel(labels, c, threshold))
        if c == 1 or (max_levels is not None and len(result.levels) >= max_levels):
            break
        points = cluster_means(x, labels, c)
    if not result.levels:  # cannot happen for n >= 2 (first-neighbour graph always merges), kept for safety
        result.levels.append(FinchLevel(torch.arange(n, device=x.device), n, 0.0))
    return result


def masks_touch(masks: torch.Tensor) -> torch.Tensor:
    """Which pairs of binary masks touch or overlap under 4-connectivity.

    Args:
        masks: (k, h, w) bool masks.
    Returns:
        (k, k) bool matrix, True where mask i has a pixel that is 4-adjacent to (or the same as) a pixel of
        mask j. The diagonal is True for non-empty masks.
    """
    m = masks.float()
    grown = m.clone()
    grown[:, 1:, :] = torch.maximum(grown[:, 1:, :], m[:, :-1, :])
    grown[:, :-1, :] = torch.maximum(grown[:, :-1, :], m[:, 1:, :])
    grown[:, :, 1:] = torch.maximum(grown[:, :, 1:], m[:, :, :-1])
    grown[:, :, :-1] = torch.maximum(grown[:, :, :-1], m[:, :, 1:])
    k = masks.shape[0]
    return (grown.reshape(k, -1) @ m.reshape(k, -1).T) > 0


def union_masks(masks: torch.Tensor, labels: torch.Tensor, num_groups: int | None = None) -> torch.Tensor:
    """Union of the (k, h, w) bool ``masks`` within each group of ``labels`` (k,), shape (g, h, w)."""
    g = int(labels.max()) + 1 if num_groups is None else num_groups
    onehot = torch.zeros(g, masks.shape[0], device=masks.device)
    onehot[labels, torch.arange(masks.shape[0], device=masks.device)] = 1.0
    return (onehot @ masks.reshape(masks.shape[0], -1).float()).reshape(g, *masks.shape[1:]) > 0


def constrained_finch(
    features: torch.Tensor,
    masks: torch.Tensor,
    threshold: float,
    metric: str = "symmetric_kl",
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """ConceptExpress post-clustering: FINCH on clusters, with links cut by distance and adjacency.

    Each item is a cluster with a soft feature (a distribution over pixels) and a binary mask. At every
    level, each item links to its first neighbour, but a link i-j is removed when d(i, j) > ``threshold``
    or when the masks of i and j do not touch (4-connectivity). Connected components merge: masks are
    unioned and features averaged (unweighted mean of the member items' ORIGINAL features). Levels repeat
    until nothing merges.

    Args:
        features: (k, d) soft features.
        masks: (k, h, w) bool masks.
        threshold: merge threshold in distance units (tau of the chosen pre-clustering level).
    Returns:
        ``(labels, merged_masks, counts)``: (k,) long group of each input item; (g, h, w) bool union masks;
        the item count after every level, starting with k.
    """
    k = features.shape[0]
    feats = features.float()
    labels = torch.arange(k, device=features.device)
    cur_feats, cur_masks = feats, masks.bool()
    counts = [k]
    while cur_feats.shape[0] > 1:
        nn_idx, nn_dist = first_neighbours(cur_feats, metric)
        touch = masks_touch(cur_masks)
        src = torch.arange(cur_feats.shape[0], device=feats.device)
        keep = (nn_dist <= threshold) & touch[src, nn_idx]
        group = connected_components(cur_feats.shape[0], src[keep], nn_idx[keep])
        g = int(group.max()) + 1
        if g == cur_feats.shape[0]:
            break
        labels = group[labels]
        counts.append(g)
        cur_feats = cluster_means(feats, labels, g)
        cur_masks = union_masks(masks, labels, g)
    return labels, cur_masks, counts


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    *,
    num_iters: int = 100,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """K-means (Euclidean, k-means++ initialisation) of the rows of ``x`` (n, d); returns (n,) labels.

    Clusters are renumbered by their smallest sample index, so equal partitions give equal labels.
    ``generator`` (a CPU generator) seeds the initialisation: same seed, same result.
    """
    n = x.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"kmeans needs 1 <= num_clusters <= {n} samples, got num_clusters={num_clusters}.")
    x = x.float()
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(-1)
    for _ in range(1, num_clusters):
        probs = d2.cpu() / d2.sum().cpu() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n)
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        centres.append(x[nxt])
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(-1))
    c = torch.stack(centres)
    labels = torch.cdist(x, c).argmin(1)
    for _ in range(num_iters):
        new_c = cluster_means(x, labels, num_clusters)
        empty = torch.bincount(labels, minlength=num_clusters) == 0
        new_c[empty] = c[empty]
        new_labels = torch.cdist(x, new_c).argmin(1)
        c = new_c
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    # canonical numbering: order of first appearance
    return torch.unique(_first_index(labels), return_inverse=True)[1]


def _first_index(labels: torch.Tensor) -> torch.Tensor:
    """Replace every label by the index of the first sample that carries it."""
    n = labels.numel()
    first = torch.full((int(labels.max()) + 1,), n, dtype=torch.long, device=labels.device)
    first.scatter_reduce_(0, labels, torch.arange(n, device=labels.device), reduce="amin")
    return first[labels]
