"""Concept localization: from aggregated self-attention and the [EOT] map to concept masks.

The method and every choice made where the paper is silent: docs/design.md, 'Localization'.

This module holds the algorithm on tensors; :class:`~diffusers_conceptexpress.ConceptExpressPipeline`
produces the attention (one UNet pass) and calls :func:`localize`.

Localizers:

- ``"conceptexpress"`` (default): FINCH pre-clustering of the self-attention rows with symmetric KL, the
  automatic stopping point (last level with >= ``min_clusters`` clusters), the [EOT] background filter
  (keep clusters whose mean EOT attention exceeds ``eot_threshold`` x the image mean) and the constrained
  post-clustering (merge first neighbours closer than the level's threshold whose masks touch).
- ``"finch"``: plain FINCH with the same stopping point; every cluster is a concept (no filter, no merge).
- ``"kmeans"``: K-means with a given ``num_concepts`` on the self-attention rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .attention import SELF_ATTENTION_WEIGHTINGS
from .clustering import DISTANCES, cluster_means, constrained_finch, finch, kmeans

__all__ = [
    "LOCALIZERS",
    "LocalizationConfig",
    "LocalizationResult",
    "eot_scores",
    "find_eot_index",
    "localize",
    "select_level",
]

LOCALIZERS = ("conceptexpress", "finch", "kmeans")
LATENT_SAMPLING = ("mean", "sample")


@dataclass
class LocalizationConfig:
    """Options of concept localization; defaults are the ConceptExpress authors'.

    Attributes:
        method: "conceptexpress", "finch" or "kmeans" (see the module docstring).
        num_concepts: number of concepts K, required by (and only used by) "kmeans".
        resolution: side of the model input in pixels (default: the UNet's ``sample_size`` x the VAE factor,
            512 for SD 2.1-base, 1024 for SDXL).
        resize_policy: "squash" (authors: resize to resolution x resolution, aspect ratio not kept) or
            "keep_aspect" (same area, aspect ratio kept, sides rounded to what the UNet accepts).
        timestep: UNet timestep of the single localization pass on the clean latent (authors: 0).
        latent_sampling: "mean" of the VAE posterior (deterministic) or a "sample" (uses ``generator``).
        self_attention_weighting: layer weighting of the aggregation, see
            :class:`~diffusers_conceptexpress.attention.AttentionRecorder` ("reference" = authors').
        self_attention_factors: downsampling factors (1 = latent grid, 2, 4, 8) of the self-attention layers
            to aggregate; None = all (authors).
        eot_factor: downsampling factor of the cross-attention layers whose [EOT] map is used (authors: 4,
            the 16x16 layers of SD at 512 px; the 32x32 layers of SDXL at 1024 px, the same image fraction);
            the nearest recorded factor is used when the UNet has no cross-attention there (tiny models).
        distance: FINCH distance between attention rows ("symmetric_kl", authors).
        min_clusters: stopping point: the last FINCH level with at least this many clusters (authors: 10).
        eot_threshold: keep clusters whose EOT score (mean inside / mean over image) is above this (1.0).
        post_clustering: run the constrained post-clustering (threshold + 4-connectivity).
        chunk_bytes: memory budget of one chunk of attention probabilities during capture.
    """

    method: str = "conceptexpress"
    num_concepts: int | None = None
    resolution: int | None = None
    resize_policy: str = "squash"
    timestep: int = 0
    latent_sampling: str = "mean"
    self_attention_weighting: str = "reference"
    self_attention_factors: Sequence[int] | None = None
    eot_factor: int = 4
    distance: str = "symmetric_kl"
    min_clusters: int = 10
    eot_threshold: float = 1.0
    post_clustering: bool = True
    chunk_bytes: int = 2 * 2**20

    def __post_init__(self) -> None:
        if self.method not in LOCALIZERS:
            raise ValueError(f"Unknown localization method {self.method!r}; choose one of {LOCALIZERS}.")
        if self.method == "kmeans":
            if self.num_concepts is None or int(self.num_concepts) < 1:
                raise ValueError('method="kmeans" needs num_concepts=K (a positive integer).')
        elif self.num_concepts is not None:
            raise ValueError(
                f"num_concepts is only used by method='kmeans'; {self.method!r} finds the number of concepts "
                "itself. Remove num_concepts or use method='kmeans'."
            )
        if self.distance not in DISTANCES:
            raise ValueError(f"Unknown distance {self.distance!r}; choose one of {sorted(DISTANCES)}.")
        if self.self_attention_weighting not in SELF_ATTENTION_WEIGHTINGS:
            raise ValueError(
                f"Unknown self_attention_weighting {self.self_attention_weighting!r}; "
                f"choose one of {SELF_ATTENTION_WEIGHTINGS}."
            )
        if self.latent_sampling not in LATENT_SAMPLING:
            raise ValueError(
                f"Unknown latent_sampling {self.latent_sampling!r}; choose one of {LATENT_SAMPLING}."
            )
        if self.min_clusters < 1:
            raise ValueError(f"min_clusters must be >= 1, got {self.min_clusters}.")
        if self.resolution is not None and self.resolution <= 0:
            raise ValueError(f"resolution must be a positive number of pixels, got {self.resolution}.")
        if self.eot_factor < 1:
            raise ValueError(f"eot_factor must be a positive downsampling factor, got {self.eot_factor}.")

    def to_dict(self) -> dict:
        """Plain-JSON view of the options (for result files)."""
        d = asdict(self)
        if d["self_attention_factors"] is not None:
            d["self_attention_factors"] = list(d["self_attention_factors"])
        return d


@dataclass
class LocalizationResult:
    """Concepts on the latent grid (h x w), as tensors.

    Attributes:
        labels: (h, w) long concept index of every latent pixel, -1 where no concept (background).
        masks: (K, h, w) bool, disjoint.
        features: (K, h, w) float soft maps (mean self-attention rows of the concept), each summing to 1.
        scores: (K,) EOT scores (mean EOT attention inside / over the image); NaN when no EOT map was given.
        candidate_labels: (h, w) long cluster index of every pixel at the chosen pre-clustering level.
        candidate_scores: (C,) EOT scores of those clusters.
        kept: (C,) bool, which candidates passed the EOT filter.
        level: the chosen FINCH level (None for "kmeans").
        cluster_counts: cluster count of every FINCH level, finest first (empty for "kmeans").
        threshold: tau of the chosen level, the post-clustering merge threshold (None for "kmeans").
        merge_counts: concept count after every post-clustering level, starting with the kept clusters.
        notes: what fallback was taken, in words (empty when none).
    """

    labels: torch.Tensor
    masks: torch.Tensor
    features: torch.Tensor
    scores: torch.Tensor
    candidate_labels: torch.Tensor
    candidate_scores: torch.Tensor
    kept: torch.Tensor
    level: int | None
    cluster_counts: list[int]
    threshold: float | None
    merge_counts: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def find_eot_index(input_ids: Sequence[int] | torch.Tensor, eos_token_id: int) -> int:
    """Position of the [EOT] token: the FIRST position holding the tokenizer's eos id.

    SD 1.x tokenizers pad with the eos token, SD 2.x with "!" (id 0); taking the first eos works for both
    (the authors' ``(ids == eos).nonzero().item()`` fails on SD 1.x padding).
    """
    ids = torch.as_tensor(input_ids).flatten()
    hits = torch.nonzero(ids == eos_token_id).flatten()
    if hits.numel() == 0:
        raise ValueError(f"The prompt's token ids hold no end-of-text token (id {eos_token_id}).")
    return int(hits[0])


def select_level(counts: Sequence[int], min_clusters: int = 10) -> tuple[int, str | None]:
    """The automatic stopping point: the LAST level with at least ``min_clusters`` clusters.

    Counts decrease level by level. When even the finest level has fewer clusters (a simple image), the
    finest level is used (it is the one closest to ``min_clusters``); the authors' code crashes there.

    Returns:
        ``(level, note)``: the level index and, when the fallback was taken, a sentence saying so.
    """
    if not counts:
        raise ValueError("No FINCH levels to choose from.")
    eligible = [i for i, c in enumerate(counts) if c >= min_clusters]
    if eligible:
        return eligible[-1], None
    return 0, (
        f"No clustering level had >= {min_clusters} clusters (counts {list(counts)}); "
        f"used the finest level ({counts[0]} clusters)."
    )


def eot_scores(eot_map: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """EOT score of every mask: mean of the min-max normalised EOT map inside it / mean over the image.

    Args:
        eot_map: (h, w) EOT attention on the latent grid.
        masks: (k, h, w) bool masks.
    Returns:
        (k,) float scores; all 1.0 when the map is constant.
    """
    m = eot_map.float()
    k = masks.shape[0]
    lo, hi = m.min(), m.max()
    if float(hi - lo) <= 1e-12:
        return torch.ones(k, device=m.device)
    m = ((m - lo) / (hi - lo)).reshape(-1)
    flat = masks.reshape(k, -1).float()
    return (flat @ m) / flat.sum(1).clamp_min(1.0) / m.mean()


def _to_grid(eot_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of an (h_r, w_r) map to ``size``."""
    if tuple(eot_map.shape) == tuple(size):
        return eot_map.float()
    return F.interpolate(eot_map[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def localize(
    attention: torch.Tensor,
    latent_size: tuple[int, int],
    eot_map: torch.Tensor | None,
    config: LocalizationConfig | None = None,
    generator: torch.Generator | None = None,
) -> LocalizationResult:
    """Find the concepts from the aggregated self-attention.

    Args:
        attention: (h*w, h*w) aggregated self-attention, every row a distribution over latent pixels
            (raster order).
        latent_size: (h, w).
        eot_map: (h_r, w_r) [EOT] cross-attention of the empty prompt (resized to (h, w) bilinearly), or None
            (no filter; scores are NaN). Needed by "conceptexpress".
        config: options; default :class:`LocalizationConfig`.
        generator: seeds "kmeans".
    """
    config = config or LocalizationConfig()
    h, w = latent_size
    n = h * w
    if attention.shape != (n, n):
        raise ValueError(
            f"attention must be ({n}, {n}) for latent size {latent_size}, got {tuple(attention.shape)}."
        )
    notes: list[str] = []
    eot = None if eot_map is None else _to_grid(eot_map, (h, w))
    if config.method == "conceptexpress" and eot is None:
        raise ValueError('method="conceptexpress" needs the [EOT] attention map (eot_map).')

    level = threshold = None
    counts: list[int] = []
    if config.method == "kmeans":
        if config.num_concepts > n:
            raise ValueError(f"num_concepts={config.num_concepts} exceeds the {n} latent pixels.")
        labels = kmeans(attention, config.num_concepts, generator=generator)
    else:
        tree = finch(attention, config.distance)
        counts = tree.num_clusters
        level, note = select_level(counts, config.min_clusters)
        if note:
            notes.append(note)
        labels = tree.levels[level].labels
        threshold = tree.levels[level].threshold
    num_candidates = int(labels.max()) + 1
    candidate_labels = labels.reshape(h, w)
    onehot = F.one_hot(labels, num_candidates).T.bool()  # (C, n)
    if eot is not None:
        cand_scores = eot_scores(eot, onehot)
    else:
        cand_scores = torch.full((num_candidates,), float("nan"), device=attention.device)

    kept = torch.ones(num_candidates, dtype=torch.bool, device=attention.device)
    if config.method == "conceptexpress":
        kept = cand_scores > config.eot_threshold
        if not bool(kept.any()):
            best = int(cand_scores.argmax())
            kept[best] = True
            notes.append(
                f"The [EOT] filter kept no cluster (best score {float(cand_scores[best]):.3f} <= "
                f"{config.eot_threshold}); kept the best-scoring cluster."
            )

    kept_idx = torch.nonzero(kept).flatten()
    masks = onehot[kept_idx]  # (k, n)
    features = cluster_means(attention, labels, num_candidates)[kept_idx]  # (k, n)
    merge_counts = [int(kept_idx.numel())]
    if config.method == "conceptexpress" and config.post_clustering and kept_idx.numel() > 1:
        groups, merged, merge_counts = constrained_finch(
            features, masks.reshape(-1, h, w), threshold, config.distance
        )
        features = cluster_means(features, groups)
        masks = merged.reshape(merged.shape[0], n)

    features = features / features.sum(-1, keepdim=True).clamp_min(1e-30)
    if eot is not None:
        scores = eot_scores(eot, masks)
    else:
        scores = torch.full((masks.shape[0],), float("nan"), device=attention.device)
    # Most salient concept first (EOT score, descending); ties and NaN keep raster order of first pixel.
    first_pixel = masks.float().argmax(1)
    order = sorted(
        range(masks.shape[0]),
        key=lambda i: (-(float(scores[i]) if scores[i] == scores[i] else 0.0), int(first_pixel[i])),
    )
    order_t = torch.as_tensor(order, dtype=torch.long, device=masks.device)
    masks, features, scores = masks[order_t], features[order_t], scores[order_t]
    out_labels = torch.full((n,), -1, dtype=torch.long, device=masks.device)
    for k in range(masks.shape[0]):
        out_labels[masks[k]] = k
    return LocalizationResult(
        labels=out_labels.reshape(h, w),
        masks=masks.reshape(-1, h, w),
        features=features.reshape(-1, h, w),
        scores=scores,
        candidate_labels=candidate_labels,
        candidate_scores=cand_scores,
        kept=kept,
        level=level,
        cluster_counts=counts,
        threshold=threshold,
        merge_counts=merge_counts,
        notes=notes,
    )
