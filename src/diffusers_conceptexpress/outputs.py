"""Output dataclasses of :class:`~diffusers_conceptexpress.ConceptExpressPipeline` (diffusers ``BaseOutput``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import PIL.Image
import torch
from diffusers.utils import BaseOutput

from .image_io import ResizeRecord
from .learning import LearnedConcepts
from .localization import LocalizationResult
from .lora import ConceptLora
from .tokens import DEFAULT_TOKEN_PREFIX

__all__ = ["ConceptExpressOutput", "ConceptLocalization"]


@dataclass
class ConceptLocalization(BaseOutput):
    """Result of :meth:`ConceptExpressPipeline.localize_concepts`.

    Concepts are ordered by salience (EOT score, descending). ``K`` is the number of concepts, ``h x w``
    the localization grid: the latent grid for SD (64 x 64 at 512 px), the finest attention grid for SDXL
    (64 x 64 at 1024 px, half the latent; ``options["grid"]``).

    Attributes:
        masks: K binary masks (PIL mode "L", 0 or 255) at the ORIGINAL image size.
        latent_masks: (K, h, w) bool masks on the localization grid; disjoint.
        features: (K, h, w) float soft feature maps (mean self-attention of the concept's pixels), each
            summing to 1.
        eot_scores: (K,) mean [EOT] attention inside the concept / mean over the image (> 1: salient).
        level: chosen FINCH level (None for "kmeans").
        cluster_counts: number of clusters at every FINCH level, finest first.
        eot_map: (h_r, w_r) [EOT] cross-attention of the empty prompt, head- and layer-averaged.
        details: the full tensor result (candidate clusters, filter decisions, threshold, merges).
        resize: how the image was resized for the model (maps masks back to the original size).
        notes: fallbacks taken, in words (e.g. the stopping rule found no level with >= 10 clusters).
        options: the localization options used (JSON-serialisable).
        attention: (h*w, h*w) aggregated self-attention that was clustered, rows summing to 1 (raster order
            of the latent grid); only with ``localize_concepts(..., return_attention=True)``, else None.
    """

    masks: list[PIL.Image.Image]
    latent_masks: torch.Tensor
    features: torch.Tensor
    eot_scores: torch.Tensor
    level: int | None = None
    cluster_counts: list[int] = field(default_factory=list)
    eot_map: torch.Tensor | None = None
    details: LocalizationResult | None = None
    resize: ResizeRecord | None = None
    notes: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    attention: torch.Tensor | None = None

    @property
    def num_concepts(self) -> int:
        """Number of concepts K."""
        return int(self.latent_masks.shape[0])


@dataclass
class ConceptExpressOutput(BaseOutput):
    """Result of :meth:`ConceptExpressPipeline.extract_concepts`.

    Attributes:
        tokens: K prompt tokens, one per concept, in the order of ``localization`` (e.g. ``["<ce>_1", ...]``);
            after :meth:`save` and ``load_textual_inversion("<dir>/concepts.safetensors")`` each is usable alone.
        embeddings: (K, D) float32 learned embeddings (CPU); SDXL: ``{"clip_l": (K, 768), "clip_g": (K, 1280)}``.
        localization: the concept masks (from :meth:`localize_concepts`, or built from the user's masks).
        learning: counts (optimiser updates, UNet samples) and the loss history.
        token_prefix: the token of all concepts together (``<ce>``).
        base_model: name or path of the base model.
        parameters: the options of the run (JSON-serialisable).
        image: the source image (RGB), for the overlay picture.
        lora: the UNet LoRA trained with the tokens (``lora_rank``), or None; ``save`` writes it as
            ``pytorch_lora_weights.safetensors``.
    """

    tokens: list[str]
    embeddings: torch.Tensor | dict[str, torch.Tensor]
    localization: ConceptLocalization
    learning: LearnedConcepts | None = None
    token_prefix: str = DEFAULT_TOKEN_PREFIX
    base_model: str = ""
    parameters: dict = field(default_factory=dict)
    image: PIL.Image.Image | None = None
    lora: ConceptLora | None = None

    @property
    def num_concepts(self) -> int:
        """Number of concepts K."""
        return len(self.tokens)

    def save(self, directory: str, overwrite: bool = False) -> str:
        """Write the concept files (see :mod:`diffusers_conceptexpress.export`) atomically; returns the path."""
        from .export import save_concepts

        scores = self.localization.eot_scores.tolist()
        return str(
            save_concepts(
                directory,
                self.embeddings,
                masks=self.localization.masks,
                image=self.image,
                scores=[None if s != s else s for s in scores],
                base_model=self.base_model,
                parameters=self.parameters,
                token_prefix=self.token_prefix,
                overwrite=overwrite,
                lora=self.lora,
            )
        )
