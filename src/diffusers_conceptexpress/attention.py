"""Attention capture: custom attention processors that record self- and cross-attention of a UNet.

The processors are installed only inside :func:`capture_attention`, a context manager that puts the UNet's
original processors back on exit, also when an error is raised. Layers that are not being recorded keep
their original processor (SDPA by default), so capture costs nothing where nothing is recorded.

Self-attention is never stored layer by layer. Every recorded self-attention layer adds its head-averaged
probabilities, computed in chunks of query rows, straight into ONE running (R^2 x R^2) sum on the
aggregation grid R (the latent grid for SD; the finest attention grid, half the latent, for SDXL): the key
axis is resampled bilinearly, the query axis by nearest neighbour, and the layer is weighted
(docs/design.md, 'Localization'). Rows are normalised at the end.

Cross-attention is kept for chosen token positions only, head-averaged, per layer; with ``cross_with_grad``
the maps keep their autograd graph (the concept-learning stage trains through them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

__all__ = [
    "SELF_ATTENTION_WEIGHTINGS",
    "AttentionRecorder",
    "RecordingAttnProcessor",
    "capture_attention",
    "grid_at_factor",
    "layer_grid",
    "nearest_factor",
    "unet_attention_factors",
    "unet_cross_attention_factors",
]

SELF_ATTENTION_WEIGHTINGS = ("reference", "uniform", "resolution")


def layer_grid(latent_size: tuple[int, int], seq_len: int, max_factor_exp: int = 8) -> tuple[int, int, int]:
    """Grid of an attention layer from its sequence length and the latent size.

    Each UNet downsampling halves a side with rounding up (stride-2 conv, padding 1), so the grid at
    downsampling factor 2^i is (ceil(h / 2^i), ceil(w / 2^i)) applied step by step. Works for non-square
    latents, where sqrt(seq_len) would be wrong.

    Args:
        latent_size: (h, w) of the latent fed to the UNet.
        seq_len: number of query tokens of the layer.
    Returns:
        (factor, h_r, w_r): the downsampling factor (1, 2, 4, ...) and the layer's grid.
    """
    h, w = latent_size
    for i in range(max_factor_exp + 1):
        if h * w == seq_len:
            return 2**i, h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise ValueError(
        f"An attention layer has {seq_len} tokens, which matches no downsampling of the latent grid "
        f"{latent_size}; was the recorder built for another latent size?"
    )


def grid_at_factor(latent_size: tuple[int, int], factor: int) -> tuple[int, int]:
    """Grid (h_r, w_r) of the layers at downsampling ``factor`` (a power of two) of a latent of ``latent_size``."""
    h, w = latent_size
    for _ in range(int(math.log2(factor))):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def unet_cross_attention_factors(unet: torch.nn.Module) -> list[int]:
    """Downsampling factors of a ``UNet2DConditionModel``'s cross-attention layers outside the mid block.

    Down block i runs at factor 2^i; up block j at factor 2^(n - 1 - j) for n blocks (SD at 512 px: 16x16
    layers are ``down_blocks.2`` and ``up_blocks.1``, factor 4).
    """
    n = len(unet.down_blocks)
    factors = {2**i for i, blk in enumerate(unet.down_blocks) if getattr(blk, "has_cross_attention", False)}
    factors |= {
        2 ** (n - 1 - j) for j, blk in enumerate(unet.up_blocks) if getattr(blk, "has_cross_attention", False)
    }
    if not factors:
        raise ValueError("The UNet has no cross-attention layers outside its mid block.")
    return sorted(factors)


def unet_attention_factors(unet: torch.nn.Module) -> list[int]:
    """Downsampling factors of a ``UNet2DConditionModel``'s attention layers (down, mid and up blocks).

    SD at 512 px: 1, 2, 4, 8 (attention from the 64x64 latent grid down); SDXL at 1024 px: 2, 4 (64x64 and
    32x32 on the 128x128 latent: its first block has no attention).
    """
    n = len(unet.down_blocks)
    factors = {2**i for i, blk in enumerate(unet.down_blocks) if getattr(blk, "attentions", None)}
    factors |= {2 ** (n - 1 - j) for j, blk in enumerate(unet.up_blocks) if getattr(blk, "attentions", None)}
    if getattr(unet.mid_block, "attentions", None):
        factors.add(2 ** (n - 1))
    if not factors:
        raise ValueError("The UNet has no attention layers.")
    return sorted(factors)


def nearest_factor(factors: list[int], wanted: int) -> int:
    """The factor of ``factors`` closest to ``wanted`` on a log scale (the smaller one on ties)."""
    return min(factors, key=lambda f: (abs(math.log2(f) - math.log2(wanted)), f))


@dataclass
class _CrossRecord:
    factor: int
    grid: tuple[int, int]
    maps: torch.Tensor  # (B, h_r * w_r, n_tokens)


class AttentionRecorder:
    """Shared controller of the recording processors (a plain object, never an ``nn.Module``).

    Args:
        latent_size: (h, w) of the UNet input latent (layer grids are derived from it).
        record_self: aggregate self-attention (attn1) of the layers selected by ``self_factors``.
        self_weighting: "reference" (the authors': weight r/R on the key-upsampled map, so a layer's
            effective weight grows like R/r), "uniform" (every layer the same effective weight) or
            "resolution" (effective weight proportional to r/R, fine layers dominate).
        self_factors: downsampling factors (1 = latent grid, 2, 4, ...) whose self-attention is
            aggregated; None = all.
        cross_token_indices: token positions whose cross-attention (attn2) is recorded; None = none.
        cross_factors: downsampling factors whose cross-attention is recorded; None = all.
        cross_with_grad: keep the autograd graph of recorded cross-attention maps.
        chunk_bytes: memory budget of one chunk of attention probabilities (all heads, float32).
        grid: (h_R, w_R), the self-attention aggregation grid R; default ``latent_size``. SDXL has no attention
            on its latent grid: its finest attention grid (half the latent) is used there
            (docs/design.md, 'SDXL').
    """

    def __init__(
        self,
        latent_size: tuple[int, int],
        *,
        record_self: bool = True,
        self_weighting: str = "reference",
        self_factors: Sequence[int] | None = None,
        cross_token_indices: Sequence[int] | None = None,
        cross_factors: Sequence[int] | None = None,
        cross_with_grad: bool = False,
        chunk_bytes: int = 2 * 2**20,
        grid: tuple[int, int] | None = None,
    ) -> None:
        if self_weighting not in SELF_ATTENTION_WEIGHTINGS:
            raise ValueError(
                f"Unknown self_weighting {self_weighting!r}; choose one of {SELF_ATTENTION_WEIGHTINGS}."
            )
        self.latent_size = (int(latent_size[0]), int(latent_size[1]))
        self.grid = self.latent_size if grid is None else (int(grid[0]), int(grid[1]))
        self.record_self = record_self
        self.self_weighting = self_weighting
        self.self_factors = None if self_factors is None else set(self_factors)
        self.cross_token_indices = None if cross_token_indices is None else list(cross_token_indices)
        self.cross_factors = None if cross_factors is None else set(cross_factors)
        self.cross_with_grad = cross_with_grad
        self.chunk_bytes = chunk_bytes
        self.enabled = True
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Drop everything recorded so far."""
        self._self_sum: torch.Tensor | None = None
        self.self_layers: list[str] = []
        self.cross: dict[str, _CrossRecord] = {}

    @property
    def num_pixels(self) -> int:
        """Pixels of the aggregation grid (rows of the self-attention)."""
        return self.grid[0] * self.grid[1]

    def wants_layer(self, name: str) -> bool:
        """Whether a processor name could ever be recorded (decides which layers get a recording processor)."""
        if ".attn1." in name or name.endswith("attn1.processor"):
            return self.record_self
        if ".attn2." in name or name.endswith("attn2.processor"):
            if self.cross_token_indices is None:
                return False
            return not name.startswith("mid_block")
        return False

    def _wants_self(self, factor: int) -> bool:
        return (
            self.enabled and self.record_self and (self.self_factors is None or factor in self.self_factors)
        )

    def _wants_cross(self, factor: int) -> bool:
        return (
            self.enabled
            and self.cross_token_indices is not None
            and (self.cross_factors is None or factor in self.cross_factors)
        )

    # ------------------------------------------------------------ self-attention
    def _layer_weight(self, grid: tuple[int, int]) -> float:
        h, w = self.grid
        ratio = grid[0] / h  # r / R
        area = (grid[0] * grid[1]) / (h * w)  # bilinear key upsampling multiplies row mass by 1 / area
        if self.self_weighting == "reference":
            return ratio
        if self.self_weighting == "uniform":
            return area
        return ratio * area  # "resolution"

    def _query_sources(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """For every query row of the R grid, the row of the layer grid it copies (nearest neighbour)."""
        h, w = self.grid
        ys = torch.div(torch.arange(h, device=device) * grid[0], h, rounding_mode="floor")
        xs = torch.div(torch.arange(w, device=device) * grid[1], w, rounding_mode="floor")
        return (ys[:, None] * grid[1] + xs[None, :]).reshape(-1)

    def add_self_attention(
        self, probs: torch.Tensor, query_start: int, grid: tuple[int, int], layer: str | None = None
    ) -> None:
        """Add a chunk of head-averaged self-attention probabilities into the running sum.

        Args:
            probs: (B, q, h_r * w_r) probabilities of query rows ``query_start .. query_start + q`` of a
                layer whose grid is ``grid`` = (h_r, w_r).
        """
        with torch.no_grad():
            b, q, _ = probs.shape
            h, w = self.grid
            n = h * w
            if self._self_sum is None:
                self._self_sum = torch.zeros(b, n, n, dtype=torch.float32, device=probs.device)
            probs = probs.float()
            if grid != self.grid:
                probs = F.interpolate(
                    probs.reshape(b * q, 1, *grid), size=(h, w), mode="bilinear", align_corners=False
                ).reshape(b, q, n)
            probs = probs * self._layer_weight(grid)
            src = self._query_sources(grid, probs.device)
            rows = torch.nonzero((src >= query_start) & (src < query_start + q)).flatten()
            # scatter in blocks so a low-resolution layer never materialises an (n x n) temporary
            block = max(1, self.chunk_bytes // max(1, b * n * 4))
            for s in range(0, rows.numel(), block):
                r = rows[s : s + block]
                self._self_sum.index_add_(1, r, probs[:, src[r] - query_start])
            if layer is not None and query_start == 0:
                self.self_layers.append(layer)

    def record_self_chunk(
        self, layer: str, probs: torch.Tensor, query_start: int, grid: tuple[int, int]
    ) -> None:
        """Take one chunk of a self-attention layer's probabilities, as the recording processor computed them.

        Args:
            layer: the processor name of the layer.
            probs: (B, heads, q, h_r * w_r) probabilities (with their autograd graph) of query rows
                ``query_start .. query_start + q``.
            grid: (h_r, w_r) of the layer.

        The recorder averages the heads without a graph and adds the chunk into the running sum
        (:meth:`add_self_attention`). Subclasses override this to keep other views of the maps.
        """
        with torch.no_grad():
            self.add_self_attention(probs.detach().float().mean(1), query_start, grid, layer=layer)

    def self_attention(self, release: bool = False) -> torch.Tensor:
        """The aggregated self-attention, (B, R^2, R^2) with R^2 = h * w, every row summing to 1.

        Row i is the attention of latent pixel i (raster order) over all latent pixels. With
        ``release=True`` the running sum is normalised in place and handed over (no extra R^4 copy); the
        recorder then holds no self-attention any more.
        """
        if self._self_sum is None:
            raise RuntimeError("No self-attention was recorded: run the UNet inside capture_attention first.")
        total = self._self_sum.sum(-1, keepdim=True).clamp_min(1e-30)
        if not release:
            return self._self_sum / total
        out = self._self_sum.div_(total)
        self._self_sum = None
        return out

    # ----------------------------------------------------------- cross-attention
    def add_cross_attention(
        self, layer: str, probs: torch.Tensor, factor: int, grid: tuple[int, int]
    ) -> None:
        """Store the head-averaged cross-attention (B, h_r * w_r, n_tokens) of the recorded token positions."""
        if not self.cross_with_grad:
            probs = probs.detach()
        self.cross[layer] = _CrossRecord(factor, grid, probs)

    def cross_attention_factors(self) -> list[int]:
        """Downsampling factors with recorded cross-attention, ascending."""
        return sorted({rec.factor for rec in self.cross.values()})

    def cross_attention(self, factor: int) -> torch.Tensor:
        """Cross-attention maps at one downsampling factor, averaged over the layers recorded there.

        Returns:
            (B, n_tokens, h_r, w_r) float maps, in the order of ``cross_token_indices``.
        """
        recs = [rec for rec in self.cross.values() if rec.factor == factor]
        if not recs:
            raise KeyError(
                f"No cross-attention recorded at downsampling factor {factor}; recorded factors: "
                f"{self.cross_attention_factors()}."
            )
        grid = recs[0].grid
        mean = torch.stack([rec.maps.float() for rec in recs]).mean(0)  # (B, N, T)
        return mean.transpose(1, 2).reshape(mean.shape[0], mean.shape[2], *grid)


class RecordingAttnProcessor:
    """Attention processor that records probabilities for an :class:`AttentionRecorder`.

    When its layer is not recorded at the current call it delegates to ``fallback`` (SDPA by default).
    Probabilities come from ``Attention.get_attention_scores``, which honours ``upcast_attention``
    (SD 2.1-768) and ``upcast_softmax``; self-attention is computed in chunks of query rows.
    """

    def __init__(self, recorder: AttentionRecorder, name: str, fallback: object | None = None) -> None:
        self.recorder = recorder
        self.name = name
        self.fallback = fallback if fallback is not None else AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        seq_len = (
            hidden_states.shape[-2] * hidden_states.shape[-1]
            if hidden_states.ndim == 4
            else hidden_states.shape[1]
        )
        factor, gh, gw = layer_grid(self.recorder.latent_size, seq_len)
        wanted = self.recorder._wants_cross(factor) if is_cross else self.recorder._wants_self(factor)
        if not wanted:  # called the way Attention calls processors: not every processor takes temb
            if temb is not None:
                kwargs["temb"] = temb
            return self.fallback(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **kwargs,
            )
        return self._attend(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, factor, (gh, gw)
        )

    def _attend(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
        factor: int,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)

        heads = attn.heads
        b = query.shape[0] // heads
        n_q, n_k = query.shape[1], key.shape[1]
        rec = self.recorder
        if is_cross:
            probs = attn.get_attention_scores(query, key, attention_mask)
            out = torch.bmm(probs, value)
            idx = torch.as_tensor(rec.cross_token_indices, device=probs.device)
            picked = probs.index_select(-1, idx).reshape(b, heads, n_q, idx.numel()).float().mean(1)
            rec.add_cross_attention(self.name, picked, factor, grid)
        else:
            chunk = max(1, rec.chunk_bytes // max(1, b * heads * n_k * 4))
            outs = []
            for s in range(0, n_q, chunk):
                mask = attention_mask
                if mask is not None and mask.shape[1] > 1:
                    mask = mask[:, s : s + chunk]
                probs = attn.get_attention_scores(query[:, s : s + chunk], key, mask)
                outs.append(torch.bmm(probs, value))
                rec.record_self_chunk(self.name, probs.reshape(b, heads, -1, n_k), s, grid)
                del probs
            out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

        hidden_states = attn.batch_to_head_dim(out)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def capture_attention(unet: torch.nn.Module, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
    """Install recording processors on ``unet`` for the duration of the ``with`` block.

    Layers the recorder may need get a :class:`RecordingAttnProcessor` (which falls back to the layer's
    original processor whenever it does not record); every other layer keeps its original processor. The
    original processors are restored on exit, also when the block raises.

    Example::

        recorder = AttentionRecorder((64, 64), cross_token_indices=[1])
        with capture_attention(pipe.unet, recorder):
            pipe.unet(latents, 0, encoder_hidden_states=empty)
        attn = recorder.self_attention()  # (1, 4096, 4096)
    """
    original = dict(unet.attn_processors)
    new = {
        name: RecordingAttnProcessor(recorder, name, fallback=proc) if recorder.wants_layer(name) else proc
        for name, proc in original.items()
    }
    unet.set_attn_processor(new)
    try:
        yield recorder
    finally:
        unet.set_attn_processor(dict(original))
