"""Self-attention maps with their autograd graph, for the trainer's objectives on attention.

The product's :class:`~diffusers_conceptexpress.attention.AttentionRecorder` aggregates self-attention over
layers without a graph (what localization needs). The grouping, coherence and separation losses need every
layer's map differentiable: :class:`GradAttentionRecorder` keeps them through the recorder's one extension
point for self-attention, ``record_self_chunk``.
"""

from __future__ import annotations

import torch

from diffusers_conceptexpress.attention import AttentionRecorder

__all__ = ["GradAttentionRecorder"]


class GradAttentionRecorder(AttentionRecorder):
    """An :class:`AttentionRecorder` that keeps each self-attention layer's head-averaged map WITH its graph.

    Every recorded chunk of query rows is averaged over the heads (in float32, autograd graph included) and
    kept per layer; :meth:`self_attention_maps` joins the chunks. Nothing is aggregated: ``self_attention()``
    raises, as no aggregated map was recorded. Cross-attention is recorded as by the base class
    (``cross_with_grad=True`` keeps its graph).
    """

    def reset(self) -> None:
        super().reset()
        self._self_maps: dict[str, list[torch.Tensor]] = {}

    def record_self_chunk(
        self, layer: str, probs: torch.Tensor, query_start: int, grid: tuple[int, int]
    ) -> None:
        """Keep ``probs`` (B, heads, q, h_r * w_r) of query rows ``query_start ..`` as (B, q, h_r * w_r)."""
        self._self_maps.setdefault(layer, []).append(probs.float().mean(1))

    def self_attention_maps(self) -> dict[str, torch.Tensor]:
        """Layer name -> (B, h_r * w_r, h_r * w_r) head-averaged probabilities (rows sum to 1), with graph."""
        return {name: torch.cat(chunks, dim=1) for name, chunks in self._self_maps.items()}
