"""``ConceptExpressPipeline``: unsupervised concept extraction from one image with a Stable Diffusion model."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging
from transformers import CLIPTextModel, CLIPTokenizer

from .attention import AttentionRecorder, capture_attention
from .image_io import ImageInput, mask_to_original, prepare_image
from .localization import LocalizationConfig, find_eot_index, localize
from .outputs import ConceptLocalization

logger = logging.get_logger(__name__)

__all__ = ["ConceptExpressPipeline"]


class ConceptExpressPipeline(DiffusionPipeline, TextualInversionLoaderMixin):
    r"""ConceptExpress (Hao et al., ECCV 2024) on a Stable Diffusion model (SD 1.x, SD 2.x, v-prediction).

    Finds the visual concepts of ONE image with no words, no masks and no concept count
    (:meth:`localize_concepts`). Loads like any SD pipeline::

        pipe = ConceptExpressPipeline.from_pretrained("path/or/id", dtype=torch.float16)
        pipe = ConceptExpressPipeline.from_pipe(sd_pipe)  # shares the modules, keeps their dtype

    Args:
        vae: autoencoder between images and latents.
        text_encoder: frozen CLIP text encoder.
        tokenizer: its CLIP tokenizer.
        unet: the denoising UNet.
        scheduler: a scheduler of the base model (its ``prediction_type`` is read, never assumed).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components: ClassVar[list[str]] = []

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
    ) -> None:
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if vae is not None else 8

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> ConceptExpressPipeline:
        """Build from another pipeline (e.g. a ``StableDiffusionPipeline``), sharing its modules.

        Unlike ``DiffusionPipeline.from_pipe``, which casts to float32 unless told otherwise, the modules keep
        the dtype they have (pass ``dtype=`` to change it).
        """
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = pipeline.dtype
        return super().from_pipe(pipeline, **kwargs)

    # ------------------------------------------------------------------ helpers
    @property
    def default_resolution(self) -> int:
        """Model input side in pixels: the UNet's ``sample_size`` x the VAE factor (512 for SD 2.1-base)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x the UNet's total downsampling): 64 for SD."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    def encode_image(
        self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Encode (B, 3, H, W) pixels in [-1, 1] to scaled latents (B, C, H / f, W / f).

        ``sample=False`` takes the posterior mean (deterministic); ``sample=True`` draws with ``generator``.
        """
        pixels = pixels.to(device=self._execution_device, dtype=self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        latents = dist.sample(generator=generator) if sample else dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def encode_prompt_ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize (padding to ``model_max_length``) and encode prompts.

        Returns:
            ``(embeddings, input_ids)``: (B, L, D) text-encoder hidden states and (B, L) token ids.
        """
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self._execution_device)
        return self.text_encoder(ids)[0], ids

    def _check_resolution(self, resolution: int) -> None:
        if resolution % self.size_multiple:
            raise ValueError(
                f"resolution={resolution} is not a multiple of {self.size_multiple} (VAE factor x UNet "
                f"downsampling); use e.g. {self.default_resolution}."
            )

    # ------------------------------------------------------------- localization
    @torch.no_grad()
    def localize_concepts(
        self, image: ImageInput, *, generator: torch.Generator | None = None, **options
    ) -> ConceptLocalization:
        r"""Find the concepts of ``image``: one UNet pass, then clustering (method.md §1).

        Args:
            image: a path, PIL image (any mode; EXIF orientation applied), numpy array (H, W[, C]) or torch
                tensor (C, H, W) in [0, 1]. At least 64 px on each side.
            generator: seeds the random parts ("kmeans" initialisation, ``latent_sampling="sample"``).
            **options: fields of :class:`~diffusers_conceptexpress.LocalizationConfig`, e.g.
                ``method="finch"``, ``method="kmeans", num_concepts=3``, ``resize_policy="keep_aspect"``.

        Returns:
            :class:`~diffusers_conceptexpress.ConceptLocalization` with K masks at the original image size.

        Raises:
            TypeError: unknown option or unsupported image type. ValueError / ImageInputError: a bad option
                value or a bad image (FileNotFoundError for a missing file). All raised before model work.
        """
        try:
            config = LocalizationConfig(**options)
        except TypeError as err:
            raise TypeError(
                f"{err}. Valid options of localize_concepts: {sorted(LocalizationConfig.__dataclass_fields__)}."
            ) from None
        resolution = config.resolution or self.default_resolution
        self._check_resolution(resolution)
        pixels, record = prepare_image(
            image, resolution, multiple=self.size_multiple, policy=config.resize_policy
        )

        latents = self.encode_image(pixels, sample=config.latent_sampling == "sample", generator=generator)
        latents = latents.to(self.unet.dtype)
        h, w = latents.shape[-2:]
        prompt_embeds, ids = self.encode_prompt_ids([""])
        eot_index = find_eot_index(ids[0], self.tokenizer.eos_token_id)

        recorder = AttentionRecorder(
            (h, w),
            self_weighting=config.self_attention_weighting,
            self_factors=config.self_attention_factors,
            cross_token_indices=[eot_index],
            chunk_bytes=config.chunk_bytes,
        )
        timestep = torch.tensor([config.timestep], device=latents.device)
        with capture_attention(self.unet, recorder):
            self.unet(latents, timestep, encoder_hidden_states=prompt_embeds.to(self.unet.dtype))
        attention = recorder.self_attention(release=True)[0]
        notes = []
        factors = recorder.cross_attention_factors()
        eot_factor = min(factors, key=lambda f: (abs(math.log2(f) - math.log2(config.eot_factor)), f))
        if eot_factor != config.eot_factor:
            notes.append(
                f"The UNet has no cross-attention at downsampling factor {config.eot_factor} (outside the mid "
                f"block); used the [EOT] map at factor {eot_factor}."
            )
        eot_map = recorder.cross_attention(eot_factor)[0, 0]
        recorder.reset()

        result = localize(attention, (h, w), eot_map, config, generator=generator)
        del attention
        notes += result.notes
        for note in notes:
            logger.info(note)
        return ConceptLocalization(
            masks=[mask_to_original(m, record) for m in result.masks.cpu()],
            latent_masks=result.masks.cpu(),
            features=result.features.cpu(),
            eot_scores=result.scores.cpu(),
            level=result.level,
            cluster_counts=result.cluster_counts,
            eot_map=eot_map.float().cpu(),
            details=result,
            resize=record,
            notes=notes,
            options={**config.to_dict(), "resolution": resolution, "eot_factor_used": eot_factor},
        )
