"""The UNet stage's objectives beyond the plain denoising loss, and that loss's per-noise-level weighting.

- :func:`sample_mse` and :class:`NoiseLevelWeights`: the denoising loss per sample (masked to one object for
  single-concept captions), and each noise level given the same share;
- :func:`slot_contrast_loss`: an object's own slot must explain its masked pixels best among its candidates;
- :func:`eot_objectness_loss`: the empty prompt's [EOT] map salient on the objects, low on the background;
- :func:`self_attention_grouping_loss`, :func:`self_attention_coherence_loss` and
  :func:`self_attention_separation_loss`: self-attention kept within an object, alike within an object and
  apart between objects (the last two on :func:`aggregate_self_attention`, the method's aggregation, with its
  clustering's symmetric KL divergence).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffusers_conceptexpress.clustering import pairwise_distance


def sample_mse(
    pred: torch.Tensor, target: torch.Tensor, single: torch.Tensor | None, mask: torch.Tensor | None
) -> torch.Tensor:
    """Per-sample MSE ``(B,)`` of ``pred`` against ``target`` (both ``(B, C, H, W)``); the samples flagged in
    ``single`` ``(B,)`` take the mean over their object's latent cells ``mask`` ``(B, 1, H, W)`` instead: the scale
    of a whole-image sample."""
    err = (pred - target) ** 2
    mse = err.mean(dim=(1, 2, 3))
    if single is not None:
        cells = mask.sum(dim=(1, 2, 3)).clamp(min=1) * err.shape[1]
        mse = torch.where(single, (err * mask).sum(dim=(1, 2, 3)) / cells, mse)
    return mse


class NoiseLevelWeights:
    """Per-noise-level loss normalisation: weight each sample by 1 / (running mean MSE of its timestep bin).

    With uniform epsilon-MSE the low-noise steps dominate the gradient (their MSE is 10-40x that of the
    high-noise steps, where the layout and the shape of an object are decided), so a small model learns
    colour and texture first and shape last. Dividing each sample's MSE by the running mean of its bin (the
    optimum of EDM2's learned per-noise-level uncertainty weighting) gives every noise level the same share.
    The weights are rescaled so that their mean over the bins is 1: the loss keeps plain MSE's scale.

    ``bins`` equal-width bins over ``[0, num_timesteps)``; ``decay`` is the running mean's per-update decay.
    """

    def __init__(self, bins: int = 20, num_timesteps: int = 1000, decay: float = 0.99) -> None:
        self.bins, self.num_timesteps, self.decay = bins, num_timesteps, decay
        self.mean = torch.full((bins,), float("nan"))

    def bin(self, t: torch.Tensor) -> torch.Tensor:
        return (t * self.bins // self.num_timesteps).clamp(0, self.bins - 1)

    def update(self, t: torch.Tensor, mse: torch.Tensor) -> None:
        """Fold per-sample MSEs (shape ``(B,)``) at timesteps ``t`` (``(B,)``) into the running means."""
        for b, v in zip(self.bin(t).tolist(), mse.detach().float().tolist(), strict=True):
            m = self.mean[b]
            self.mean[b] = v if torch.isnan(m) else self.decay * m + (1 - self.decay) * v

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weights ``(B,)``; bins not seen yet get the mean of the seen ones."""
        seen = ~torch.isnan(self.mean)
        if not seen.any():
            return torch.ones(t.shape)
        mean = torch.where(seen, self.mean, self.mean[seen].mean())
        inv = 1.0 / mean
        return (inv / inv.mean())[self.bin(t)]

    def state_dict(self) -> dict:
        return {"mean": self.mean.clone(), "bins": self.bins, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.bins, self.decay, self.mean = state["bins"], state["decay"], state["mean"].clone()


def slot_contrast_loss(
    pred: torch.Tensor,
    eps: torch.Tensor,
    mask: torch.Tensor,
    truth: torch.Tensor,
    temperature: float = 1.0,
    margin: float | None = None,
    own_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the object's own slot among its candidate slots, scored by the method's masked loss.

    The learned token of ConceptExpress lands where the masked epsilon error inside its concept's mask is
    lowest. On the eleventh model a heart's pixels were explained better by the slot "colour + circle" than by
    "colour + heart" (docs/toyworld.md, eleventh model, item 6), so the learned tokens of hearts drew circles.
    This loss asks the UNet to rank the true slot first: the logits are minus the summed squared error inside
    the mask (the log-likelihood of a Gaussian denoiser, up to the noise level's weight), the same noisy latent
    and noise for every candidate.

    Args:
        pred: (B, C, 4, h, w) noise predictions, candidate c conditioned on "a photo of <candidate c>".
        eps: (B, 4, h, w) the noise.
        mask: (B, 1, h, w) the object's latent mask.
        truth: (B,) long, the own slot's candidate.
        temperature: the logits are minus the summed squared error over this (cross-entropy form).
        margin: if given, a hinge instead of the cross-entropy: per object ``relu(margin - (log e_min -
            log e_own))``, e_own the own slot's summed squared error and e_min the lowest of the others'. It
            is 0, with no gradient, once every other slot's error is at least ``exp(margin)`` times the own
            one, so the loss acts only where the ranking is wrong or narrow (scale-free: a ratio of errors).
        own_only: the other candidates' errors are constants (detached): the gradient only lowers the own
            slot's masked error, where the ranking asks for it, and never pushes the other slots' predictions
            away from the object (the fourteenth trial's control: pushing them shifted the UNet's colours).
    Returns:
        the mean loss, and the share of the batch whose own slot has the lowest error.
    """
    sse = (((pred - eps[:, None]) ** 2) * mask[:, None]).sum(dim=(2, 3, 4))
    if own_only:
        own_column = F.one_hot(truth, sse.shape[1]).bool()
        sse = torch.where(own_column, sse, sse.detach())
    top1 = (sse.argmin(1) == truth).float().mean()
    if margin is None:
        return F.cross_entropy(-sse / temperature, truth), top1
    log_sse = torch.log(sse + 1e-8)
    own = log_sse.gather(1, truth[:, None])[:, 0]
    others = log_sse.scatter(1, truth[:, None], float("inf")).amin(1)
    return F.relu(margin - (others - own)).mean(), top1


def segment_shares(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) integer label maps -> (B, segments, h, w): the share of each cell of an h x w grid that each
    segment (0 = background, i + 1 = object i) covers; H and W multiples of h and w."""
    onehot = F.one_hot(labels.long(), int(labels.max()) + 1).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(onehot, size)


def eot_objectness_loss(
    eot: torch.Tensor, labels: torch.Tensor, target: float = 2.0, background: float = 0.5
) -> torch.Tensor:
    """Hinge loss that makes the empty prompt's [EOT] map salient on every object and low on the background.

    Args:
        eot: (B, h, w) [EOT] cross-attention of the empty prompt (probabilities, head- and layer-averaged).
        labels: (B, H, W) integer object label maps (0 = background, i + 1 = object i), H and W multiples
            of h and w.
        target: wanted object ratio: mean of the map over an object / mean over the image (capped per scene
            at 0.9 / the share of the image that objects cover, so it stays reachable).
        background: pure-background cells should stay below this multiple of the image mean.

    Returns:
        scalar: mean over present objects of relu(log target - log ratio) + mean over cells with no object
        of relu(map / image mean - background). Zero once every object and background cell is on the right
        side, so it stops pulling there.
    """
    frac = segment_shares(labels, tuple(eot.shape[-2:]))  # (B, objects + 1, h, w)
    mean = eot.mean((1, 2))
    area = frac.sum((2, 3))
    ratio = (frac * eot[:, None]).sum((2, 3)) / area.clamp_min(1e-6) / mean[:, None]
    present = area[:, 1:] > 0
    coverage = 1.0 - frac[:, 0].mean((1, 2))
    wanted = torch.clamp(0.9 / coverage.clamp_min(1e-6), max=target)
    objects = F.relu(torch.log(wanted)[:, None] - torch.log(ratio[:, 1:].clamp_min(1e-6)))[present]
    cells = F.relu(eot / mean[:, None, None] - background)[frac[:, 0] > 0.99]
    zero = eot.sum() * 0.0
    return (objects.mean() if objects.numel() else zero) + (cells.mean() if cells.numel() else zero)


def self_attention_grouping_loss(
    maps: list[torch.Tensor], labels: torch.Tensor, target: float = 0.8
) -> torch.Tensor:
    """Hinge loss that keeps each cell's self-attention inside its own object (or inside the background).

    Args:
        maps: per layer, (B, r * r, r * r) head-averaged self-attention probabilities (rows sum to 1) on a
            square r x r grid.
        labels: (B, H, W) integer object label maps (0 = background, i + 1 = object i), H and W multiples
            of every r.
        target: the wanted share of a row's attention that falls on the cells of its own segment.

    Returns:
        scalar: mean over layers of the mean, over "pure" query cells (at least 99% of the cell in one
        segment), of relu(target - attention mass on that segment); the key axis counts every cell by the
        share of it that the segment covers. Zero once every pure cell attends enough to its own segment.
    """
    zero = labels.new_zeros((), dtype=torch.float32)
    terms = []
    for attn in maps:
        r = math.isqrt(attn.shape[-1])
        frac = segment_shares(labels, (r, r)).flatten(2)  # (B, segments, r * r)
        share, segment = frac.max(1)  # (B, r * r): the query cell's main segment
        mass = torch.bmm(attn.float(), frac.transpose(1, 2))  # (B, r * r, segments)
        own = mass.gather(2, segment[..., None])[..., 0]
        pure = share > 0.99
        terms.append(F.relu(target - own)[pure].mean() if pure.any() else zero + attn.sum() * 0.0)
    return torch.stack(terms).mean() if terms else zero


def aggregate_self_attention(maps: list[torch.Tensor], size: int) -> torch.Tensor:
    """The method's aggregated self-attention ("reference" weighting, as ``AttentionRecorder``), differentiable.

    Args:
        maps: per layer, (B, r * r, r * r) head-averaged self-attention on a square r x r grid.
        size: R, the side of the aggregation grid (the latent side).

    Returns:
        (B, R * R, R * R): keys upsampled bilinearly, queries repeated (nearest), each layer weighted r / R,
        summed, every row normalised to sum to 1.
    """
    total = None
    for attn in maps:
        b, n_q, _ = attn.shape
        r = math.isqrt(n_q)
        keys = F.interpolate(attn.float().reshape(b * n_q, 1, r, r), size=(size, size), mode="bilinear")
        keys = keys.reshape(b, n_q, size * size) * (r / size)
        line = torch.div(torch.arange(size, device=attn.device) * r, size, rounding_mode="floor")
        rows = keys[:, (line[:, None] * r + line[None, :]).reshape(-1)]
        total = rows if total is None else total + rows
    return total / total.sum(-1, keepdim=True).clamp_min(1e-30)


def self_attention_coherence_loss(
    attn: torch.Tensor, labels: torch.Tensor, max_distance: float = 0.05, background: bool = True
) -> torch.Tensor:
    """Hinge loss that makes the aggregated self-attention rows of one object (or of the background) alike.

    FINCH, the method's clustering, links rows by the symmetric KL divergence; an object whose rows differ
    comes out in fragments. This pulls every row of a segment towards the segment's mean row, by the same
    distance (``diffusers_conceptexpress.clustering.pairwise_distance``).

    Args:
        attn: (B, R * R, R * R) aggregated self-attention (rows sum to 1), e.g. ``aggregate_self_attention``.
        labels: (B, H, W) integer object label maps (0 = background), H and W multiples of R.
        max_distance: allowed symmetric KL divergence between a row and its segment's mean row.
        background: score the background's cells too (one segment); otherwise objects only.

    Returns:
        scalar: mean, over pure cells (>= 99% of the cell in one segment), of
        relu(symKL(row, mean row of the segment's pure cells) - max_distance).
    """
    segment, pure, _, means = _segment_mean_rows(attn, labels, background)
    if not pure.any():
        return attn.sum() * 0.0
    distances = []
    for b in range(attn.shape[0]):  # scene by scene, pure cells in raster order
        cells = pure[b].nonzero().flatten()
        if cells.numel():
            to_means = pairwise_distance(attn[b, cells], means[b], "symmetric_kl")  # (cells, segments)
            distances.append(to_means.gather(1, segment[b, cells][:, None])[:, 0])
    return F.relu(torch.cat(distances) - max_distance).mean()


def self_attention_separation_loss(
    attn: torch.Tensor, labels: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """Hinge loss that keeps the mean aggregated self-attention rows of DIFFERENT objects apart.

    The method's post-clustering joins two neighbouring clusters when the symmetric KL between their mean
    rows is at most the chosen FINCH level's tau (0.3-0.55 on coarse levels of the toy grid); objects that
    touch and attend alike then come out as one concept (docs/benchmarks.md).

    Args:
        attn: (B, R * R, R * R) aggregated self-attention, as for :func:`self_attention_coherence_loss`.
        labels: (B, H, W) integer object label maps (0 = background).
        margin: wanted symmetric KL between the mean rows (over pure cells) of two objects of one scene.

    Returns:
        scalar: mean over the object pairs of every scene of relu(margin - symKL(mean_i, mean_j)); 0 (in the
        graph) when no scene has two objects with pure cells.
    """
    _, _, counts, means = _segment_mean_rows(attn, labels, background=False)
    present = counts[:, 1:] > 0  # (B, objects): objects with pure cells
    terms = []
    for b in range(attn.shape[0]):
        objs = present[b].nonzero().flatten() + 1
        if len(objs) > 1:
            apart = pairwise_distance(means[b, objs], metric="symmetric_kl")  # (objects, objects)
            first, second = torch.triu_indices(len(objs), len(objs), 1, device=apart.device)  # i < j
            terms.append(F.relu(margin - apart[first, second]))
    return torch.cat(terms).mean() if terms else attn.sum() * 0.0


def _segment_mean_rows(attn: torch.Tensor, labels: torch.Tensor, background: bool):
    """Per scene and segment, the mean row over the segment's pure cells (>= 99% of the cell in it).

    Returns ``(segment, pure, counts, means)``: (B, R * R) main segment and purity of every cell,
    (B, segments) pure-cell counts and (B, segments, R * R) mean rows (0 where a segment has no pure cell).
    """
    size = math.isqrt(attn.shape[-1])
    frac = segment_shares(labels, (size, size)).flatten(2)  # (B, segments, R * R)
    share, segment = frac.max(1)  # (B, R * R)
    pure = (share > 0.99) & ((segment > 0) | background)
    member = F.one_hot(segment, frac.shape[1]).float() * pure[..., None].float()  # (B, R * R, segments)
    counts = member.sum(1)
    means = torch.bmm(member.transpose(1, 2), attn) / counts.clamp_min(1)[..., None]
    return segment, pure, counts, means
